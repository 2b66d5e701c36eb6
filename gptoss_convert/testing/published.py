"""The published gpt-oss config.json files (verbatim, as package data) and real-shape sparse
checkpoints built from them: real safetensors headers over data holes, for plans at full size."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

DATA = Path(__file__).parent / "data"
PUBLISHED = ("gpt-oss-20b", "gpt-oss-120b")


def published_config_path(name: str) -> Path:
    """Path of the `config.json` that openai/<name> publishes (copied verbatim)."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown published model {name!r}; known: {', '.join(PUBLISHED)}")
    return DATA / f"{name}.config.json"


def published_config(name: str) -> dict:
    """A fresh copy of the published `config.json` of openai/<name>."""
    return json.loads(published_config_path(name).read_text())


def write_sparse_checkpoint(out_dir: str | os.PathLike, raw_config: dict, *, shards: int) -> Path:
    """A checkpoint directory with `raw_config` as config.json and every tensor of the published
    MXFP4 layout at its real shape, in `shards` files whose data regions are holes (nothing is
    allocated on disk; reading a tensor gives zeros). Good for plans and dry runs at full size."""
    from gptoss_convert.backends.gpt_oss.config import config_from_dict
    from gptoss_convert.io.safetensors import DTYPES, build_header
    from gptoss_convert.testing.tiny import hf_specs, shard_names, split_evenly

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = hf_specs(config_from_dict(raw_config))
    nbytes = {n: DTYPES[dt].itemsize * math.prod(shape) for n, (shape, dt) in specs.items()}
    groups = split_evenly(nbytes, shards)
    names = shard_names(len(groups))
    for fname, group in zip(names, groups):
        prefix, _ = build_header([(n, specs[n][1], specs[n][0]) for n in group], {"format": "pt"})
        with open(out / fname, "wb") as f:
            f.write(prefix)
            f.truncate(len(prefix) + sum(nbytes[n] for n in group))
    index = {"metadata": {"total_size": sum(nbytes.values())},
             "weight_map": {n: f for f, g in zip(names, groups) for n in g}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(raw_config, indent=2))
    return out

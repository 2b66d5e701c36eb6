"""Helpers shared by the converting commands: options, validation against the backend, progress."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

from gptoss_convert.backends import get_backend, known_model_types
from gptoss_convert.converters.plan import Plan, build_plan, edges_from_rules
from gptoss_convert.errors import ConfigError, ConvertError, InputError
from gptoss_convert.io.hf_checkpoint import HFCheckpoint

log = logging.getLogger(__name__)
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
STEP = "0"              # where to-orbax puts its one step: OUT/0/items
ITEM = "items"
KNOWN_MODELS = {(24, 32): "gpt-oss-20b", (36, 128): "gpt-oss-120b"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def resolve_dtype(dtype: str) -> str:
    """'bf16'/'bfloat16' -> 'bfloat16', 'fp32'/'float32' -> 'float32'."""
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConvertError(f"dtype {dtype!r} is not supported; use bf16 or fp32") from None


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConvertError(f"size {size!r} not understood; write e.g. 5GB or 500MiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ConvertError(f"size {size!r} must be positive")
    return value


def maxtext_flags(out: Path, scanned: bool, cfg) -> str:
    """The MaxText flags that load the Orbax checkpoint at `out`."""
    name = KNOWN_MODELS.get((cfg.L, cfg.E))
    flags = f"load_parameters_path={out}/{STEP}/{ITEM} scan_layers={str(scanned).lower()}"
    return (f"model_name={name} " if name else "") + flags


def source_shapes(ck: HFCheckpoint) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: (t.shape, t.dtype) for n, t in ck.tensors.items()}


def config_for(ck: HFCheckpoint, *, strict: bool = False):
    """(backend, config) for `ck`'s config.json under the config policy: math fields checked,
    unknown fields accepted with one warning line (refused when `strict`)."""
    model_type = ck.config_raw.get("model_type")
    path = ck.dir / "config.json"
    if not isinstance(model_type, str):
        raise ConfigError(f"{path}: model_type {model_type!r} is not supported; known model types: {', '.join(known_model_types())}")
    backend = get_backend(model_type)
    try:
        cfg = backend.config_from_dict(ck.config_raw, str(path), strict=strict)
    except (TypeError, ValueError, OverflowError) as e:   # a value of a type the allowlist did not foresee
        raise ConfigError(f"{path}: a value has the wrong type or is out of range ({type(e).__name__}: {e})") from None
    if cfg.unknown_fields:
        log.warning("warning: %s: unknown fields %s accepted as inert (recorded in conversion.json; "
                    "--strict-config refuses them)", path, list(cfg.unknown_fields))
    return backend, cfg


def plan_for(ck: HFCheckpoint, *, scanned: bool, itemsize: int, block_bytes: int | None = None, strict_config: bool = False):
    """(backend, config, checked Plan) for converting `ck` to the backend's parameter tree."""
    backend, cfg = config_for(ck, strict=strict_config)
    edges = edges_from_rules(backend.rules(cfg), cfg.L, backend.layout_for(cfg, scanned))
    kw = {} if block_bytes is None else {"block_bytes": block_bytes}
    plan: Plan = build_plan(source_shapes(ck), backend.flat_shapes(cfg, scanned), edges, itemsize=itemsize, **kw)
    return backend, cfg, plan


def check_against_backend(ck: HFCheckpoint, *, strict_config: bool = False):
    """Validate every tensor of `ck` against its config (the to-orbax plan, never executed);
    returns the config."""
    _, cfg, _ = plan_for(ck, scanned=False, itemsize=2, strict_config=strict_config)
    float_kinds = {"BF16", "F16", "F32", "MXFP4", "FP8"}
    bad = [f"{n!r} is {t.dtype}" for n, t in ck.tensors.items() if t.dtype not in float_kinds]
    if bad:
        raise InputError(f"{ck.dir}: tensors with non-float dtypes: {', '.join(bad)}")
    return cfg


def write_sidecars(ck: HFCheckpoint, out: Path, **config_updates) -> None:
    """config.json of `ck` without quantization_config (plus `config_updates`) and its tokenizer,
    generation and chat-template files, into `out`."""
    conf = {k: v for k, v in ck.config_raw.items() if k != "quantization_config"} | config_updates
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    for f in ck.sidecar_files():
        (out / f.name).write_bytes(f.read_bytes())     # small files; `out` may be an object-store Location


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar over bytes (shows B/s scaled to GB/s); a no-op when disabled."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled,
              dynamic_ncols=True, mininterval=0.5) as bar:
        yield bar

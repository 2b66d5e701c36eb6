"""Find and load a converted checkpoint (to-orbax output or HF directory): shared by verify and generate."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from gptoss_convert.backends import Backend, get_backend
from gptoss_convert.errors import InputError
from gptoss_convert.io.location import Location, is_url, resolve
from gptoss_convert.tree import flatten


@dataclasses.dataclass
class Checkpoint:
    """What a command was pointed at: an Orbax step (MaxText layout) or an HF safetensors dir."""

    kind: str                     # "orbax" | "hf"
    path: Path                    # step dir (…/0) for orbax; the directory for hf
    config_dir: Path              # where config.json lives


def locate(ckpt: str | os.PathLike, config: str | os.PathLike | None = None) -> Checkpoint:
    """Accepts OUT, OUT/0 or OUT/0/items of a to-orbax output, or an HF checkpoint directory;
    OUT may be a gs:// or s3:// URL (see locate_remote)."""
    if is_url(ckpt):
        return locate_remote(resolve(ckpt), config)
    p = Path(ckpt)
    if not p.exists():
        raise InputError(f"{p}: does not exist")
    for step in (p / "0", p, p.parent):
        if (step / "items").is_dir() and (step / "_CHECKPOINT_METADATA").is_file():
            cfg_dir = Path(config) if config else step.parent
            if not (cfg_dir / "config.json").is_file():
                raise InputError(f"{cfg_dir}: no config.json beside the checkpoint; pass --config HF_DIR")
            return Checkpoint("orbax", step, cfg_dir)
    if (p / "config.json").is_file() and (list(p.glob("*.safetensors"))):
        return Checkpoint("hf", p, Path(config) if config else p)
    raise InputError(f"{p}: neither an Orbax checkpoint (OUT/0/items) nor an HF safetensors directory")


def locate_remote(loc: Location, config: str | os.PathLike | None = None) -> Checkpoint:
    """A to-orbax output on an object store. Its small files beside the step (config.json,
    tokenizer, generation config) are copied into a temporary directory, removed at exit, which
    becomes `config_dir`; the arrays are read where they are. An unfinished write is refused."""
    import atexit
    import shutil
    import tempfile

    from gptoss_convert.converters.provenance import PROGRESS

    for root in (loc, loc.parent, loc.parent.parent):
        keys = root.keys()
        if any(k.startswith(PROGRESS + "/") for k in keys):
            raise InputError(f"{root}: the conversion writing it did not finish ({PROGRESS}/ is still there); "
                             "rerun it with --resume")
        if "0/_CHECKPOINT_METADATA" in keys:
            break
    else:
        raise InputError(f"{loc}: no Orbax checkpoint (OUT/0/items) under this prefix")
    if config:
        return Checkpoint("orbax", root / "0", Path(config))
    local = Path(tempfile.mkdtemp(prefix="gptoss-convert-"))
    atexit.register(shutil.rmtree, local, True)
    for key in (k for k in keys if "/" not in k and k != "conversion.json"):
        (local / key).write_bytes((root / key).read_bytes())
    if not (local / "config.json").is_file():
        raise InputError(f"{root}: no config.json beside the checkpoint; pass --config HF_DIR")
    return Checkpoint("orbax", root / "0", local)


def load_config(ck: Checkpoint) -> tuple[Backend, object]:
    """(the model family's backend, its typed config) from the config.json beside `ck`."""
    path = ck.config_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    backend = get_backend(raw.get("model_type"))
    return backend, backend.config_from_dict(raw, str(path))


def load_params(ck: Checkpoint, dtype=np.float32):
    """(flat params, scanned) held in memory, from either kind of checkpoint."""
    if ck.kind == "hf":
        from gptoss_convert.converters.to_orbax import convert_in_memory
        _, flat = convert_in_memory(ck.path, scanned=False, dtype="fp32")
        return flat, False
    from gptoss_convert.io.orbax_reader import load_params as orbax_load
    tree = orbax_load(ck.path, dtype=dtype)
    return {k: np.asarray(v) for k, v in flatten(tree).items()}, is_scanned(ck)


def is_scanned(ck: Checkpoint) -> bool:
    """The layout the forward will see, read off the leaf names (`decoder/layers/...` = scanned),
    not the `scan_layers` note, so checkpoints without our metadata (MaxText's own) work too."""
    from gptoss_convert.io.orbax_reader import read_metadata
    return any(p.startswith("decoder/layers/") for p in read_metadata(ck.path)["leaves"])


def checkpoint_bytes(ck: Checkpoint) -> int:
    """Bytes of the checkpoint's files (on an object store: of its leaves, from their metadata)."""
    if isinstance(ck.path, Location):
        from gptoss_convert.io.orbax_reader import read_metadata
        return sum(int(np.prod(s)) * np.dtype(t).itemsize for s, t in read_metadata(ck.path)["leaves"].values())
    return sum(p.stat().st_size for p in ck.path.rglob("*") if p.is_file())

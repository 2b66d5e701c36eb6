"""Find and load a converted checkpoint (to-orbax output or HF directory): shared by verify and generate."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from gptoss_convert.backends import Backend
from gptoss_convert.backends.policy import parse_config
from gptoss_convert.errors import InputError
from gptoss_convert.io.files import (MAX_CONFIG_BYTES, MAX_SIDECAR_BYTES, MAX_TOKENIZER_BYTES, read_json_object,
                                     read_small)
from gptoss_convert.io.location import Location, is_url, resolve
from gptoss_convert.io.orbax_source import OrbaxSource, is_orbax, open_orbax
from gptoss_convert.io.record import RECORD, RecordedFiles, read_record
from gptoss_convert.tree import flatten


@dataclasses.dataclass
class Checkpoint:
    """What a command was pointed at: an Orbax step (any layout io/orbax_source reads) or an HF
    safetensors dir."""

    kind: str                     # "orbax" | "hf"
    path: Path                    # step dir (…/0) for orbax; the directory for hf
    config_dir: Path              # where config.json lives
    orbax: OrbaxSource | None = None    # the step's params, opened (orbax only)


def locate(ckpt: str | os.PathLike, config: str | os.PathLike | None = None, *,
           allow_uncommitted: bool | None = None, step: int | None = None, item: str | None = None) -> Checkpoint:
    """Accepts an Orbax run root (the latest committed step, or `step`), step or item, in any
    layout io/orbax_source reads (this tool's output, MaxText's train state, Tunix's model_params;
    `item` picks the item), or an HF checkpoint directory; a to-orbax OUT may be a gs:// or s3://
    URL (see locate_remote). The checkpoint is checked before it is read (verify_checkpoint):
    committed, no link out of it, its files as its record lists them."""
    if is_url(ckpt):
        ck = locate_remote(resolve(ckpt), config)
        ck.orbax = open_orbax(ck.path, allow_uncommitted=allow_uncommitted, item=item)
        return verify_checkpoint(ck, allow_uncommitted)
    p = Path(ckpt)
    if not p.exists():
        raise InputError(f"{p}: does not exist")
    if is_orbax(p):
        src = open_orbax(p, step=step, item=item, allow_uncommitted=allow_uncommitted)
        cfg_dir = Path(config) if config else src.step_dir.parent
        if not (cfg_dir / "config.json").is_file():
            raise InputError(f"{cfg_dir}: no config.json beside the checkpoint; pass --like HF_DIR")
        return verify_checkpoint(Checkpoint("orbax", src.step_dir, cfg_dir, src), allow_uncommitted)
    if (p / "config.json").is_file() and (list(p.glob("*.safetensors"))):
        return verify_checkpoint(Checkpoint("hf", p, Path(config) if config else p), allow_uncommitted)
    raise InputError(f"{p}: neither an Orbax checkpoint (OUT/0/items) nor an HF safetensors directory")


def verify_checkpoint(ck: Checkpoint, allow_uncommitted: bool | None = None) -> Checkpoint:
    """What verify and generate read, checked first: an Orbax step must be committed (unless
    allowed) and hold no link out of its checkpoint; where conversion.json lies beside the
    weights, every file it lists is hashed (1 MiB at a time) and compared with it, so a
    damaged or modified file is refused, named, before anything is loaded. Returns `ck`."""
    from gptoss_convert.io.orbax_source import refuse_links_out, require_committed, step_record
    root = ck.path.parent if ck.kind == "orbax" else ck.path
    if ck.kind == "orbax":
        require_committed(ck.path, step_record(ck.path), allow_uncommitted)
        if not isinstance(ck.path, Location):
            refuse_links_out(ck.path)
    if (root / RECORD).is_file():
        RecordedFiles(root, read_record(root / RECORD)["outputs"]).verify_all()
    return ck


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
        limit = MAX_TOKENIZER_BYTES if key == "tokenizer.json" else MAX_SIDECAR_BYTES
        (local / key).write_bytes(read_small(root / key, limit, key))
    if not (local / "config.json").is_file():
        raise InputError(f"{root}: no config.json beside the checkpoint; pass --like HF_DIR")
    return Checkpoint("orbax", root / "0", local)


def load_config(ck: Checkpoint) -> tuple[Backend, object]:
    """(the model family's backend, its typed config) from the config.json beside `ck`."""
    path = ck.config_dir / "config.json"
    return parse_config(read_json_object(path, "the checkpoint's config.json", MAX_CONFIG_BYTES), str(path))


def load_params(ck: Checkpoint, dtype=np.float32):
    """(flat params, scanned) held in memory, from either kind of checkpoint."""
    if ck.kind == "hf":
        from gptoss_convert.converters.to_orbax import convert_in_memory
        _, flat = convert_in_memory(ck.path, scanned=False, dtype="fp32")
        return flat, False
    from gptoss_convert.io.orbax_reader import load_params as orbax_load
    src = ck.orbax
    tree = orbax_load(src.item_dir, dtype=dtype, item_name=src.item_dir.name, prefix=src.prefix, suffix=src.suffix)
    return {k: np.asarray(v) for k, v in flatten(tree).items()}, is_scanned(ck)


def is_scanned(ck: Checkpoint) -> bool:
    """The layout the forward will see, read off the leaf names (`decoder/layers/...` = scanned),
    not the `scan_layers` note, so checkpoints without our metadata (MaxText's own) work too."""
    return any(p.startswith("decoder/layers/") for p in ck.orbax.leaves)


def checkpoint_bytes(ck: Checkpoint) -> int:
    """Bytes of the checkpoint's files (on an object store: of its leaves, from their metadata)."""
    if isinstance(ck.path, Location):
        return sum(int(np.prod(s)) * np.dtype(t).itemsize for s, t in ck.orbax.leaves.values())
    return sum(p.stat().st_size for p in ck.path.rglob("*") if p.is_file())

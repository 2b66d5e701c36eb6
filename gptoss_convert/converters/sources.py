"""What the converting commands read, once: the HF and Orbax sources, the model config that
goes with them (one loader), their sidecar files (one copier) and the dtype value type.

Each source gives the job (converters/job.py) its files, their sizes and their content hashes;
the command gives it a plan of what to read from it.
"""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_convert.backends import get_backend, known_model_types
from gptoss_convert.converters.provenance import PROGRESS, source_hashes
from gptoss_convert.errors import ConfigError, ConvertError, InputError, PlanError
from gptoss_convert.io.files import HASH
from gptoss_convert.io.hf_checkpoint import SIDECAR_FILES, HFCheckpoint
from gptoss_convert.io.files import object_digest
from gptoss_convert.io.orbax_source import OrbaxSource, open_orbax

import logging

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DType:
    """A floating-point output dtype, resolved once at the API boundary."""

    name: str           # numpy / config.json spelling: "bfloat16", "float32"
    short: str          # the option's spelling: "bf16", "fp32"
    np: np.dtype
    st: str             # safetensors dtype code: "BF16", "F32"

    @property
    def itemsize(self) -> int:
        return self.np.itemsize


BF16 = DType("bfloat16", "bf16", np.dtype(ml_dtypes.bfloat16), "BF16")
FP32 = DType("float32", "fp32", np.dtype(np.float32), "F32")
_DTYPES = {"bf16": BF16, "bfloat16": BF16, "fp32": FP32, "float32": FP32}


def dtype_of(dtype: "str | DType") -> DType:
    """'bf16'/'bfloat16' -> BF16, 'fp32'/'float32' -> FP32 (a DType passes through)."""
    if isinstance(dtype, DType):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConvertError(f"dtype {dtype!r} is not supported; use bf16 or fp32 (or bfloat16, float32)") from None


def backend_for(raw: dict, path, *, strict: bool = False, fallback_model_type: str | None = None):
    """(backend, config) for a raw config.json under the config policy: math fields checked,
    unknown fields accepted with one warning line (refused when `strict`)."""
    model_type = raw.get("model_type") or fallback_model_type
    if not isinstance(model_type, str):
        raise ConfigError(f"{path}: model_type {model_type!r} is not supported; known model types: "
                          f"{', '.join(known_model_types())}")
    backend = get_backend(model_type)
    try:
        cfg = backend.config_from_dict(raw, str(path), strict=strict)
    except (TypeError, ValueError, OverflowError) as e:   # a value of a type the allowlist did not foresee
        raise ConfigError(f"{path}: a value has the wrong type or is out of range ({type(e).__name__}: {e})") from None
    if cfg.unknown_fields:
        log.warning("warning: %s: unknown fields %s accepted as inert (recorded in conversion.json; "
                    "--strict-config refuses them)", path, list(cfg.unknown_fields))
    return backend, cfg


def write_sidecars(out, conf: dict, files) -> None:
    """config.json (`conf`) and the tokenizer, generation and chat-template `files` into `out`
    (a directory or a bucket prefix)."""
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    for f in files:
        (out / f.name).write_bytes(f.read_bytes())     # small files


class HFSource:
    """An HF checkpoint directory as the job's source."""

    def __init__(self, ck: HFCheckpoint):
        self.ck = ck
        self.root = ck.dir
        self.config_raw = ck.config_raw

    def files(self) -> list[str]:
        return list(self.ck.files)

    def sizes(self) -> dict[str, int]:
        return {f: (self.ck.dir / f).stat().st_size for f in self.ck.files}

    def hash(self, files: list[str]) -> dict[str, dict]:
        return source_hashes(self.ck.dir, files, workers=1)

    def sidecars(self) -> list:
        return self.ck.sidecar_files()


SMALL_FILE = 1 << 20


class OrbaxSrc:
    """An Orbax checkpoint (a step of it) and its model config as the job's source."""

    def __init__(self, source: OrbaxSource, like=None, *, strict_config: bool = False):
        self.orbax = source
        self.root = source.step_dir
        self.backend, self.cfg, self.sidecar_dir, self.config_raw = _backend_config(source, like, strict_config)

    def files(self) -> list[str]:
        return self.orbax.files()

    def sizes(self) -> dict:
        return self.orbax.sizes()

    def hash(self, files: list[str]) -> dict[str, dict]:
        return hash_source(self.orbax, files)

    def sidecars(self) -> list:
        return [self.sidecar_dir / f for f in SIDECAR_FILES if (self.sidecar_dir / f).is_file()]


def open_source(src, step: int | None, item: str | None = None, log=None) -> OrbaxSource:
    """open_orbax, and for a gs:// / s3:// SRC written by this tool, refuse one whose conversion
    did not finish (its journal is still there, as `check` and the other readers do). `log`
    (if given) is told the layout found (io/orbax_source.Layout.describe)."""
    source = open_orbax(src, step=step, item=item)
    if source.remote and (source.step_dir.parent / PROGRESS / "plan.json").is_file():    # written first, deleted last
        raise InputError(f"{source.step_dir.parent}: the conversion writing it did not finish ({PROGRESS}/ is "
                         "still there); rerun it with --resume first")
    if log is not None and source.layout is not None:
        log(f"{source.step_dir}: {source.layout.describe()}")
    return source


def hash_source(source: OrbaxSource, files: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Provenance of SRC's files (`files`, default all): every file hashed, except in a training
    state (where params are a fraction of the bytes, optimizer state the rest) only its small
    metadata files; the others are recorded by size."""
    files = source.files() if files is None else files
    if source.remote:
        return _hash_remote(source, files)
    small = [f for f in files if not source.other_leaves or (source.step_dir / f).stat().st_size < SMALL_FILE]
    return {f: {} for f in files} | source_hashes(source.step_dir, small, workers=1)


def _hash_remote(source: OrbaxSource, files: list[str]) -> dict[str, dict]:
    """hash_source for a bucket: each object read in pieces, hashed and sized as it is read; in
    a training state an object over SMALL_FILE is recorded by name only ("size": None), having
    been read no further (its size is not known without reading it)."""
    limit = SMALL_FILE if source.other_leaves else None
    with ThreadPoolExecutor(max_workers=8) as pool:     # per-object latency, not bandwidth, bounds this
        got = pool.map(lambda f: object_digest(source.step_dir / f, limit), files)
        return {f: {"size": None} if g is None else {"size": g[0], HASH: g[1]} for f, g in zip(files, got)}


def _like_dir(like) -> Path:
    """--like as a directory: local, or the config and tokenizer files of a hub repo (no weights)."""
    p = Path(like)
    if p.is_dir():
        return p
    if str(like).count("/") != 1 or str(like).startswith((".", "/", "~")) or p.exists():
        raise InputError(f"--like {like}: no such directory (and not a hub repo id owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(like), allow_patterns=["config.json", *SIDECAR_FILES]))
    except Exception as e:      # offline, unknown repo, no network: one line, what to do
        raise InputError(f"--like {like}: could not fetch its config from the hub ({type(e).__name__}); "
                         "pass a local HF directory") from None


def model_config(src: OrbaxSource, like) -> tuple[Path, dict]:
    """(directory of config.json and tokenizer files, the raw config): --like, else the files
    to-orbax wrote beside the checkpoint."""
    d = _like_dir(like) if like is not None else src.sidecar_dir
    if d is None:
        raise InputError(f"{src.step_dir}: no config.json beside this checkpoint (not written by gptoss-convert "
                         "to-orbax, e.g. MaxText's own): pass --like with the HF model it came from")
    path = d / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable ({e}); --like needs an HF model directory or id") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return d, raw


def _backend_config(src: OrbaxSource, like, strict: bool):
    """(backend, config, sidecar dir, raw config) for `src`, its tree checked against the config."""
    d, raw = model_config(src, like)
    written = src.custom_metadata.get("model_type")
    if isinstance(raw.get("model_type"), str) and isinstance(written, str) and raw["model_type"] != written:
        raise InputError(f"{src.step_dir}: a {written} checkpoint, but {d / 'config.json'} is {raw['model_type']}'s; "
                         f"pass --like with the {written} model it came from")
    backend, cfg = backend_for(raw, d / "config.json", strict=strict, fallback_model_type=written)
    where = f"{d / 'config.json'} ({backend.model_type}, {'scanned' if src.scanned else 'unscanned'})"
    check_tree(src, backend.flat_shapes(cfg, src.scanned), where)
    return backend, cfg, d, raw


def check_tree(src: OrbaxSource, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """The checkpoint's params are exactly the backend's tree for the config: every missing,
    unexpected and mis-shaped leaf named at once."""
    got = {p: s for p, (s, _) in src.leaves.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{p} is {list(got[p])}, config needs {list(s)}" for p, s in expected.items() if p in got and got[p] != s]
    problems = ([f"missing leaves: {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected leaves: {', '.join(unexpected)}"] if unexpected else []) + shapes
    if problems:
        raise PlanError(problems, header=f"{src.item_dir}: not the {where} parameter tree")

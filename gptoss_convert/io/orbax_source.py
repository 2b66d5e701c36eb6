"""An Orbax checkpoint as a conversion source: which step, where its params are, read by leaf.

SRC may be a step directory (`<root>/<N>`), its item (`<root>/<N>/items`) or a run's checkpoint
root (the latest committed step, or `step=N`). A step counts only when Orbax committed it: its
`_CHECKPOINT_METADATA` records `commit_timestamp_nsecs`, or `commit_success.txt` is there (what
Orbax writes last; a save cut short has neither, or still has its `.orbax-checkpoint-tmp` name).
The params live under `params/params` in this tool's output, in MaxText's params-only
checkpoints and in MaxText's training state (beside `opt_state` and `step`, OCDBT + zarr3 as
MaxText's `create_orbax_checkpoint_manager` saves by default); other leaves are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import tensorstore as ts

from gptoss_convert.errors import InputError
from gptoss_convert.io.orbax_reader import open_leaf, read_metadata
from gptoss_convert.io.orbax_writer import CHECKPOINT_METADATA_FILE, PYTREE_METADATA_FILE

ITEM = "items"
COMMIT_FILE = "commit_success.txt"
PREFIXES = (("params", "params"), ("params",), ())     # tried in order: the first that holds a decoder


@dataclasses.dataclass
class OrbaxSource:
    """One committed step of an Orbax checkpoint, its params subtree read lazily by leaf."""

    step_dir: Path
    item_dir: Path
    prefix: tuple[str, ...]
    leaves: dict[str, tuple[tuple[int, ...], np.dtype]]      # path under prefix -> (shape, dtype)
    custom_metadata: dict
    other_leaves: int                                         # leaves outside the params (opt_state, step)
    _stores: dict = dataclasses.field(default_factory=dict)

    @property
    def scanned(self) -> bool:
        """`scan_layers` from the step's custom metadata, else read from the tree."""
        flag = self.custom_metadata.get("scan_layers")
        if isinstance(flag, bool):
            return flag
        return any(p.startswith("decoder/layers/") for p in self.leaves)

    @property
    def sidecar_dir(self) -> Path | None:
        """Where to-orbax put config.json and the tokenizer (beside the step), if it did."""
        root = self.step_dir.parent
        return root if (root / "config.json").is_file() else None

    def files(self) -> list[str]:
        """The step's files (relative to step_dir), for provenance."""
        return sorted(p.relative_to(self.step_dir).as_posix() for p in self.step_dir.rglob("*") if p.is_file())

    def store(self, path: str) -> ts.TensorStore:
        """The TensorStore of leaf `path`, opened once."""
        if path not in self._stores:
            self._stores[path] = open_leaf(self.step_dir, path, prefix=self.prefix)
        return self._stores[path]

    def read(self, path: str, index: tuple) -> np.ndarray:
        """leaf[index] as a numpy array (only the chunks it touches are read)."""
        return np.asarray(self.store(path)[index].read().result())


def _committed(step_dir: Path) -> bool:
    if (step_dir / COMMIT_FILE).is_file():
        return True
    try:
        meta = json.loads((step_dir / CHECKPOINT_METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("commit_timestamp_nsecs") is not None


def _steps(root: Path) -> dict[int, Path]:
    return {int(p.name): p for p in root.iterdir() if p.is_dir() and p.name.isdigit()}


def _pick_step(root: Path, step: int | None) -> Path:
    """The step directory of run root `root`: `step`, or the latest committed one."""
    steps = _steps(root)
    if step is not None:
        if step not in steps:
            raise InputError(f"{root}: has no step {step} (steps: {sorted(steps) or 'none'}); pick one with --step")
        return steps[step]
    committed = [n for n in sorted(steps) if _committed(steps[n])]
    if not committed:
        raise InputError(f"{root}: no committed Orbax step in it (steps: {sorted(steps) or 'none'}); "
                         "give a checkpoint directory, a step directory or its items")
    return steps[committed[-1]]


def _locate(src: Path, step: int | None) -> tuple[Path, Path]:
    """(step dir, item dir) of SRC: a step dir, its items, or a run root."""
    if (src / PYTREE_METADATA_FILE).is_file() or src.name == ITEM:
        step_dir, item = src.parent, src
    elif (src / ITEM).is_dir():
        step_dir, item = src, src / ITEM
    else:
        step_dir = _pick_step(src, step)
        item = step_dir / ITEM
    if step is not None and step_dir.name != str(step):
        raise InputError(f"{src}: is step {step_dir.name}, not --step {step}; give the run's root with --step")
    if not _committed(step_dir):
        raise InputError(f"{step_dir}: Orbax step without its commit marker (no commit_timestamp_nsecs in "
                         f"{CHECKPOINT_METADATA_FILE}, no {COMMIT_FILE}): an unfinished save; pick another step")
    if not (item / PYTREE_METADATA_FILE).is_file():
        raise InputError(f"{item}: no {PYTREE_METADATA_FILE} (not an Orbax PyTree item)")
    return step_dir, item


def _prefix(item: Path) -> tuple[tuple[str, ...], int]:
    """(the params prefix, number of leaves outside it) from the item's tree metadata."""
    try:
        meta = json.loads((item / PYTREE_METADATA_FILE).read_text(encoding="utf-8"))
        keys = [tuple(k["key"] for k in e["key_metadata"]) for e in meta["tree_metadata"].values()]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{item / PYTREE_METADATA_FILE}: not readable Orbax tree metadata ({e})") from None
    for prefix in PREFIXES:
        n = len(prefix)
        if any(k[:n] == prefix and len(k) > n and k[n] in ("decoder", "token_embedder") for k in keys):
            return prefix, sum(k[:n] != prefix for k in keys)
    raise InputError(f"{item}: no params tree in this checkpoint (no decoder/ or token_embedder/ under "
                     "params/params, params or the root); is it a model checkpoint?")


def open_orbax(src, *, step: int | None = None) -> OrbaxSource:
    """Resolve SRC (step dir, its items, or a run root; `step` picks one) to its params."""
    path = Path(src)
    if not path.is_dir():
        raise InputError(f"{src}: not a directory (an Orbax checkpoint, step directory or items)")
    step_dir, item = _locate(path, step)
    prefix, others = _prefix(item)
    meta = read_metadata(item, item_name=ITEM, prefix=prefix)
    return OrbaxSource(step_dir, item, prefix, meta["leaves"], meta["custom_metadata"], others)


def is_orbax(src) -> bool:
    """Whether SRC looks like an Orbax checkpoint (or step, or items) rather than an HF directory."""
    p = Path(src)
    if not p.is_dir() or (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return False
    if (p / PYTREE_METADATA_FILE).is_file() or (p / ITEM).is_dir() or (p / CHECKPOINT_METADATA_FILE).is_file():
        return True
    return any(s.is_dir() and (s / ITEM).is_dir() for s in _steps(p).values())


"""An Orbax checkpoint as a conversion source: which step, where its params are, read by leaf.

SRC may be a step directory (`<root>/<N>`), its item (`<root>/<N>/items`) or a run's checkpoint
root (the latest committed step, or `step=N`). A step counts only when Orbax committed it: its
`_CHECKPOINT_METADATA` records `commit_timestamp_nsecs`, or `commit_success.txt` is there (what
Orbax writes last; a save cut short has neither, or still has its `.orbax-checkpoint-tmp` name).

Where the params are is read off the checkpoint (`detect_layout`, named in the log and the record):
- item `items`, params under `params/params`: this tool's output, MaxText's params-only
  checkpoints and MaxText's training state (beside `opt_state`, `step` and, from a pure-NNX train
  state, `nnx_aux`; OCDBT + zarr3 as MaxText's `create_orbax_checkpoint_manager` saves by default);
- item `model_params` (beside `optimizer_state`): what Tunix saves for MaxText's post-training
  (SFT; RL wraps the model in `base/`): an NNX state, every leaf `<param path>/value`, with the
  modules' rng streams (`.../rngs/<stream>/{key,count}/value`) among them; OCDBT, zarr2.
Optimizer state, rng state and aux subtrees are ignored. `item` picks the item where a step holds
several; a step holding none of these is refused, naming what it holds.

SRC may also be a `gs://` or `s3://` URL (a `Location`): the same layouts, read through
TensorStore. There a step counts only with Orbax's `commit_success.txt` (no rename on object
stores: the marker, written last, is what says the step is whole).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import tensorstore as ts

from gptoss_convert.errors import InputError
from gptoss_convert.buffers import RecyclingPool
from gptoss_convert.io.files import (HASH, MAX_CONFIG_BYTES, MAX_ORBAX_METADATA_BYTES, MAX_SIDECAR_BYTES,
                                     MAX_TOKENIZER_BYTES, check_size, new_hash, read_file, read_small)
from gptoss_convert.io.location import Location, is_url, resolve
from gptoss_convert.io.orbax_reader import NNX_STATE, NNX_VALUE, _read_json, open_leaf, read_metadata, tree_keys
from gptoss_convert.io.orbax_writer import (CHECKPOINT_METADATA_FILE, PYTREE_METADATA_FILE, SHARD_INDEX_BYTES,
                                            array_name, shard_index)
from gptoss_convert.io.record import RECORD, RecordedFiles, link_in_path, read_record, step_outputs

ITEM = "items"
ITEMS = ("items", "model_params")         # the items that hold params: MaxText's train state, Tunix's model
COMMIT_FILE = "commit_success.txt"
# (prefix, leaf suffix) tried in order: the first whose tree holds a decoder is the params
PREFIXES = ((("params", "params"), ()), (("params",), ()), ((), ()), ((), NNX_VALUE), (("base",), NNX_VALUE))
ROOTS = ("decoder", "token_embedder")
_CHUNKS = RecyclingPool(keep=8)                         # whole chunk files read by read_whole_chunk
_CHUNK_KEY = re.compile(r"[0-9]+([./][0-9]+)*")          # a zarr chunk file's name (zarr2 "0.1", zarr3 "c/0/1")
_ALLOW_UNCOMMITTED = contextvars.ContextVar("gptoss_allow_uncommitted", default=False)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one checkpoint's params are: its item, the tree prefix, the NNX leaf suffix, its
    storage, and the leaves outside the params (by top-level key; `rngs`: NNX rng leaves)."""

    item: str
    prefix: tuple[str, ...]
    suffix: tuple[str, ...]
    ocdbt: bool
    zarr3: bool
    ignored: dict[str, int]

    @property
    def name(self) -> str:
        """e.g. `items:params/params` (MaxText), `model_params:nnx` (Tunix SFT), `model_params:base/nnx` (RL)."""
        tree = "/".join(self.prefix + (("nnx",) if self.suffix else ())) or "root"
        return f"{self.item}:{tree}"

    def describe(self) -> str:
        """One line for the log: the layout, its storage and what is left out."""
        store = ("OCDBT" if self.ocdbt else "a folder per array") + (" + zarr3" if self.zarr3 else ", zarr2")
        what = {"items:params/params": "MaxText train state / params-only",
                "model_params:nnx": "Tunix NNX model (MaxText SFT)",
                "model_params:base/nnx": "Tunix NNX model under base/ (MaxText RL)"}.get(self.name, "")
        skipped = ", ".join(f"{k} ({n})" for k, n in sorted(self.ignored.items()))
        line = f"layout {self.name}{f' ({what})' if what else ''}, {store}"
        return line + (f"; ignored: {skipped}" if skipped else "")

    def record(self) -> dict:
        """What conversion.json keeps of it."""
        return {"name": self.name, "item": self.item, "prefix": "/".join(self.prefix), "nnx": bool(self.suffix),
                "ocdbt": self.ocdbt, "zarr3": self.zarr3, "ignored": dict(sorted(self.ignored.items()))}


@contextlib.contextmanager
def allowing_uncommitted(allow: bool = True):
    """Within the block, every reader of Orbax checkpoints (open_orbax, loading.locate) accepts a
    step without its commit marker, as `--allow-uncommitted` asks; outside it they refuse one."""
    token = _ALLOW_UNCOMMITTED.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_UNCOMMITTED.reset(token)


def uncommitted_allowed(flag: bool | None = None) -> bool:
    """`flag`, or where None the setting of the enclosing allowing_uncommitted (default False)."""
    return _ALLOW_UNCOMMITTED.get() if flag is None else bool(flag)


def _spans(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, stop) per axis of `index` (an int or a step-1 slice per leading axis) on `shape`."""
    out = []
    for d, size in enumerate(shape):
        i = index[d] if d < len(index) else slice(None)
        out.append((i, i + 1) if isinstance(i, (int, np.integer)) else i.indices(size)[:2])
    return out


def _plain_shard_codecs(chunk: tuple[int, ...]) -> list[dict]:
    """zarr3 codecs of a shard whose one inner chunk is the whole shard, uncompressed, little-endian,
    index at the end (as TensorStore reports them for this tool's uncompressed output)."""
    little = {"configuration": {"endian": "little"}, "name": "bytes"}
    return [{"configuration": {"chunk_shape": list(chunk), "codecs": [little],
                               "index_codecs": [little, {"name": "crc32c"}], "index_location": "end"},
             "name": "sharding_indexed"}]


@dataclasses.dataclass
class OrbaxSource:
    """One committed step of an Orbax checkpoint, its params subtree read lazily by leaf."""

    step_dir: Path | Location
    item_dir: Path | Location
    prefix: tuple[str, ...]
    leaves: dict[str, tuple[tuple[int, ...], np.dtype]]      # path under prefix -> (shape, dtype)
    custom_metadata: dict
    other_leaves: int                                         # leaves and items beside the params (opt_state, step)
    layout: Layout | None = None
    _stores: dict = dataclasses.field(default_factory=dict)
    _layouts: dict = dataclasses.field(default_factory=dict)
    _plain: dict = dataclasses.field(default_factory=dict)      # leaf -> its shards are whole plain chunks
    recorded: RecordedFiles | None = None                       # the step's files as conversion.json lists them

    def expected(self, file: str) -> tuple[str, str] | None:
        """(algorithm, digest) conversion.json gives `file` (relative to step_dir), or None."""
        return self.recorded.expected(file) if self.recorded else None

    def check_digest(self, file: str, digest: str, algorithm: str = HASH) -> None:
        """Refuse `file` (relative to step_dir) if `digest` of its bytes differs from the record's."""
        if self.recorded:
            self.recorded.check_digest(file, digest, algorithm)

    def verify_hashes(self, hashes: dict[str, dict[str, str]]) -> None:
        """Check {file: {algorithm: digest}} (the provenance hashes a converter computed of the
        files it read) against conversion.json; InputError naming the first file that differs."""
        if self.recorded:
            self.recorded.verify_hashes(hashes)

    def _verify_read(self, path: str, index: tuple) -> None:
        """Hash (once each) the chunk files a TensorStore read of leaf `path`[index] touches."""
        if not (self.recorded and self.recorded.active):
            return
        files = self.chunk_files(path, index)
        if files is None:                     # not a file per chunk here: every file of the leaf
            folder = f"{Path(str(self.item_dir)).name}/{array_name(self.stored_key(path))}/"
            files = [f for f in self.recorded.outputs if f.startswith(folder)]
        for f in files:
            self.recorded.verify_file(f)

    @property
    def scanned(self) -> bool:
        """`scan_layers` from the step's custom metadata, else read from the tree."""
        flag = self.custom_metadata.get("scan_layers")
        if isinstance(flag, bool):
            return flag
        return any(p.startswith("decoder/layers/") for p in self.leaves)

    @property
    def sidecar_dir(self) -> Path | Location | None:
        """Where to-orbax put config.json and the tokenizer (beside the step), if it did."""
        root = self.step_dir.parent
        return root if (root / "config.json").is_file() else None

    @property
    def remote(self) -> bool:
        """Whether the checkpoint is in a bucket (gs://, s3://)."""
        return isinstance(self.step_dir, Location)

    def files(self) -> list[str]:
        """The step's files (relative to step_dir), for provenance."""
        if self.remote:
            return self.step_dir.keys()
        return sorted(p.relative_to(self.step_dir).as_posix() for p in self.step_dir.rglob("*") if p.is_file())

    def sizes(self) -> dict[str, int | None]:
        """{file: size} of the step's files; None on object stores, where TensorStore cannot ask
        an object's size without reading it (a committed Orbax step is never rewritten)."""
        if self.remote:
            return {f: None for f in self.files()}
        return {f: (self.step_dir / f).stat().st_size for f in self.files()}

    @property
    def suffix(self) -> tuple[str, ...]:
        return self.layout.suffix if self.layout else ()

    def stored_key(self, path: str) -> tuple[str, ...]:
        """The key leaf `path` has in the item's tree (prefix and NNX suffix included)."""
        return self.prefix + tuple(path.split("/")) + self.suffix

    def store(self, path: str) -> ts.TensorStore:
        """The TensorStore of leaf `path`, opened once."""
        if path not in self._stores:
            self._stores[path] = open_leaf(self.item_dir, path, item_name=self.item_dir.name, prefix=self.prefix,
                                           suffix=self.suffix)
        return self._stores[path]

    def chunk_files(self, path: str, index: tuple) -> list[str] | None:
        """The files (relative to step_dir) that hold leaf `path`[index], for a local leaf stored
        a file per chunk (zarr3, or zarr2, in a folder per leaf: this tool's output); None where
        chunks are not files of their own (OCDBT, as MaxText saves by default; buckets).
        `index` as `read` takes it: an int or a slice (step 1) per leading axis."""
        layout = self._chunk_layout(path)
        if layout is None:
            return None
        folder, chunk, prefix, sep = layout
        spans = _spans(index, self.leaves[path][0])
        if any(stop <= start for start, stop in spans):
            return []
        ranges = [range(start // c, (stop - 1) // c + 1) for (start, stop), c in zip(spans, chunk)]
        keys = [sep.join(prefix + [str(c) for c in cell]) for cell in itertools.product(*ranges)]
        return [f"{folder}/{k}" for k in keys] if ranges else [f"{folder}/{sep.join(prefix) or '0'}"]

    def chunk_shape(self, path: str) -> tuple[int, ...] | None:
        """Leaf `path`'s read chunk shape (TensorStore's unit of reading), None if it has none."""
        try:
            return tuple(int(n) for n in self.store(path).chunk_layout.read_chunk.shape)
        except (TypeError, ValueError):
            return None

    def _chunk_layout(self, path: str):
        """(leaf folder relative to step_dir, chunk shape, key prefix, separator) or None."""
        if path not in self._layouts:
            self._layouts[path] = None
            if not self.remote:
                spec = self.store(path).spec().to_json()
                kv, meta = spec.get("kvstore", {}), spec.get("metadata", {})
                if kv.get("driver") == "file":
                    folder = Path(kv["path"]).relative_to(Path(self.step_dir).absolute()).as_posix()
                    chunk = tuple(self.store(path).chunk_layout.write_chunk.shape)
                    if spec.get("driver") == "zarr3":
                        enc = meta.get("chunk_key_encoding", {"name": "default"})
                        default = enc.get("name") == "default"
                        sep = enc.get("configuration", {}).get("separator", "/" if default else ".")
                        self._layouts[path] = (folder, chunk, ["c"] if default else [], sep)
                        self._plain[path] = meta.get("codecs") == _plain_shard_codecs(chunk)
                    elif spec.get("driver") == "zarr":
                        self._layouts[path] = (folder, chunk, [], meta.get("dimension_separator", "."))
        return self._layouts[path]

    def whole_chunk(self, path: str, index: tuple) -> str | None:
        """The file (relative to step_dir) of the one chunk that leaf `path`[index] is (whole, or
        the part of an edge chunk inside the leaf), if `read_whole_chunk` can read it: a local
        zarr3 shard holding one uncompressed little-endian inner chunk (how this tool writes
        whole chunks, io/orbax_writer.py) on a little-endian host; else None."""
        files = self.chunk_files(path, index)
        if not files or len(files) != 1 or not self._plain.get(path) or sys.byteorder != "little":
            return None
        shape = self.leaves[path][0]
        spans = _spans(index, shape)
        if any(start % c or (stop - start != c and stop != n)
               for (start, stop), c, n in zip(spans, self._layouts[path][1], shape)):
            return None
        return files[0]

    def read_whole_chunk(self, path: str, index: tuple, file: str) -> tuple[np.ndarray, str] | None:
        """(leaf `path`[index], the HASH digest of its file) from the file `whole_chunk` named,
        read once with O_DIRECT into recycled memory: no page cache copy, no TensorStore
        copy, and the provenance hash from the bytes in hand instead of a second read. None
        (TensorStore reads it, and says what is wrong) if the shard index is not the one
        whole chunk it should be (its crc32c, offset 0, the chunk's size)."""
        shape, dtype = self.leaves[path]
        chunk = self._chunk_layout(path)[1]
        nbytes = math.prod(chunk) * dtype.itemsize
        size = nbytes + SHARD_INDEX_BYTES
        buf = _CHUNKS.empty((-(-size // 4096) * 4096,), np.uint8)
        if read_file(self.step_dir / file, buf) != size:
            return None
        trailer = bytes(buf[nbytes:size])
        if trailer != shard_index(nbytes):
            return None
        h = new_hash()
        h.update(memoryview(buf[:size]))
        kept = [d for d in range(len(chunk)) if not (d < len(index) and isinstance(index[d], (int, np.integer)))]
        whole = buf[:nbytes].view(dtype).reshape([chunk[d] for d in kept])
        spans = _spans(index, shape)            # an edge chunk is stored whole: its part inside the leaf
        part = np.ascontiguousarray(whole[tuple(slice(0, spans[d][1] - spans[d][0]) for d in kept)])
        return part, h.hexdigest()

    def read(self, path: str, index: tuple, on_whole_file=None) -> np.ndarray:
        """leaf[index] as a numpy array (only the chunks it touches are read). One whole chunk
        file of this tool's output is read by `read_whole_chunk` (one O_DIRECT read, no page
        cache copy) and `on_whole_file(file, digest)` is told its digest; the rest, and that
        too where its shard index is not as expected, through TensorStore."""
        file = self.whole_chunk(path, index)
        got = self.read_whole_chunk(path, index, file) if file else None
        if got is None:
            self._verify_read(path, index)
            return np.asarray(self.store(path)[index].read().result())
        if self.recorded:
            self.recorded.check_digest(file, got[1])
            self.recorded.verify_file(file)            # a no-op once verified; a record in sha256 hashes again
        if on_whole_file is not None:
            on_whole_file(file, got[1])
        return got[0]


def _committed(step_dir: Path | Location, outputs: dict | None = None) -> bool:
    """Whether Orbax finished the step: its commit_success.txt, or (locally, where Orbax commits by
    renaming) commit_timestamp_nsecs in _CHECKPOINT_METADATA. Where conversion.json lists the
    marker (`outputs`: its entries for this step), the marker itself must be there."""
    if (step_dir / COMMIT_FILE).is_file():
        return True
    if isinstance(step_dir, Location) or (outputs is not None and COMMIT_FILE in outputs):
        return False                # a bucket's step (or one recorded with its marker) is whole only with it
    try:
        raw = read_small(step_dir / CHECKPOINT_METADATA_FILE, MAX_ORBAX_METADATA_BYTES, "Orbax step metadata")
        meta = json.loads(raw)
    except (OSError, ValueError, RecursionError, InputError):
        return False
    return isinstance(meta, dict) and meta.get("commit_timestamp_nsecs") is not None


def _steps(root: Path | Location) -> dict[int, Path | Location]:
    if isinstance(root, Location):
        names = {k.split("/", 1)[0] for k in root.keys() if "/" in k}
        return {int(n): root / n for n in names if n.isdigit()}
    return {int(p.name): p for p in root.iterdir() if p.is_dir() and p.name.isdigit()}


def _pick_step(root, step: int | None):
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


def step_record(step_dir: Path | Location) -> dict[str, dict] | None:
    """conversion.json's entries for the files of `step_dir` (relative to it), where this tool
    wrote the checkpoint (the record lies beside the step); None for any other checkpoint."""
    root = step_dir.parent
    if not (root / RECORD).is_file():
        return None
    if not isinstance(root, Location) and link_in_path(root, RECORD):
        raise InputError(f"{root / RECORD}: is a symbolic link; a checkpoint's record must be a file in it")
    return step_outputs(read_record(root / RECORD), step_dir.name) or None


def require_committed(step_dir: Path | Location, outputs: dict | None, allow_uncommitted: bool | None = None) -> None:
    """Refuse a step Orbax did not finish (see _committed), unless uncommitted steps are allowed."""
    if uncommitted_allowed(allow_uncommitted) or _committed(step_dir, outputs):
        return
    what = f"no {COMMIT_FILE}" if isinstance(step_dir, Location) or outputs and COMMIT_FILE in outputs else \
        f"no commit_timestamp_nsecs in {CHECKPOINT_METADATA_FILE}, no {COMMIT_FILE}"
    raise InputError(f"{step_dir}: Orbax step without its commit marker ({what}): an unfinished save or a "
                     "damaged copy; pick another step, or pass --allow-uncommitted to read it anyway")


def _item_names(step_dir) -> list[str]:
    """The step's items that are Orbax PyTrees (a folder with `_METADATA`)."""
    if isinstance(step_dir, Location):
        return sorted({k.split("/")[0] for k in step_dir.keys() if k.count("/") == 1
                       and k.endswith("/" + PYTREE_METADATA_FILE)})
    return sorted(p.name for p in step_dir.iterdir() if p.is_dir() and (p / PYTREE_METADATA_FILE).is_file())


def _is_step(path) -> bool:
    return (path / CHECKPOINT_METADATA_FILE).is_file() or any((path / i).is_dir() for i in ITEMS)


def _pick_item(step_dir, item: str | None):
    """The item of `step_dir` that holds the params: `item`, else the one of ITEMS the step has."""
    names = sorted(set(_item_names(step_dir)) | {n for n in ITEMS if (step_dir / n).is_dir()})
    if item is not None:
        if item not in names:
            raise InputError(f"{step_dir}: has no Orbax item {item!r} (items: {', '.join(names) or 'none'}); "
                             "pick one with --item")
        return step_dir / item
    known = [n for n in ITEMS if n in names]
    if len(known) > 1:
        raise InputError(f"{step_dir}: holds several params items ({', '.join(known)}); pick one with --item")
    if not known:
        raise InputError(f"{step_dir}: unknown Orbax layout: items {names or 'none'}, none of "
                         f"{', '.join(ITEMS)}; pick the params item with --item")
    return step_dir / known[0]


def _locate(src, step: int | None, allow_uncommitted: bool | None = None, item: str | None = None) -> tuple:
    """(step dir, item dir, the step's record entries or None) of SRC: a step dir, one of its
    items, or a run root; `item` names the item where the step holds several."""
    if (src / PYTREE_METADATA_FILE).is_file() or src.name in ITEMS:
        step_dir, item_dir = src.parent, src
        if item is not None and item != src.name:
            raise InputError(f"{src}: is item {src.name!r}, not --item {item}; give the step or run root with --item")
    else:
        step_dir = src if _is_step(src) else _pick_step(src, step)
        item_dir = None
    if step is not None and step_dir.name != str(step):
        raise InputError(f"{src}: is step {step_dir.name}, not --step {step}; give the run's root with --step")
    outputs = step_record(step_dir)
    require_committed(step_dir, outputs, allow_uncommitted)
    item_dir = item_dir or _pick_item(step_dir, item)
    if not (item_dir / PYTREE_METADATA_FILE).is_file():
        raise InputError(f"{item_dir}: no {PYTREE_METADATA_FILE} (not an Orbax PyTree item)")
    return step_dir, item_dir, outputs


def refuse_links_out(step_dir: Path) -> None:
    """Refuse a local checkpoint where a link under `step_dir` (a leaf folder, a chunk file, a
    metadata file), or a file beside it (config.json, tokenizer), resolves outside the run root
    (the step's parent). Checked before any of those files is opened."""
    root = Path(os.path.realpath(step_dir.parent))
    found = [Path(d) / n for d, dirs, files in os.walk(step_dir) for n in dirs + files if os.path.islink(Path(d) / n)]
    found += [p for p in step_dir.parent.iterdir() if p.is_symlink()]
    for link in found:
        real = Path(os.path.realpath(link))
        if real != root and root not in real.parents:
            raise InputError(f"{link}: is a link pointing outside the checkpoint directory ({real}); "
                             "copy the checkpoint with its files, not links")


def _check_sidecar_sizes(root: Path) -> None:
    """Refuse an oversized config.json or tokenizer file beside the step (to-hf copies them whole)."""
    from gptoss_convert.io.hf_checkpoint import SIDECAR_FILES
    limits = {"config.json": MAX_CONFIG_BYTES, "tokenizer.json": MAX_TOKENIZER_BYTES}
    for name in ("config.json", *SIDECAR_FILES):
        if (root / name).is_file():
            check_size(root / name, limits.get(name, MAX_SIDECAR_BYTES), name)


def detect_layout(item) -> Layout:
    """Where the params are in `item` (see the module docstring), from its tree metadata alone;
    an item holding no model params is refused, naming its top-level keys."""
    path = item / PYTREE_METADATA_FILE
    meta = _read_json(path, "Orbax PyTree metadata")
    keys = tree_keys(meta, path)
    for prefix, suffix in PREFIXES:
        n = len(prefix)
        under = [k for k in keys if k[:n] == prefix and len(k) > n]
        if not any(k[n] in ROOTS for k in under):
            continue
        nnx = all(k[-1] == NNX_VALUE[-1] for k in under if k[n] in ROOTS)
        if nnx != bool(suffix):
            continue
        ignored: dict[str, int] = {}
        for k in keys:
            if k[:n] != prefix or len(k) <= n:
                ignored[k[0]] = ignored.get(k[0], 0) + 1
            elif suffix and NNX_STATE in k[n:]:
                ignored[NNX_STATE] = ignored.get(NNX_STATE, 0) + 1
        ocdbt = bool(meta.get("use_ocdbt", (item / "manifest.ocdbt").is_file()))
        return Layout(Path(str(item)).name, prefix, suffix, ocdbt, bool(meta.get("use_zarr3")), ignored)
    top = sorted({k[0] for k in keys})
    raise InputError(f"{item}: unknown Orbax layout: no decoder/ or token_embedder/ under params/params, params, "
                     f"base or the root (top-level keys: {', '.join(top[:12]) or 'none'}"
                     f"{', ...' if len(top) > 12 else ''}); is it a model checkpoint?")


def _prefix(item) -> tuple[tuple[str, ...], int]:
    """(the params prefix, number of leaves outside it) from the item's tree metadata."""
    layout = detect_layout(item)
    return layout.prefix, sum(layout.ignored.values())


def _verify_metadata(recorded: RecordedFiles) -> None:
    """Hash, before they are parsed, the recorded files of the step that are not chunks."""
    for f in sorted(recorded.outputs or {}):
        if not _CHUNK_KEY.fullmatch(f.rsplit("/", 1)[-1]) and (recorded.root / f).is_file():
            recorded.verify_file(f)


def open_orbax(src, *, step: int | None = None, allow_uncommitted: bool | None = None,
               item: str | None = None) -> OrbaxSource:
    """Resolve SRC (step dir, its items, or a run root, local or gs:// / s3:// ; `step` picks one,
    `item` the params item) to its params, in any layout detect_layout knows.
    Refused: a step without its commit marker (unless `allow_uncommitted`, default:
    allowing_uncommitted's setting), a link out of the checkpoint, and where conversion.json lies
    beside the step, a metadata file whose hash differs from it (chunks are checked as read)."""
    path = resolve(src)
    if not path.is_dir():
        what = "no objects under this prefix" if isinstance(path, Location) else "not a directory"
        raise InputError(f"{src}: {what} (an Orbax checkpoint, step directory or items)")
    step_dir, item_dir, outputs = _locate(path, step, allow_uncommitted, item)
    if not isinstance(step_dir, Location):
        refuse_links_out(step_dir)
        _check_sidecar_sizes(step_dir.parent)
    recorded = RecordedFiles(step_dir, outputs)
    _verify_metadata(recorded)
    layout = detect_layout(item_dir)
    others = {f"{n}/": 1 for n in _item_names(step_dir) if n != item_dir.name}   # whole items (optimizer_state)
    layout = dataclasses.replace(layout, ignored={**layout.ignored, **others})
    meta = read_metadata(item_dir, item_name=item_dir.name, prefix=layout.prefix, suffix=layout.suffix)
    return OrbaxSource(step_dir, item_dir, layout.prefix, meta["leaves"], meta["custom_metadata"],
                       sum(layout.ignored.values()), recorded=recorded, layout=layout)


def is_orbax(src) -> bool:
    """Whether SRC looks like an Orbax checkpoint (or step, or items) rather than an HF directory.
    A gs:// or s3:// SRC is always taken as one (HF sources are read from disk or the hub)."""
    if is_url(src):
        return True
    p = Path(src)
    if not p.is_dir() or (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return False
    if (p / PYTREE_METADATA_FILE).is_file() or _is_step(p):
        return True
    return any(s.is_dir() and _is_step(s) for s in _steps(p).values())

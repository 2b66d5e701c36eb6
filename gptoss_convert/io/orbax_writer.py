"""Orbax checkpoint writer: one MaxText-loadable PyTree step, written leaf block by leaf block.

Why not Orbax's own save: its ArrayHandler holds a whole leaf (and every encoded chunk until the
commit) in host RAM, and a 120b scanned `wi_0` leaf is ~38 GB. So we write what Orbax would
write, ourselves: each leaf is a zarr3 array opened with TensorStore and filled one block at a
time (memory = one block + one encoded chunk), and `finalize()` adds the two metadata files
that make the folder an Orbax checkpoint. No private Orbax API is used.

On-disk format, pinned to what orbax-checkpoint 0.12.8's `PyTreeCheckpointHandler(use_ocdbt=False,
use_zarr3=True)` writes for a tree of numpy leaves (tensorstore 0.1.86). tests/test_orbax_io.py
saves the same tree with stock Orbax and fails if any of these files drift:

    <step_dir>/_CHECKPOINT_METADATA        item_handlers.items = v0 PyTreeCheckpointHandler, custom_metadata
    <step_dir>/commit_success.txt
    <step_dir>/<item>/_METADATA            tree metadata: value_type "np.ndarray", use_ocdbt false, use_zarr3 true
    <step_dir>/<item>/commit_success.txt
    <step_dir>/<item>/params.params.<a>.<b>/zarr.json   zarr v3, one `sharding_indexed` shard per chunk
    <step_dir>/<item>/params.params.<a>.<b>/c/<i>/<j>/... one file per chunk (all-zero ones too)

Choices and why:
- One folder per array, not OCDBT: chunks are plain files, so independent block writes, resume
  (rewrite a chunk) and several writer processes need no shared B-tree manifest and no merge
  step; a partial read (one expert of one layer) opens one small folder. Every reader checked
  (`ocp.v1.load` as MaxText calls it, v0 `PyTreeCheckpointer`, `CheckpointManager`) detects the
  layout from the missing `manifest.ocdbt`, whatever `use_ocdbt` the reader is configured with.
- value_type "np.ndarray" (what Orbax records for host arrays), so no `_sharding` file naming the
  writer's devices: a restore without a target yields numpy arrays; a restore with sharded
  `jax.ShapeDtypeStruct`s (MaxText) places each device's slice directly.
- v0 handler name and no `orbax.checkpoint` indicator file: the v1 loader reads this through its
  v0 layout, and v0 `CheckpointManager.restore(step)` without args can still resolve the handler
  (a v1-style step naming `PyTreeHandler` cannot be restored that way).
- `store_data_equal_to_fill_value`: Orbax restores with `fill_missing_data_reads=False`, so an
  all-zero chunk that was skipped would make the restore fail; every chunk is written.
- Whole uncompressed chunks are written by us, not by TensorStore: such a chunk file is the
  chunk's bytes in C order, then the 20-byte shard index (`shard_index`), and we have those
  bytes in hand. Written from our block with O_DIRECT (`io.files.write_new_file`), they skip the
  page cache, which on this project's VM costs more kernel time than the rest of a conversion,
  and their hash comes from memory instead of a re-read (docs/benchmarks-history.md §2). Durability is
  TensorStore's: temporary file, fsync, rename, fsync of the directory. TensorStore still
  creates every array and writes compressed chunks, partial ones (edge chunks, blocks smaller
  than a chunk) and anything on a big-endian host. tests/test_orbax_io.py checks that the
  files are byte-identical to TensorStore's own.
- A step is complete only once `finalize()` has run after the last `create()`: `create()` removes
  the completion files, `finalize()` checks every chunk exists and writes them last. Before that,
  the v1 loader refuses the step (no `_CHECKPOINT_METADATA`). Note that a v0 `CheckpointManager`
  still lists an unfinalized `<root>/0` as a step (it only skips `*.orbax-checkpoint-tmp*`).
- On an object store (`step_dir` a gs:// or s3:// `io.location.Location`) every array gets a
  `gcs`/`s3` kvstore, whole chunks are one PUT of the same bytes, and the same metadata files
  follow in the same order; the step's `commit_success.txt`, which Orbax takes as "finalized"
  there, comes last (`finalize(commit=False)`, the caller's record, then `commit()`;
  docs/object-stores.md).
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import struct
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorstore as ts

from gptoss_convert.errors import OutputError
from gptoss_convert.io.files import TEMP_SUFFIX, file_digest, new_hash, write_durably, write_new_file
from gptoss_convert.io.location import Location, is_url, store_context

# orbax-checkpoint 0.12.8 names, copied from the files it writes (see the module docstring).
PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
PYTREE_METADATA_FILE = "_METADATA"
CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"
COMMIT_SUCCESS_FILE = "commit_success.txt"
KEY_TYPE_DICT = 2  # orbax.checkpoint._src.metadata.tree.KeyType.DICT
VALUE_TYPE_NUMPY = "np.ndarray"
ZSTD_LEVEL = 3  # Orbax's zarr3 compression (tensorstore_utils._build_zarr3_metadata)
TS_CONTEXT = {"file_io_concurrency": {"limit": 128}}  # Orbax's base TensorStore context
CHUNK_WRITERS = 4  # threads writing whole uncompressed chunk files ourselves (OrbaxWriter.write_async)
HASH_DEPTH = 16    # chunk files TensorStore wrote that may wait for their hash (see _ChunkFiles)


@functools.lru_cache(maxsize=1)
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ (0x82F63B78 if n & 1 else 0)   # CRC-32C (Castagnoli), reflected
        table.append(n)
    return tuple(table)


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (for the 16-byte shard index; zarr3's `crc32c` codec)."""
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


SHARD_INDEX_BYTES = 20     # [offset, nbytes] as two little-endian uint64, then their crc32c


def shard_index(nbytes: int) -> bytes:
    """The end of a chunk file holding one uncompressed inner chunk of `nbytes` (zarr3_metadata
    with compression=None): the index [offset 0, nbytes] as little-endian uint64, then its crc32c."""
    index = struct.pack("<QQ", 0, nbytes)
    return index + struct.pack("<I", crc32c(index))


def default_chunk_shape(shape, dtype, *, max_chunk_bytes: int = 64 << 20) -> tuple[int, ...]:
    """Chunk shape for a leaf: the whole array if it fits `max_chunk_bytes`, else the leading
    axes are cut (axis 0 first, down to 1, then axis 1, ...) until one chunk fits.

    Chunk edges need not divide the shape (zarr pads the last chunk). Callers that write in
    blocks (one expert, one stack slot) should pass chunk shapes equal to their block via
    `OrbaxWriter(chunk_shapes=...)`, so that no chunk is read back and rewritten.
    """
    itemsize = np.dtype(dtype).itemsize
    chunk = [max(int(d), 1) for d in shape]  # zarr chunk sizes must be >= 1, even for empty axes
    for axis in range(len(chunk)):
        if itemsize * math.prod(chunk) <= max_chunk_bytes:
            break
        rest = itemsize * math.prod(chunk[axis + 1:])
        chunk[axis] = max(1, max_chunk_bytes // rest)
    return tuple(chunk)


def array_name(keys: tuple[str, ...]) -> str:
    """Folder of one leaf inside the item dir: Orbax joins the tree keys with '.'."""
    return ".".join(keys)


def zarr3_metadata(shape: tuple[int, ...], dtype: np.dtype, chunk: tuple[int, ...],
                   compression: str | None = "zstd") -> dict:
    """The zarr3 metadata Orbax writes for a leaf saved with one chunk of shape `chunk`:
    a sharding_indexed codec whose single inner chunk is the whole shard, zstd level 3.

    `compression=None` drops the zstd codec: a valid zarr3 array every reader restores, written
    ~2x faster (bf16 weights gain only 10-30% from zstd).
    """
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        inner.append({"name": "zstd", "configuration": {"level": ZSTD_LEVEL}})
    elif compression is not None:
        raise ValueError(f"compression: expected 'zstd' or None, got {compression!r}")
    return {
        "shape": list(shape),
        "data_type": np.dtype(dtype).name,  # "bfloat16" (ml_dtypes), "float32", ...
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
        "codecs": [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": list(chunk),
                "codecs": inner,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
                "index_location": "end",
            },
        }],
    }


def pytree_metadata(leaf_keys: list[tuple[str, ...]]) -> dict:
    """Contents of `<item>/_METADATA` for a tree of nested dicts with numpy leaves."""
    entries = {}
    for keys in sorted(leaf_keys):  # jax flattens dicts in sorted key order, level by level
        entries[str(tuple(keys))] = {
            "key_metadata": [{"key": k, "key_type": KEY_TYPE_DICT} for k in keys],
            "value_metadata": {"value_type": VALUE_TYPE_NUMPY, "skip_deserialize": False},
        }
    return {"tree_metadata": entries, "use_ocdbt": False, "use_zarr3": True,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}


def checkpoint_metadata(item_name: str, custom_metadata: dict, init_ns: int, commit_ns: int) -> dict:
    """Contents of `<step>/_CHECKPOINT_METADATA` (keys in the order Orbax writes them)."""
    return {"item_handlers": {item_name: PYTREE_HANDLER}, "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": init_ns, "commit_timestamp_nsecs": commit_ns,
            "custom_metadata": custom_metadata}


def _chunk_files(leaf_dir: Path | Location, ndim: int) -> int:
    """How many chunk files a zarr3 array folder holds (default key encoding: c/i/j/...)."""
    if isinstance(leaf_dir, Location):      # one listing, not a request per chunk
        keys = leaf_dir.keys()
        return int("c" in keys) if ndim == 0 else sum(k.startswith("c/") and k.rsplit("/", 1)[-1].isdigit()
                                                      for k in keys)
    if ndim == 0:
        return int((leaf_dir / "c").is_file())
    root = leaf_dir / "c"
    if not root.is_dir():
        return 0
    return sum(1 for p in root.rglob("*") if p.is_file() and p.name.isdigit())


class OrbaxWriter:
    """Writes one Orbax PyTree checkpoint step directory, leaf block by leaf block.

    `leaves` maps a path relative to `prefix` ("decoder/layers_0/GptOssMlp/wi_0") to its
    (shape, dtype); the saved tree is {prefix[0]: {prefix[1]: {...nested by "/"...}}}.
    Usage: `create()`, any number of `write()`s (in any order, from a resumed run too), then
    `finalize()`. Processes writing disjoint chunks of one step need no coordination beyond
    running `finalize()` once, after all of them are done (a design property, not tested here).
    The writer owns its chunk files: `chunk_hashes()` gives the hash of every chunk file that
    this writer's writes completed (for the conversion record), taken as each one completes.
    """

    def __init__(self, step_dir: Path, leaves: dict[str, tuple[tuple[int, ...], np.dtype]], *,
                 item_name: str = "items", prefix: tuple[str, ...] = ("params", "params"),
                 chunk_shapes: dict[str, tuple[int, ...]] | None = None,
                 custom_metadata: dict | None = None, compression: str | None = "zstd"):
        self.remote = is_url(step_dir)      # gs:// or s3://: every object through TensorStore's kvstore
        self.step_dir = step_dir if self.remote else Path(step_dir)
        self.compression = compression
        self.item_dir = self.step_dir / item_name
        self.item_name = item_name
        self.prefix = tuple(prefix)
        self.custom_metadata = dict(custom_metadata or {})
        json.dumps(self.custom_metadata)  # fail now, not after hours of writing
        self.leaves = {p: (tuple(int(d) for d in s), np.dtype(t)) for p, (s, t) in leaves.items()}
        self.chunks = self._chunk_shapes(chunk_shapes or {})
        self._check_tree()
        self._stores: dict[str, ts.TensorStore] = {}
        self._init_ns: int | None = None
        self._chunk_pool: ThreadPoolExecutor | None = None
        self._files = _ChunkFiles(self)

    def _chunk_shapes(self, given: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        unknown = sorted(set(given) - set(self.leaves))
        if unknown:
            raise ValueError(f"chunk_shapes names leaves that are not in `leaves`: {unknown}")
        chunks = {}
        for path, (shape, dtype) in self.leaves.items():
            chunk = tuple(int(c) for c in given.get(path, default_chunk_shape(shape, dtype)))
            if len(chunk) != len(shape) or any(c < 1 for c in chunk):
                raise ValueError(f"chunk shape {chunk} for leaf {path!r} {shape}: need one size >= 1 per axis")
            chunks[path] = chunk
        return chunks

    def _check_tree(self) -> None:
        """Every path must map to its own folder and be a leaf, not also an inner node."""
        if not self.leaves:
            raise ValueError("OrbaxWriter needs at least one leaf")
        problems = [f"{p!r}: empty or dotted path component (Orbax joins keys with '.')"
                    for p in self.leaves if any(not k or "." in k for k in self._keys(p))]
        nodes = {"/".join(p.split("/")[:i]) for p in self.leaves for i in range(1, p.count("/") + 1)}
        problems += [f"{p!r} is both a leaf and a parent of other leaves" for p in self.leaves if p in nodes]
        if problems:
            raise ValueError("invalid leaf paths: " + "; ".join(sorted(problems)))

    def _keys(self, path: str) -> tuple[str, ...]:
        return self.prefix + tuple(path.split("/"))

    def _spec(self, path: str) -> dict:
        shape, dtype = self.leaves[path]
        return {"driver": "zarr3",
                "kvstore": _kvstore(self.item_dir / array_name(self._keys(path))),
                "store_data_equal_to_fill_value": True,
                "metadata": zarr3_metadata(shape, dtype, self.chunks[path], self.compression)}

    def create(self) -> None:
        """Create every array (or reopen it, when resuming) and mark the step incomplete.

        Idempotent: chunks already written are kept. An existing array whose shape, dtype or
        chunking differs raises OutputError.
        """
        if not self.remote:
            self.item_dir.mkdir(parents=True, exist_ok=True)
        for marker in (self.step_dir / CHECKPOINT_METADATA_FILE, self.step_dir / COMMIT_SUCCESS_FILE,
                       self.item_dir / PYTREE_METADATA_FILE, self.item_dir / COMMIT_SUCCESS_FILE):
            marker.unlink(missing_ok=True)
        context = ts.Context(TS_CONTEXT | (store_context() if self.remote else {}))
        futures = {p: ts.open(self._spec(p), create=True, open=True, context=context) for p in self.leaves}
        problems = []
        for path, future in futures.items():
            try:
                self._stores[path] = future.result()
            except ValueError as e:  # tensorstore reports a metadata mismatch as ValueError
                problems.append(f"{path}: {str(e).split(' [tensorstore_spec')[0]}")
        if problems:
            raise OutputError(f"{self.step_dir} holds arrays that do not match this conversion "
                              f"({len(problems)}): " + "; ".join(problems)
                              + ". Delete the step directory or convert into a new one.")
        self._init_ns = time.time_ns()

    def write(self, path: str, index: tuple[slice, ...], block: np.ndarray) -> None:
        """Write `block` into leaf `path` at `index` (one slice per axis), cast to the leaf's
        dtype if needed. Synchronous: the data is on disk when this returns."""
        self.write_async(path, index, block).result()

    def write_async(self, path: str, index: tuple[slice, ...], block: np.ndarray, *, borrow: bool = False) -> Future:
        """As `write`, but returns before the data is on disk; the returned future completes
        when it is (and the chunk files it completed are counted). Callers bound how many
        they keep pending.

        `borrow=False`: returns once the writer holds its own copy; `block` may then be
        reused. `borrow=True`: the block is encoded or written straight from `block` (one copy
        fewer, measured ~20% faster conversions) and TensorStore may keep a reference to it for
        as long as it likes, even after the future completes; the caller must never modify
        `block` again (buffers.RecyclingPool reuses such memory only once that reference is gone)."""
        store = self._store(path)
        shape, dtype = self.leaves[path]
        region = _region_shape(path, shape, index)
        block = np.asarray(block)
        if block.shape != region:
            raise ValueError(f"block for leaf {path!r} at {index} has shape {block.shape}, expected {region}")
        if block.dtype != dtype:
            block = block.astype(dtype)
        cell = self._whole_chunk(path, index, block)
        if cell is not None:                    # the chunk file is exactly this block's bytes
            if self._chunk_pool is None:
                self._chunk_pool = ThreadPoolExecutor(CHUNK_WRITERS, thread_name_prefix="gptoss-chunk")
            return self._chunk_pool.submit(self._write_chunk, path, cell, block if borrow else block.copy())
        self._files.wait_for_hashes(HASH_DEPTH)
        futures = store[index].write(block, can_reference_source_data_indefinitely=borrow)
        futures.copy.result()
        done: Future = Future()
        futures.commit.add_done_callback(lambda f: self._files.committed(path, index, f, done))
        return done

    def _whole_chunk(self, path: str, index: tuple[slice, ...], block: np.ndarray) -> tuple[int, ...] | None:
        """The chunk grid cell that `block` at `index` fills exactly, if we write it ourselves:
        uncompressed, one whole chunk, little-endian data on a little-endian host."""
        if self.compression is not None or sys.byteorder != "little" or block.dtype.byteorder == ">":
            return None
        cells = self.chunk_cells(path, index)
        if len(cells) != 1:
            return None
        (cell, n), = cells.items()
        return cell if n == math.prod(self.chunks[path]) else None

    def _write_chunk(self, path: str, cell: tuple[int, ...], block: np.ndarray) -> None:
        """One whole chunk file from memory: written with O_DIRECT, hashed without a re-read."""
        data = np.ascontiguousarray(block)
        trailer = shard_index(data.nbytes)
        digest = new_hash()
        digest.update(memoryview(data.reshape(-1).view(np.uint8)))
        digest.update(trailer)
        file = self.chunk_file(path, cell)
        if self.remote:             # the same bytes, one object PUT (atomic: no temporary needed)
            file.write_bytes(memoryview(data.reshape(-1).view(np.uint8)).tobytes() + trailer)
        else:
            file.parent.mkdir(parents=True, exist_ok=True)
            write_new_file(file, data, trailer)
        self._files.completed(file, digest.hexdigest(), data.nbytes + len(trailer))

    def chunk_hashes(self) -> dict[Path, str]:
        """{chunk file: hash (files.HASH)} of every chunk file this writer's writes completed so far.
        Chunks that an earlier (resumed) run filled are not included. Call after close()."""
        return dict(self._files.hashes)

    def chunk_sizes(self) -> dict[Path | Location, int]:
        """{chunk file: size in bytes} for the chunk files of chunk_hashes() whose size this writer
        knows without asking the store (all of them on an object store)."""
        return dict(self._files.sizes)

    def remove_temporaries(self) -> int:
        """Delete what an interrupted writer left beside the chunks: our temporary files and
        TensorStore's `.__lock` files (its temporaries). Only while no other process writes this
        step. Returns how many were removed. Object stores have no such leftovers (each PUT is
        atomic)."""
        if self.remote:
            return 0
        stale = [p for p in self.item_dir.rglob("*") if p.name.endswith((TEMP_SUFFIX, ".__lock")) and p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def close(self) -> None:
        """Wait for the chunk files being written and hashed, and stop their threads (finalize()
        does this). Raises the first error of a chunk file's hash."""
        if self._chunk_pool is not None:
            self._chunk_pool.shutdown(wait=True)
            self._chunk_pool = None
        self._files.close()

    def _store(self, path: str) -> ts.TensorStore:
        if path not in self.leaves:
            raise KeyError(f"unknown leaf {path!r}; this writer has {len(self.leaves)} leaves")
        if path not in self._stores:
            raise RuntimeError("OrbaxWriter.create() must be called before write()")
        return self._stores[path]

    def chunk_cells(self, path: str, index: tuple[slice, ...]) -> dict[tuple[int, ...], int]:
        """{chunk grid cell: elements of that cell that a write at `index` covers}."""
        shape, _ = self.leaves[path]
        spans = []
        for s, dim, c in zip(index, shape, self.chunks[path]):
            start, stop, _ = s.indices(dim)
            spans.append([(i, min(stop, (i + 1) * c) - max(start, i * c)) for i in range(start // c, -(-stop // c))])
        return {tuple(i for i, _ in combo): math.prod(n for _, n in combo) for combo in itertools.product(*spans)}

    def cell_size(self, path: str, cell: tuple[int, ...]) -> int:
        """Elements of the array inside chunk `cell` (edge chunks are cut by the array's shape)."""
        shape, _ = self.leaves[path]
        return math.prod(min(d, (i + 1) * c) - i * c for i, d, c in zip(cell, shape, self.chunks[path]))

    def chunk_file(self, path: str, cell: tuple[int, ...]) -> Path | Location:
        """The file that holds chunk `cell` of leaf `path` (zarr3 default key encoding)."""
        return self.item_dir / array_name(self._keys(path)) / "/".join(("c", *map(str, cell)))

    def missing_chunks(self) -> dict[str, tuple[int, int]]:
        """{path: (chunk files present, chunks expected)} for every leaf not completely written."""
        missing = {}
        for path, (shape, _) in self.leaves.items():
            expected = math.prod(math.ceil(d / c) for d, c in zip(shape, self.chunks[path]))
            present = _chunk_files(self.item_dir / array_name(self._keys(path)), len(shape))
            if present < expected:
                missing[path] = (present, expected)
        return missing

    def finalize(self, *, commit: bool = True) -> None:
        """Check every chunk was written, then write the files that make this an Orbax
        checkpoint, step-level metadata last so a crash never leaves a step that looks whole.
        `commit=False` leaves out the last one, the step's commit marker: `commit()` writes it
        (on object stores, after the caller's own record)."""
        self.close()
        missing = self.missing_chunks()
        if missing:
            lines = [f"{p}: {have}/{want} chunks" for p, (have, want) in sorted(missing.items())]
            raise OutputError(f"cannot finalize {self.step_dir}: {len(missing)} leaves are incomplete ("
                              + "; ".join(lines) + "). Write the missing blocks (create() reopens "
                              "the step for resuming), then finalize() again.")
        now = time.time_ns()
        keys = [self._keys(p) for p in self.leaves]
        _put(self.item_dir / PYTREE_METADATA_FILE, json.dumps(pytree_metadata(keys)))
        _put(self.item_dir / COMMIT_SUCCESS_FILE,
             f"Checkpoint commit was successful to {self.item_dir}")
        meta = checkpoint_metadata(self.item_name, self.custom_metadata, self._init_ns or now, now)
        _put(self.step_dir / CHECKPOINT_METADATA_FILE, json.dumps(meta))
        if commit:
            self.commit()

    def commit_marker(self) -> tuple[Path | Location, str]:
        """The step's `commit_success.txt` and its text: the last file of a checkpoint (what Orbax
        takes as "finalized" on object stores)."""
        return self.step_dir / COMMIT_SUCCESS_FILE, f"Checkpoint commit was successful to {self.step_dir}"

    def commit(self) -> None:
        """Write the step's commit marker (finalize() does, unless told not to)."""
        _put(*self.commit_marker())


class _ChunkFiles:
    """Which chunk files of an OrbaxWriter are complete, and their hashes.

    A chunk file is complete once every write into it has committed. Files the writer made
    itself come with their hash (taken from memory); the others, which TensorStore wrote, are
    hashed on a thread of their own while still in the page cache (no re-read from disk at the
    end) and dropped from it afterwards, so the next writes reuse those pages. Commits are
    reported from TensorStore's and the chunk writers' threads, hence the lock."""

    def __init__(self, writer: OrbaxWriter):
        self.writer = writer
        self.filled: collections.Counter = collections.Counter()
        self.hashes: dict[Path, str] = {}
        self.sizes: dict[Path | Location, int] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: collections.deque = collections.deque()      # hash jobs of TensorStore's files

    def completed(self, file: Path | Location, digest: str, size: int | None = None) -> None:
        """A chunk file written whole by the writer itself (or hashed after TensorStore wrote it)."""
        with self._lock:
            self.hashes[file] = digest
            if size is not None:
                self.sizes[file] = size

    def committed(self, path: str, index: tuple[slice, ...], commit, done: Future) -> None:
        """TensorStore committed the write at `index` (its future `commit`): count it, hash the
        chunk files it completed, then complete `done` (the caller's future)."""
        try:
            if commit.exception() is not None:
                raise commit.exception()
            self._count(path, index)
        except BaseException as e:  # noqa: BLE001 - on TensorStore's thread: the caller gets it
            done.set_exception(e)
            return
        done.set_result(None)

    def _count(self, path: str, index: tuple[slice, ...]) -> None:
        with self._lock:
            full = []
            for cell, n in self.writer.chunk_cells(path, index).items():
                self.filled[path, cell] += n
                if self.filled[path, cell] == self.writer.cell_size(path, cell):
                    del self.filled[path, cell]
                    full.append(self.writer.chunk_file(path, cell))
            if full and self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptoss-hash")
            self._pending.extend(self._pool.submit(self._hash, file) for file in full)

    def _hash(self, file: Path | Location) -> None:
        if isinstance(file, Location):      # read back what TensorStore stored (edge or compressed chunks)
            data = file.read_bytes()
            digest = new_hash()
            digest.update(data)
            self.completed(file, digest.hexdigest(), len(data))
        else:
            self.completed(file, file_digest(file, drop_cache=True))

    def wait_for_hashes(self, depth: int) -> None:
        """Wait until at most `depth` hash jobs are pending (bounds the page cache they hold)."""
        while len(self._pending) > depth:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.wait_for_hashes(0)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None


def _kvstore(where: Path | Location) -> dict:
    """The TensorStore kvstore spec of a local folder or an object-store prefix."""
    return where.kvstore() if isinstance(where, Location) else {"driver": "file", "path": str(where)}


def _put(target: Path | Location, text: str) -> None:
    """Write a small metadata file: durably on disk; one PUT (atomic) on an object store."""
    if isinstance(target, Location):
        target.write_text(text)
    else:
        write_durably(target, text)


def _region_shape(path: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, ...]:
    """Shape selected by `index` (contiguous slices, one per axis) in an array of `shape`."""
    if not isinstance(index, tuple) or len(index) != len(shape) or not all(isinstance(s, slice) for s in index):
        raise ValueError(f"index for leaf {path!r} {shape} must be a tuple of {len(shape)} slices, got {index!r}")
    region = []
    for s, dim in zip(index, shape):
        start, stop, step = s.indices(dim)
        if step != 1:
            raise ValueError(f"index for leaf {path!r} must use contiguous slices, got {index!r}")
        region.append(max(0, stop - start))
    return tuple(region)

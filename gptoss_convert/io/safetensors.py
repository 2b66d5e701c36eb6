"""Streaming safetensors: a validating header parser, lazy reads, and a writer that streams.

Written here rather than through `safetensors.safe_open` because we need (a) every malformed
header reported as an error naming the file, (b) reads of a row range of one tensor (one expert)
without mapping the rest, and (c) a writer that emits a shard tensor by tensor with bounded memory
(safetensors' own `save_file` takes the whole dict in memory). The format is small: an 8-byte
little-endian header length, a JSON header, then the raw little-endian data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
import threading
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_convert.buffers import empty
from gptoss_convert.errors import CorruptTensorError
from gptoss_convert.io.files import DirectWriter, WriteBehind, new_hash

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor's bytes are."""

    name: str
    dtype: str          # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int         # absolute byte offset in `file`
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def _dup_check(pairs):
    """object_pairs_hook refusing repeated keys; linear (one set), however many keys repeat."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise ValueError(f"duplicate tensor names {dup[:5]}" + (f" and {len(dup) - 5} more" if len(dup) > 5 else ""))
    return out


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a shard's header; every inconsistency raises CorruptTensorError."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptTensorError(f"{path}: file is {size} bytes, too short for a safetensors header; "
                                     "the shard is truncated, re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise CorruptTensorError(f"{path}: header length {n} exceeds the file size {size}; "
                                     "the shard is truncated or not safetensors")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_dup_check)
        except (ValueError, RecursionError) as e:     # RecursionError: absurdly deep nesting
            raise CorruptTensorError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptTensorError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {name: _tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()}
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CorruptTensorError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section")
    return tensors, meta if isinstance(meta, dict) else {}


def _tensor_info(path: Path, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CorruptTensorError(f"{where}: header entry must have dtype, shape and data_offsets")
    dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CorruptTensorError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CorruptTensorError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs) or not 0 <= offs[0] <= offs[1]):
        raise CorruptTensorError(f"{where}: data_offsets {offs!r} are not [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offs[1] - offs[0] != nbytes:
        raise CorruptTensorError(f"{where}: data_offsets span {offs[1] - offs[0]} bytes but shape {shape} x {dtype} "
                                 f"needs {nbytes}")
    if offs[1] > data_size:
        raise CorruptTensorError(f"{where}: data ends at byte {offs[1]} but the file holds {data_size} data bytes; "
                                 "the shard is truncated, re-download it")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offs[0], nbytes)


def rows_shape(shape: tuple[int, ...], rows: slice | None) -> tuple[int, ...]:
    """Shape of rows `rows` (None: all) of an array of `shape`, cut along its first axis."""
    if rows is None:
        return tuple(shape)
    start, stop, _ = rows.indices(shape[0])
    return (max(stop - start, 0), *shape[1:])


def _row_range(info: TensorInfo, rows: slice | None) -> tuple[int, tuple[int, ...], int]:
    """(absolute byte offset, shape, element count) of rows `rows` (unit step) of `info`."""
    start = 0
    if rows is not None:
        start, _, step = rows.indices(info.shape[0])
        if step != 1:
            raise ValueError("rows must be a contiguous slice")
    shape = rows_shape(info.shape, rows)
    row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
    return info.offset + start * row_bytes, shape, math.prod(shape)


def _cut_short(info: TensorInfo, got: int, want: int) -> CorruptTensorError:
    return CorruptTensorError(f"{info.file}: tensor {info.name!r} is cut short ({got} of {want} bytes); "
                              "the shard is truncated, re-download it")


def read_tensor(info: TensorInfo, rows: slice | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Read a tensor, or only rows `rows` (a unit-step slice) of its first axis; into `out`
    (C-contiguous, of the result's shape and dtype) if given."""
    begin, shape, count = _row_range(info, rows)
    if out is None:
        out = empty(shape, info.np_dtype)
    elif out.shape != shape or out.dtype != info.np_dtype or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous {info.np_dtype}{shape} array for {info.name!r}, "
                         f"got {out.dtype}{out.shape}")
    with open(info.file, "rb") as f:
        f.seek(begin)
        got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != count * info.np_dtype.itemsize:
        raise _cut_short(info, got, count * info.np_dtype.itemsize)
    return out


class MappedFiles:
    """Read-only memory maps of safetensors files, one per file, made on first use: a tensor (or
    rows of it) as a numpy view of the page cache, without the copy `read_tensor` makes.

    Reading and decoding every MXFP4 expert of a 4-layer synthetic gpt-oss-20b took 5.86 s (8.76
    CPU-s) from mappings, dropped after each expert, and 6.71 s (9.27 CPU-s) from `read_tensor`
    copies (benchmarks/bench_read.py, medians of 5 alternated passes). A range beyond the file's
    size, then or now, is refused as `read_tensor` refuses it: each view checks the size first, so
    a file cut short during a run gives that error, not SIGBUS (reading a mapped page past the
    end kills the process; only a file cut short between the check and the read still can).
    Thread-safe; the maps close when the last view is gone.

    Mapped pages count in the process's RSS while they stay mapped, so a streaming reader calls
    `drop` once it is done with a range: the pages leave the process (not the page cache), and
    RSS stays bounded by what is in use, not by the size of the checkpoint.
    """

    def __init__(self):
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def view(self, info: TensorInfo, rows: slice | None = None) -> np.ndarray:
        """Tensor `info`, or rows `rows` (unit step) of its first axis, as a read-only view."""
        begin, shape, count = _row_range(info, rows)
        want = count * info.np_dtype.itemsize
        mapping = self._map(info.file)
        size = min(len(mapping), os.stat(info.file).st_size)
        if begin + want > size:
            raise _cut_short(info, max(0, size - begin), want)
        return np.frombuffer(mapping, info.np_dtype, count=count, offset=begin).reshape(shape)

    def drop(self, info: TensorInfo, rows: slice | None = None) -> None:
        """Unmap the pages of a range from this process (MADV_DONTNEED: a later view reads them
        again from the file); a no-op where the OS has no madvise."""
        begin, _, count = _row_range(info, rows)
        mapping = self._map(info.file)
        start = begin - begin % mmap.PAGESIZE
        stop = min(len(mapping), begin + count * info.np_dtype.itemsize)
        if stop > start and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def _map(self, path: Path) -> mmap.mmap:
        with self._lock:
            if path not in self._maps:
                with open(path, "rb") as f:
                    self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._maps[path]


def build_header(entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (padded to 8) for tensors written back to back in `entries` order.

    Returns (prefix to write before the data, byte offset of each tensor within the data).
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets, pos = [], 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offsets


class ShardWriter:
    """Writes one safetensors file whose tensor list is known up front, streaming row blocks.

    Tensors must arrive in the order given; each may come whole (`write`) or as consecutive
    blocks of rows along axis 0 (`append`). The file's hash (files.HASH) is computed on the way
    out: each `PIECE` is hashed right after it was copied out, while it is still in the CPU cache.
    The bytes go to disk with O_DIRECT where the file system allows it (files.DirectWriter, and
    `direct=False` to refuse it); otherwise through the page cache, synced and dropped from it
    behind the writer (files.WriteBehind).
    """

    PIECE = 1 << 20

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None,
                 *, flush_every: int = 256 << 20, direct: bool = True):
        self.path = Path(path)
        prefix, _ = build_header(entries, metadata)
        self._todo = [(n, DTYPES[d], tuple(s), math.prod(s) * DTYPES[d].itemsize) for n, d, s in entries]
        self._i, self._left = 0, self._todo[0][3] if self._todo else 0
        self.hash = new_hash()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
        self._pos = 0
        try:
            # direct: no page cache at all (files.DirectWriter); else page cache + write-behind
            self._direct = DirectWriter.open(self.path, self._fd) if direct else None
            self._behind = None if self._direct else WriteBehind(self._fd, flush_every)
        except BaseException:
            os.close(self._fd)
            raise
        self._emit(memoryview(prefix))
        self._skip_empty()

    @property
    def direct(self) -> bool:
        """True while the bytes go to disk with O_DIRECT (see files.DirectWriter)."""
        return self._direct is not None and self._direct.active

    def _emit(self, mv: memoryview) -> None:
        for start in range(0, len(mv), self.PIECE):
            piece = mv[start:start + self.PIECE]
            if self._direct:
                self._direct.write(piece)
                self.hash.update(piece)
                continue
            while piece:                        # os.write may write less than asked
                n = os.write(self._fd, piece)
                self.hash.update(piece[:n])
                piece = piece[n:]
        self._pos += len(mv)
        if self._behind:
            self._behind.wrote(self._pos)

    def _skip_empty(self) -> None:
        while self._i < len(self._todo) and self._left == 0:
            self._i += 1
            self._left = self._todo[self._i][3] if self._i < len(self._todo) else 0

    def append(self, name: str, rows: np.ndarray) -> None:
        """Append the next block of rows (axis 0) of tensor `name`."""
        if self._i >= len(self._todo) or self._todo[self._i][0] != name:
            expected = self._todo[self._i][0] if self._i < len(self._todo) else None
            raise ValueError(f"{self.path}: expected data of tensor {expected!r}, got {name!r}")
        _, dtype, shape, _ = self._todo[self._i]
        arr = np.ascontiguousarray(rows)
        if arr.dtype != dtype or arr.shape[1:] != shape[1:] or arr.nbytes > self._left:
            raise ValueError(f"{self.path}: block {arr.dtype}{arr.shape} does not fit tensor {name!r} {dtype}{shape}")
        self._emit(memoryview(arr.reshape(-1).view(np.uint8)))
        self._left -= arr.nbytes
        self._skip_empty()

    def write(self, name: str, array: np.ndarray) -> None:
        """Write tensor `name` whole."""
        if self._i < len(self._todo) and np.shape(array) != self._todo[self._i][2]:
            raise ValueError(f"{self.path}: tensor {name!r} has shape {np.shape(array)}, "
                             f"header says {self._todo[self._i][2]}")
        self.append(name, np.atleast_1d(array))

    def close(self, fsync: bool = True) -> str:
        """Finish the file (on disk when `fsync`); returns its hash (files.HASH)."""
        if self._i != len(self._todo):
            raise ValueError(f"{self.path}: closed with tensor {self._todo[self._i][0]!r} incomplete")
        try:
            (self._direct or self._behind).close(fsync=fsync)
        finally:
            self._release()
        return self.hash.hexdigest()

    def abort(self) -> None:
        """Stop writing (after an error); safe to call after close() too."""
        if self._fd < 0:
            return
        try:
            self._direct.abort() if self._direct else self._behind.close(fsync=False)
        finally:
            self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)


def save_file(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a small dict of arrays as one safetensors file (used by tests and the demo)."""
    entries = [(n, DTYPE_NAMES[np.dtype(a.dtype)], tuple(a.shape)) for n, a in tensors.items()]
    w = ShardWriter(path, entries, metadata)
    for n, a in tensors.items():
        w.write(n, a)
    w.close(fsync=False)

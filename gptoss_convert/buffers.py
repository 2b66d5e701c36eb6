"""Recycled numpy buffers for the streaming converters.

A converter handles the same few block shapes thousands of times (one expert, one row block).
Allocating each block anew costs more than it looks: glibc maps blocks over 32 MB straight from
the kernel and unmaps them on free, so every block's pages are faulted in and zeroed again (and
on VMs that hand freed memory back to the host, faulted in from the host: the largest single
cost of a conversion measured on this project's VM, see BENCHMARKS.md). A pool hands the same
buffers out again, already mapped.

`empty` allocates such blocks without transparent huge pages: while the page cache is full of
checkpoint files (always, during a conversion), a huge page for numpy's default hugepage advice
has to be compacted together first, and faulting in fresh output cost 2-3x more kernel time
than with ordinary pages on this project's VM (docs/benchmarks-history.md §1, rows "fresh pages only").
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import functools
import math
import mmap
import os
import threading
import weakref

import numpy as np

# Below this numpy's own allocator is used: small blocks come from the malloc heap (numpy advises
# huge pages only from 4 MB on).
MAP_MIN_BYTES = 4 << 20
# From this size up to MAP_MIN_BYTES a heap block is placed on a page boundary (one page more is
# allocated): the chunk writer writes a page-aligned block with O_DIRECT, any other one through the
# page cache (io.files.write_new_file). Qwen3's 3 MB experts were all written buffered.
ALIGN_MIN_BYTES = 64 << 10
PAGE = mmap.PAGESIZE


def empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """`np.empty(shape, dtype)`, but blocks of MAP_MIN_BYTES or more get their own anonymous
    mapping with transparent huge pages refused (MADV_NOHUGEPAGE, where the OS has it).

    The result is an ordinary writeable C-contiguous array whose `base` is the mapping; the
    memory is unmapped when the last reference goes.
    """
    shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if _mapped(nbytes):
        return np.ndarray(shape, dtype, buffer=_mapping(nbytes))
    if nbytes < ALIGN_MIN_BYTES:
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + PAGE, np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _mapped(nbytes: int) -> bool:
    """Whether a block of `nbytes` gets its own mapping (big enough, and the OS can refuse THP)."""
    return nbytes >= MAP_MIN_BYTES and hasattr(mmap, "MADV_NOHUGEPAGE")


def _mapping(nbytes: int) -> mmap.mmap:
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return mapping


class RecyclingPool:
    """Arrays whose memory returns to the pool by itself once the last reference to them, or to
    any view of them, is gone.

    For blocks handed to someone who keeps them for an unknown while: TensorStore encodes
    straight from a block written with `write_async(borrow=True)` and holds it until then, so
    the caller cannot say when to `put` it back. Each array of MAP_MIN_BYTES or more lies on
    its own anonymous mapping (as `empty` makes them); a finalizer on the array hands the
    mapping back, already faulted in, for the next array of the same size. At most `keep`
    free mappings per size are kept; smaller arrays come from `np.empty`.
    """

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._free: dict[int, list[mmap.mmap]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if not _mapped(nbytes):
            return empty(shape, dtype)
        with self._lock:
            free = self._free.get(nbytes)
            mapping = free.pop() if free else None
        arr = np.ndarray(shape, dtype, buffer=mapping if mapping is not None else _mapping(nbytes))
        weakref.finalize(arr, self._release, arr.base)
        return arr

    def _release(self, mapping: mmap.mmap) -> None:
        with self._lock:
            free = self._free[len(mapping)]
            if len(free) < self.keep:
                free.append(mapping)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# What keep_freed_memory lets the heap keep free at its top before giving it back to the kernel.
RETAINED_HEAP_BYTES = 1 << 30
RETURNED_BLOCK_BYTES = 1 << 20     # retain_freed_memory_up_to(return_large=True): mapped, unmapped on free


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's mallopt for each (parameter, value); whether all took. False where this is not
    glibc, or with GPTOSS_CONVERT_MALLOC=default (the allocator left as it is)."""
    if os.environ.get("GPTOSS_CONVERT_MALLOC") == "default":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, int(value)) == 1 for param, value in settings)


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for the next ones, once per process; returns
    whether it did. The pools above recycle this project's own blocks, but TensorStore and XLA
    allocate theirs (a chunk read, a kernel's input) with malloc, and glibc maps each one over
    its dynamic threshold from the kernel and unmaps it on free, so every chunk's pages were
    faulted in and zeroed again: up to half of an export's CPU time was kernel time. Here blocks
    up to 256 MB come from the heap, the heap is trimmed only past 1 GB free, and at most 2
    arenas (TensorStore's threads each took their own, each holding its freed blocks):
    BENCHMARKS.md, "to-hf --mxfp4". Not glibc (or GPTOSS_CONVERT_MALLOC=default): nothing done."""
    return _mallopt((_M_ARENA_MAX, 2), (_M_MMAP_THRESHOLD, 256 << 20), (_M_TRIM_THRESHOLD, RETAINED_HEAP_BYTES))


def retain_freed_memory_up_to(nbytes: int, return_large: bool = False) -> bool:
    """Lower what glibc keeps of freed heap memory (keep_freed_memory's 1 GB) to `nbytes`, at
    least 64 MB, so that memory kept for reuse stays under a ceiling (--max-memory) too; with
    `return_large`, also hand blocks of RETURNED_BLOCK_BYTES or more back to the kernel when freed
    (for reads that allocate outside this project's pools: TensorStore's read results, which the
    heap otherwise kept, fragmented, 0.45 GB over the ceiling in a relayout). Returns whether it
    did (glibc only, and not with GPTOSS_CONVERT_MALLOC=default)."""
    trim = ((_M_TRIM_THRESHOLD, min(max(nbytes, 64 << 20), RETAINED_HEAP_BYTES)),)
    return _mallopt(*trim, *([(_M_MMAP_THRESHOLD, RETURNED_BLOCK_BYTES)] if return_large else []))


def as_bits(arr: np.ndarray) -> np.ndarray:
    """`arr` viewed as unsigned ints of its itemsize (raw bytes beyond 8): copies between such
    views are plain numpy copies; those of ml_dtypes' bfloat16 go through its slower cast loop."""
    size = arr.dtype.itemsize
    return arr.view(np.dtype(f"u{size}") if size in (1, 2, 4, 8) else np.dtype(f"V{size}"))


def _owns_memory(arr: np.ndarray) -> bool:
    """True for an array that is the whole of its memory (not a view of another array's)."""
    base = arr.base
    return (base is None or (isinstance(base, mmap.mmap) and len(base) == arr.nbytes)
            or (isinstance(base, np.ndarray) and base.base is None and base.nbytes == arr.nbytes + PAGE))


class BufferPool:
    """Free buffers by (shape, dtype), at most `keep` of each; thread-safe.

    `get` returns a pooled buffer (contents undefined) or a new one; `put` returns a buffer the
    caller no longer uses (anything else, views included, is ignored, so callers may `put`
    whatever they got back from a function that may or may not have used their buffer).
    """

    def __init__(self, keep: int = 8, min_bytes: int = 1 << 20):
        self.keep, self.min_bytes = keep, min_bytes
        self._free: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        key = (tuple(int(d) for d in shape), np.dtype(dtype))
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return empty(*key)

    def put(self, arr: np.ndarray | None) -> None:
        if (arr is None or not _owns_memory(arr) or not arr.flags.c_contiguous or not arr.flags.writeable
                or math.prod(arr.shape) * arr.itemsize < self.min_bytes):
            return
        with self._lock:
            free = self._free[(arr.shape, arr.dtype)]
            if len(free) < self.keep:
                free.append(arr)

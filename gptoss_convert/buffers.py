"""Recycled numpy buffers for the streaming converters.

A converter handles the same few block shapes thousands of times (one expert, one row block).
Allocating each block anew costs more than it looks: glibc maps blocks over 32 MB straight from
the kernel and unmaps them on free, so every block's pages are faulted in and zeroed again (and
on VMs that hand freed memory back to the host, faulted in from the host: the largest single
cost of a conversion measured on this project's VM, see BENCHMARKS.md). A pool hands the same
buffers out again, already mapped.
"""

from __future__ import annotations

import collections
import math
import threading

import numpy as np


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
        return np.empty(*key)

    def put(self, arr: np.ndarray | None) -> None:
        if (arr is None or arr.base is not None or not arr.flags.c_contiguous or not arr.flags.writeable
                or math.prod(arr.shape) * arr.itemsize < self.min_bytes):
            return
        with self._lock:
            free = self._free[(arr.shape, arr.dtype)]
            if len(free) < self.keep:
                free.append(arr)

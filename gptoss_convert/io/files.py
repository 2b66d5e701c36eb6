"""Small durable-file helpers shared by the writers and readers."""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from gptoss_convert.errors import InputError


def fsync_dir(directory: Path) -> None:
    """Make a rename/creation inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cached(fd: int, start: int = 0, length: int = 0) -> None:
    """Drop a file range whose data is already on disk from the page cache (advice only; a no-op
    where the OS has no posix_fadvise). Pages of a bulk write are never read again by us, and
    freeing them lets the kernel hand the same, already-mapped pages to the next write."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


class WriteBehind:
    """Write-behind for one file written sequentially: every `every` bytes, a background thread
    fdatasyncs the file and drops the synced range from the page cache.

    Why: a multi-GB output otherwise fills the page cache with dirty pages, each a fresh page
    for the kernel to allocate and zero (and, on VMs that return free memory to the host, to
    fault in from the host: ~5x slower writes measured on this project's VM by
    benchmarks/bench_io.py). Flushing behind the writer keeps the working set small and the disk busy
    all along, and the final fsync has little left to do. At most one flush is in flight, so a
    writer faster than the disk waits here instead of piling up dirty memory.
    """

    def __init__(self, fd: int, every: int = 256 << 20):
        self.fd, self.every = fd, every
        self._pending_to = 0                   # bytes handed to a flush so far
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptoss-flush")
        self._future: Future | None = None

    def wrote(self, upto: int) -> None:
        """The file's first `upto` bytes have been written; flush them if enough are pending."""
        if upto - self._pending_to >= self.every:
            self._wait()
            start, self._pending_to = self._pending_to, upto
            self._future = self._pool.submit(self._flush, start, upto)

    def _flush(self, start: int, stop: int) -> None:
        os.fdatasync(self.fd) if hasattr(os, "fdatasync") else os.fsync(self.fd)
        drop_cached(self.fd, start, stop - start)

    def _wait(self) -> None:
        if self._future is not None:
            self._future.result()
            self._future = None

    def close(self, fsync: bool = True) -> None:
        """Wait for the flush in flight; then fsync and drop the rest (if `fsync`)."""
        try:
            self._wait()
            if fsync:
                os.fsync(self.fd)
                drop_cached(self.fd, self._pending_to, 0)
        finally:
            self._pool.shutdown(wait=True)


def write_durably(path: Path, text: str) -> None:
    """Write a small file so that it is either absent or complete, and on disk when we return."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from `path`; a missing, unreadable or non-object file is an InputError."""
    if not path.is_file():
        raise InputError(f"{path}: missing; {what}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:   # RecursionError: absurdly deep nesting
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: must hold a JSON object")
    return raw

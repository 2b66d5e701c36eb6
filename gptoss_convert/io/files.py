"""Small durable-file helpers shared by the writers and readers."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

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


class DirectWriter:
    """Sequential writes to a file with O_DIRECT: the bytes go from our own buffers to the disk,
    never through the page cache.

    Why: on this project's VM every page-cache page a write fills is a fresh page the host must
    provide; bench_io measured 3 GB written with 1.1 s of kernel time through the page cache
    (with WriteBehind) and 0.07 s with O_DIRECT. The bytes are copied into one of two aligned
    staging buffers; a full one is written by a background thread while the other fills. The
    final partial block (O_DIRECT needs aligned lengths) is written through `fd`, the file's
    ordinary descriptor, after everything else.

    `open` returns None where the OS or the file system has no O_DIRECT (e.g. tmpfs); if a
    write is refused later (EINVAL), the rest goes through `fd` instead. Either way the file
    ends up with the same bytes.
    """

    ALIGN = 4096

    def __init__(self, fd: int, direct_fd: int, stage: int):
        self.fd, self._dfd, self._stage = fd, direct_fd, stage
        self._maps = [mmap.mmap(-1, stage) for _ in range(2)]             # page-aligned, as O_DIRECT needs
        self._bufs = [memoryview(m) for m in self._maps]
        self._writes: list[Future | None] = [None, None]
        self._cur, self._fill, self._flushed = 0, 0, 0
        self.active = True                          # False once writes go through `fd` instead
        self.direct_bytes = 0                       # bytes that went to the disk with O_DIRECT
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptoss-direct")

    @classmethod
    def open(cls, path: Path, fd: int, stage: int = 8 << 20) -> DirectWriter | None:
        """A DirectWriter for the file `fd` has open at `path` (`stage`: bytes per write, a
        multiple of ALIGN), or None where O_DIRECT is not available."""
        direct_fd = open_direct(path) if stage % cls.ALIGN == 0 else None
        return None if direct_fd is None else cls(fd, direct_fd, stage)

    def write(self, data: memoryview) -> None:
        """Append `data` (bytes-like) to the file.

        Copied into the stage buffer by numpy, which releases the GIL while it copies: a
        memoryview slice assignment holds it, and it was 15% of the GIL-holding samples of a
        merge-lora (py-spy --gil), stalling the threads that compute the next blocks."""
        data = np.frombuffer(data, np.uint8)
        while data.size:
            n = min(data.size, self._stage - self._fill)
            np.copyto(np.frombuffer(self._bufs[self._cur], np.uint8, n, self._fill), data[:n])
            self._fill += n
            data = data[n:]
            if self._fill == self._stage:
                self._hand_off()

    def _hand_off(self) -> None:
        """Write the full current buffer in the background; wait until the other one is free."""
        self._writes[self._cur] = self._pool.submit(self._pwrite, self._bufs[self._cur][:self._fill], self._flushed)
        self._flushed += self._fill
        self._cur, self._fill = 1 - self._cur, 0
        self._wait(self._cur)

    def _wait(self, i: int) -> None:
        if self._writes[i] is not None:
            future, self._writes[i] = self._writes[i], None
            future.result()

    def _pwrite(self, data: memoryview, offset: int) -> None:
        """Write `data` at `offset`: with O_DIRECT while that works, the rest through `fd`."""
        if self.active:
            n = direct_pwrite(self._dfd, data, offset)
            self.direct_bytes += n
            if n < len(data):                       # refused, or a short write left an unaligned rest
                self.active = False
            data, offset = data[n:], offset + n
        pwrite_all(self.fd, data, offset)

    def close(self, fsync: bool = True) -> None:
        """Write what is left, wait for every write, then fsync (if `fsync`)."""
        try:
            self._wait(1 - self._cur)
            aligned = self._fill - self._fill % self.ALIGN
            self._pwrite(self._bufs[self._cur][:aligned], self._flushed)
            pwrite_all(self.fd, self._bufs[self._cur][aligned:self._fill], self._flushed + aligned)
            if fsync:
                os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop: wait for the writes in flight (their errors are dropped), release everything."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._writes = [None, None]
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
            self._bufs = self._maps = []            # unmapped once the last view (maybe in an error) goes


# The hash conversion.json records for every output file. xxh3-128 (the `xxhash` package), not
# sha256: the record detects copies that were damaged or changed, and the record itself is not
# signed, so a cryptographic hash would add nothing there. sha256 was 38% of dequantize's CPU
# (perf, docs/benchmarks-history.md §2); with xxh3-128 the user CPU of dequantize and to-orbax
# fell 45-47% (bench_ab, BENCHMARKS.md "Full size"). Records written before this change name
# "sha256"; check verifies both (HASHES).
HASH = "xxh3_128"
HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def new_hash(algorithm: str = HASH):
    """A fresh hash object (hashlib's interface: update, hexdigest) of `algorithm`."""
    return HASHES[algorithm]()


# Window of a file mapped at a time by file_digest (a multiple of mmap.ALLOCATIONGRANULARITY).
DIGEST_WINDOW = 64 << 20


def file_digest(path: Path, algorithm: str = HASH, *, bufsize: int = 1 << 20, drop_cache: bool = False) -> str:
    """Hex digest of a file's bytes. `drop_cache`: then drop the file from the page cache (for
    freshly written bulk output that nobody reads again soon).

    Hashed from read-only mappings of DIGEST_WINDOW bytes at a time, not from read() copies into
    a buffer: a 3.74 GB shard in the page cache hashed in 0.4-0.6 s (0.56-0.58 CPU-s) against
    2.0-2.7 s (1.7-2.3 CPU-s); cold, 5.7-7.3 s (2.9-4.3 CPU-s) against 6.2-8.1 s (4.0-4.4 CPU-s)
    (BENCHMARKS.md, "Disk speed for every family and command"). The page cache it fills is what
    the conversion reads next. Where a file cannot be mapped (a special file, a file system
    without mmap), it is read in `bufsize` pieces."""
    h = new_hash(algorithm)
    with open(path, "rb", buffering=0) as f:
        if not _digest_mapped(f.fileno(), h):
            h = new_hash(algorithm)
            buf = bytearray(bufsize)
            view = memoryview(buf)
            f.seek(0)
            while n := f.readinto(buf):
                h.update(view[:n])
        if drop_cache:
            drop_cached(f.fileno())
    return h.hexdigest()


def _digest_mapped(fd: int, h) -> bool:
    """Feed the file `fd` to `h` window by window from read-only mappings; False (nothing fed)
    where it cannot be mapped (not a regular file). RSS stays at one window: each is unmapped
    before the next. As for io.safetensors.MappedFiles, a file cut short while it is being hashed
    ends the process (SIGBUS) instead of giving a wrong digest."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return False
    size = st.st_size
    for start in range(0, size, DIGEST_WINDOW):
        try:
            window = mmap.mmap(fd, min(DIGEST_WINDOW, size - start), offset=start, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            if start == 0:
                return False
            raise
        with window:
            if hasattr(mmap, "MADV_SEQUENTIAL"):
                window.madvise(mmap.MADV_SEQUENTIAL)
            h.update(window)
    return True


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 of `path` if it is a Hugging Face hub-cache blob named by it, else None.

    The hub client stores a file tracked by LFS (every weight shard) as `blobs/<sha256>` (the
    LFS object id) and links the snapshot's file name to it; small files kept in git are named
    by their 40-hex git blob id instead, which is not a sha256 of the bytes."""
    real = Path(os.path.realpath(path))
    name = real.name
    if real.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    return None


def read_file(path: Path, buf: np.ndarray) -> int:
    """Read the whole of `path` into `buf` (contiguous; for O_DIRECT page-aligned, its length a
    multiple of DirectWriter.ALIGN) and return the file's size: with O_DIRECT where the OS and
    the file system take it (from the disk into `buf`, no copy through the page cache), else an
    ordinary read. A file larger than `buf` returns its size and `buf` holds its start."""
    view = memoryview(buf).cast("B")
    fd = _open_direct_read(path) if _aligned(view) else None
    if fd is not None:
        try:
            return _read_all(fd, view, DirectWriter.ALIGN)
        except OSError as e:
            if e.errno != errno.EINVAL:      # EINVAL: a file system that opens with O_DIRECT but refuses reads
                raise
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_all(fd, view, 1)
    finally:
        os.close(fd)


def _open_direct_read(path: Path) -> int | None:
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:          # EINVAL: no O_DIRECT on this file system (tmpfs)
            raise
        return None


def _aligned(view: memoryview) -> bool:
    address = np.frombuffer(view, np.uint8).ctypes.data if len(view) else 0
    return address % DirectWriter.ALIGN == 0 and len(view) % DirectWriter.ALIGN == 0


def _read_all(fd: int, view: memoryview, align: int) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], done)
        done += n
        if n == 0 or done % align:             # end of file (O_DIRECT: an unaligned count is the tail)
            return done
    return max(done, os.fstat(fd).st_size)


def open_direct(path: Path) -> int | None:
    """A write descriptor for `path` with O_DIRECT, or None where the OS or the file system
    has no O_DIRECT (e.g. tmpfs)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None


def direct_pwrite(dfd: int, data: memoryview, offset: int) -> int:
    """Write the whole pages of `data` at `offset` through the O_DIRECT descriptor `dfd`;
    returns how many bytes were written. Less than len(data) means the caller writes the rest
    through an ordinary descriptor: an unaligned tail, a short write, or a file system that
    takes O_DIRECT opens but refuses the writes (EINVAL), the one fallback for all of them."""
    done, stop = 0, len(data) - len(data) % DirectWriter.ALIGN
    while done < stop:
        try:
            n = os.pwrite(dfd, data[done:stop], offset + done)
        except OSError as e:
            if e.errno == errno.EINVAL:
                break
            raise
        done += n
        if n % DirectWriter.ALIGN:                 # a short write leaves an unaligned rest
            break
    return done


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (os.pwrite may write less than asked)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


TEMP_SUFFIX = ".gptoss-tmp"     # the one naming rule for a file being written; never a finished output


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (its name + TEMP_SUFFIX)."""
    return path.with_name(path.name + TEMP_SUFFIX)


def write_new_file(path: Path, data: np.ndarray, trailer: bytes = b"") -> None:
    """Make `path` hold the bytes of `data` (a C-contiguous array, in memory order) followed by
    `trailer`, atomically and durably: they go to `temp_path(path)`, which is fsynced, renamed
    over `path`, and the directory fsynced. So `path` is absent, or old, or complete, also after
    a crash; and on disk when this returns.

    Where `data` starts on a page boundary (the blocks of `buffers.empty` and the pools do), its
    whole pages are written with O_DIRECT, from `data` itself: no copy, no page cache (see
    DirectWriter for why that matters). The rest, and everything where the OS or file system
    has no O_DIRECT, goes through the ordinary descriptor. Either way the file is the same.
    """
    raw = memoryview(data.reshape(-1).view(np.uint8))
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = _write_direct(tmp, raw) if data.ctypes.data % DirectWriter.ALIGN == 0 else 0
        pwrite_all(fd, raw[done:], done)
        pwrite_all(fd, memoryview(trailer), len(raw))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_direct(path: Path, raw: memoryview) -> int:
    """Write the whole pages of `raw` (page-aligned memory) to the start of `path` with
    O_DIRECT; returns how many bytes went that way."""
    if len(raw) < DirectWriter.ALIGN:
        return 0
    dfd = open_direct(path)
    if dfd is None:
        return 0
    try:
        return direct_pwrite(dfd, raw, 0)
    finally:
        os.close(dfd)


def write_durably(path: Path, text: str) -> None:
    """Write a small file so that it is either absent or complete, and on disk when we return."""
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# Limits on the files read whole (every one attacker-controlled in a downloaded checkpoint). The
# published files are far below them: gpt-oss's config.json is 2 KB, its index 40 KB (Qwen3-235B's
# 2 MB), its tokenizer.json 27 MB; a conversion.json of a full-size scanned output ~2 MB.
MAX_CONFIG_BYTES = 1 << 20               # config.json
MAX_INDEX_BYTES = 64 << 20               # model.safetensors.index.json
MAX_TOKENIZER_BYTES = 64 << 20           # tokenizer.json
MAX_SIDECAR_BYTES = 16 << 20             # tokenizer_config.json, special_tokens_map.json, generation_config.json,
                                         # chat_template.jinja
MAX_RECORD_BYTES = 64 << 20              # conversion.json
MAX_ORBAX_METADATA_BYTES = 64 << 20      # Orbax's _METADATA, _CHECKPOINT_METADATA


def too_large(path, size: int, limit: int, what: str) -> InputError:
    """The refusal of a file over its limit, naming the file, both sizes and the limit's name."""
    return InputError(f"{path}: {size:,} bytes, over the {limit:,}-byte limit for {what}; "
                      "this is not a file of a real checkpoint (damaged or hostile), replace it")


def check_size(path, limit: int, what: str) -> None:
    """Refuse `path` (a local file) if it is over `limit` bytes, without reading it."""
    size = os.stat(path).st_size
    if size > limit:
        raise too_large(path, size, limit, what)


def read_small(path, limit: int, what: str) -> bytes:
    """All bytes of `path` (a local file or a Location), refusing one over `limit` bytes: a local
    file by its size before reading; an object by reading at most limit + 1 bytes."""
    if not isinstance(path, (str, os.PathLike)):           # a Location: no stat; read no further than needed
        data = path.read_bytes(byte_range=slice(0, limit + 1))
        if len(data) > limit:
            raise InputError(f"{path}: over the {limit:,}-byte limit for {what}; this is not a file of a real "
                             "checkpoint (damaged or hostile), replace it")
        return data
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise too_large(path, size, limit, what)
        data = f.read(size + 1)                 # not limit + 1: read() allocates what it is asked for
        if size < len(data) <= limit:           # it grew after the stat
            data += f.read(limit + 1 - len(data))
    if len(data) > limit:
        raise too_large(path, len(data), limit, what)
    return data


def read_json_object(path: Path, what: str, limit: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON object from `path` (at most `limit` bytes); a missing, oversized, unreadable or
    non-object file is an InputError."""
    if not path.is_file():
        raise InputError(f"{path}: missing; {what}")
    try:
        raw = json.loads(read_small(path, limit, path.name).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:   # RecursionError: absurdly deep nesting
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: must hold a JSON object")
    return raw


def object_digest(loc, limit: int | None = None, piece: int = 64 << 20,
                  algorithm: str = HASH) -> tuple[int, str] | None:
    """(size, `algorithm` digest) of an object (a Location: anything with read_bytes(byte_range=)),
    read `piece` bytes at a time (bounded memory); None if it is larger than `limit` (then only its
    first limit + 1 bytes were read)."""
    h, size = new_hash(algorithm), 0
    while True:
        n = piece if limit is None else min(piece, limit + 1 - size)
        data = loc.read_bytes(byte_range=slice(size, size + n))
        h.update(data)
        size += len(data)
        if limit is not None and size > limit:
            return None
        if len(data) < n:
            return size, h.hexdigest()

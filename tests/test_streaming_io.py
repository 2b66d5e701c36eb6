"""The streaming writer's moving parts: write-behind flushing, the hash taken piece by piece on
the way out, and recycled buffers. Checked against independent implementations: the `safetensors`
package reads the file, the xxhash package hashes it whole."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import xxhash
from safetensors.numpy import load_file

from gptoss_convert.buffers import ALIGN_MIN_BYTES, MAP_MIN_BYTES, PAGE, BufferPool, RecyclingPool, empty
from gptoss_convert.io import files
from gptoss_convert.io.files import DirectWriter, WriteBehind, file_digest, hub_blob_sha256, write_new_file
from gptoss_convert.io.safetensors import ShardWriter, read_header, read_tensor


@pytest.mark.parametrize("direct, flush_every", [(True, None), (False, 4096), (False, 1 << 40)])
def test_shard_writer_streams_flushes_and_hashes(tmp_path, direct, flush_every):
    """O_DIRECT where the file system has it; else through the page cache, flushed all along / never."""
    rng = np.random.default_rng(3)
    big = rng.standard_normal((3, 700, 300)).astype(np.float32)        # 2.5 MB: several 1 MB pieces
    small = rng.integers(-5, 5, (7,), dtype=np.int64)
    half = rng.standard_normal((2, 5)).astype(ml_dtypes.bfloat16)
    path = tmp_path / "s.safetensors"
    w = ShardWriter(path, [("big", "F32", big.shape), ("small", "I64", small.shape), ("half", "BF16", half.shape)],
                    {"format": "pt"}, flush_every=flush_every or 256 << 20, direct=direct)
    assert w.direct == (direct and _has_o_direct(tmp_path))
    w.append("big", big[:1])                                           # row blocks, then whole tensors
    w.append("big", big[1:])
    w.write("small", small)
    w.write("half", half)
    digest = w.close()
    assert digest == xxhash.xxh3_128(path.read_bytes()).hexdigest()
    loaded = load_file(path)
    np.testing.assert_array_equal(loaded["big"], big)
    np.testing.assert_array_equal(loaded["small"], small)
    infos, _ = read_header(path)
    assert read_tensor(infos["half"]).tobytes() == half.tobytes()


def _has_o_direct(directory: Path) -> bool:
    """Whether files in `directory` can be opened with O_DIRECT (tmpfs, for one, refuses it)."""
    probe = directory / ".o_direct_probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except (AttributeError, OSError):
        return False
    finally:
        probe.unlink()


@pytest.fixture
def direct_dir(tmp_path) -> Path:
    """tmp_path, where its file system takes O_DIRECT (the tests that use it check O_DIRECT writes)."""
    if not _has_o_direct(tmp_path):
        pytest.skip(f"needs a file system with O_DIRECT for {tmp_path} (tmpfs, for one, has none)")
    return tmp_path


def _write_direct(path: Path, pieces: list[bytes], stage: int) -> DirectWriter:
    with open(path, "wb", buffering=0) as f:
        dw = DirectWriter.open(path, f.fileno(), stage=stage)
        assert dw is not None
        for piece in pieces:
            dw.write(memoryview(piece))
        dw.close()
    return dw


@pytest.mark.parametrize("total", [0, 1, 4095, 4096, 8192, 8193, 3 * 8192 + 123, 5 * 8192])
def test_direct_writer_writes_every_byte(direct_dir, total):
    """Stages of 8 KB, pieces of uneven sizes: stage boundaries, an aligned end, a ragged tail."""
    data = np.random.default_rng(total).integers(0, 256, total, dtype=np.uint8).tobytes()
    pieces = [data[i:i + 3000] for i in range(0, total, 3000)] + [data[:0]]
    path = direct_dir / "d.bin"
    dw = _write_direct(path, pieces, stage=8192)
    assert dw.direct_bytes == total - total % 4096                     # every whole page went O_DIRECT
    assert dw.active                                                   # never fell back
    assert path.read_bytes() == data


def test_direct_writer_unavailable_where_the_file_system_refuses(tmp_path, monkeypatch):
    """No O_DIRECT open: DirectWriter.open says so (the caller then writes through the page cache)."""
    from gptoss_convert.io import files

    def refuse(path, flags, *a):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(files.os, "open", refuse)
    assert DirectWriter.open(tmp_path / "d.bin", -1) is None


def _watch_direct_writes(monkeypatch, refuse: bool = False) -> list[int]:
    """Record the size of every O_DIRECT write io.files attempts; `refuse`: fail them with EINVAL,
    as a file system that takes O_DIRECT opens but not the writes does."""
    import errno

    from gptoss_convert.io import files
    real_open, real_pwrite, direct_fds, sizes = os.open, os.pwrite, set(), []

    def open_(path, flags, *a):
        fd = real_open(path, flags, *a)
        if flags & getattr(os, "O_DIRECT", 0):
            direct_fds.add(fd)
        return fd

    def pwrite(fd, data, offset):
        if fd not in direct_fds:
            return real_pwrite(fd, data, offset)
        sizes.append(len(data))
        if refuse:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(files.os, "open", open_)
    monkeypatch.setattr(files.os, "pwrite", pwrite)
    return sizes


def test_direct_writer_falls_back_when_writes_are_refused(direct_dir, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the writes (EINVAL): the rest goes through
    the ordinary descriptor, and the file still holds every byte."""
    attempts = _watch_direct_writes(monkeypatch, refuse=True)
    data = np.random.default_rng(0).integers(0, 256, 5 * 8192 + 77, dtype=np.uint8).tobytes()
    path = direct_dir / "d.bin"
    dw = _write_direct(path, [data[:10_000], data[10_000:]], stage=8192)
    assert attempts == [8192] and not dw.active and dw.direct_bytes == 0   # tried once, then the fallback
    assert path.read_bytes() == data


def _random_block(nbytes: int, seed: int) -> np.ndarray:
    data = empty((nbytes,), np.uint8)                                    # its own mapping: page-aligned
    data[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    assert data.ctypes.data % 4096 == 0
    return data


@pytest.mark.parametrize("extra", [0, 1, 4095, 4096 + 77])
def test_write_new_file_page_aligned_data_goes_direct(direct_dir, monkeypatch, extra):
    """A page-aligned block: its whole pages go with O_DIRECT straight from the block, the ragged
    rest and the trailer through the page cache; the file holds every byte, no temporary is left."""
    sizes = _watch_direct_writes(monkeypatch)
    data = _random_block(MAP_MIN_BYTES + extra, extra)
    path = direct_dir / "chunk"
    write_new_file(path, data, b"trailer!")
    assert path.read_bytes() == data.tobytes() + b"trailer!"
    assert sorted(p.name for p in direct_dir.iterdir()) == ["chunk"]
    assert sum(sizes) == data.size - data.size % 4096


def test_write_new_file_unaligned_memory_goes_through_the_page_cache(tmp_path, monkeypatch):
    """Memory off a page boundary is never handed to O_DIRECT; an existing file is replaced whole."""
    sizes = _watch_direct_writes(monkeypatch)
    data = _random_block(MAP_MIN_BYTES + 4096, 1)[1:]                     # one byte off the page
    path = tmp_path / "chunk"
    path.write_bytes(b"old contents")
    write_new_file(path, data, b"")
    assert sizes == [] and path.read_bytes() == data.tobytes()


def test_write_new_file_falls_back_when_direct_writes_are_refused(direct_dir, monkeypatch):
    sizes = _watch_direct_writes(monkeypatch, refuse=True)
    data = _random_block(MAP_MIN_BYTES + 123, 2)
    path = direct_dir / "chunk"
    write_new_file(path, data, b"end")
    assert path.read_bytes() == data.tobytes() + b"end"
    assert len(sizes) == 1                                              # tried once, then the page cache


def test_write_new_file_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    """A write error (disk full) leaves neither the file nor its temporary behind."""
    import errno

    from gptoss_convert.io import files

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        write_new_file(tmp_path / "chunk", np.arange(10, dtype=np.uint8), b"x")
    assert list(tmp_path.iterdir()) == []


def test_hub_blob_sha256_only_for_lfs_blobs(tmp_path):
    """A hub-cache snapshot links each file to blobs/<id>: an LFS file's id is the sha256 of its
    bytes (taken from the name, not read), a git-tracked file's id is a 40-hex git sha1 (not a
    sha256: None); a plain file is None too."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    shard = b"weights" * 1000
    sha = hashlib.sha256(shard).hexdigest()
    (blobs / sha).write_bytes(shard)
    (snap / "model.safetensors").symlink_to(Path("../..") / "blobs" / sha)
    (blobs / ("1" * 40)).write_text("{}")
    (snap / "config.json").symlink_to(Path("../..") / "blobs" / ("1" * 40))
    (tmp_path / "plain.safetensors").write_bytes(shard)
    assert hub_blob_sha256(snap / "model.safetensors") == sha
    assert hub_blob_sha256(snap / "config.json") is None
    assert hub_blob_sha256(tmp_path / "plain.safetensors") is None
    from gptoss_convert.converters.provenance import source_hashes
    assert source_hashes(snap, ["model.safetensors", "config.json"]) == {
        "model.safetensors": {"sha256": sha}, "config.json": {"xxh3_128": xxhash.xxh3_128(b"{}").hexdigest()}}


def test_write_behind_keeps_the_file_whole(tmp_path):
    path = tmp_path / "f.bin"
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb", buffering=0) as f:
        wb = WriteBehind(f.fileno(), every=64 << 10)
        for i in range(0, len(data), 10_000):                          # flushes of ranges behind the writer
            f.write(data[i:i + 10_000])
            wb.wrote(min(i + 10_000, len(data)))
        wb.close()
    assert path.read_bytes() == data


def test_buffer_pool_recycles_only_whole_buffers():
    pool = BufferPool(keep=1, min_bytes=16)
    a = pool.get((4, 8), np.float32)
    assert a.shape == (4, 8) and a.dtype == np.float32
    pool.put(a[1:])                                    # a view: never handed out again
    assert pool.get((3, 8), np.float32) is not a
    pool.put(a)
    assert pool.get((4, 8), np.float32) is a           # the same buffer back
    assert pool.get((4, 8), np.float32) is not a       # ... once
    b, c = np.empty((4, 8), np.float32), np.empty((4, 8), np.float32)
    pool.put(b)
    pool.put(c)                                        # over `keep`: dropped
    assert pool.get((4, 8), np.float32) is b and pool.get((4, 8), np.float32) is not c
    pool.put(np.empty(2, np.float32))                  # under min_bytes: not kept
    assert pool.get((2,), np.float32).shape == (2,)


@pytest.mark.parametrize("nbytes", [ALIGN_MIN_BYTES, 768 * 2048 * 2, MAP_MIN_BYTES - 2])
def test_empty_puts_mid_sized_blocks_on_a_page_boundary_and_pools_take_them(nbytes):
    """Blocks from ALIGN_MIN_BYTES up start on a page (the chunk writer writes those with
    O_DIRECT): Qwen3's [768, 2048] bf16 expert among them; both pools still recycle them."""
    a = empty((nbytes // 2,), np.uint16)
    assert a.ctypes.data % PAGE == 0 and a.nbytes == nbytes and a.flags.c_contiguous and a.flags.writeable
    a[...] = 3
    assert int(a.sum(dtype=np.int64)) == 3 * a.size
    pool = BufferPool(keep=1, min_bytes=1)
    pool.put(a[1:])                                    # a view: not recycled
    pool.put(a)
    assert pool.get(a.shape, a.dtype) is a
    r = RecyclingPool().empty((nbytes // 2,), np.uint16)
    assert r.ctypes.data % PAGE == 0
    assert empty((ALIGN_MIN_BYTES // 2 - 1,), np.uint16).base is None   # below: numpy's own allocator


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * (64 << 10) + 17])
def test_file_digest_from_mapped_windows_equals_xxhash_of_the_bytes(tmp_path, monkeypatch, size):
    """The digest from mappings, across window edges (windows shrunk to 64 KiB), equals the
    xxhash package's digest of the whole bytes, and the read() fallback gives the same."""
    import mmap
    monkeypatch.setattr(files, "DIGEST_WINDOW", max(mmap.ALLOCATIONGRANULARITY, 64 << 10))
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    want = xxhash.xxh3_128(data).hexdigest()
    assert file_digest(path) == want
    assert file_digest(path, "sha256") == hashlib.sha256(data).hexdigest()

    def refuse(*a, **k):
        raise OSError("no mmap here")
    monkeypatch.setattr(files.mmap, "mmap", refuse)
    assert file_digest(path, bufsize=4096) == want


def _mapping_flags(address: int) -> list[str] | None:
    """VmFlags of the mapping holding `address` in /proc/self/smaps (None: no such mapping)."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            current = lo <= address < hi
        elif head == "VmFlags:" and current:
            return line.split()[1:]
    return None


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc (no other OS here)")
def test_empty_maps_large_blocks_without_huge_pages():
    small = empty((8, 8), np.float32)
    assert small.base is None and small.shape == (8, 8)               # numpy's own allocator
    big = empty((MAP_MIN_BYTES // 2, 3), np.uint16)
    assert big.shape == (MAP_MIN_BYTES // 2, 3) and big.dtype == np.uint16
    assert big.flags.c_contiguous and big.flags.writeable
    big[...] = 7                                                       # usable memory, every byte
    assert int(big.sum(dtype=np.int64)) == 7 * big.size
    address = big.ctypes.data
    assert "nh" in _mapping_flags(address)                             # MADV_NOHUGEPAGE took
    pool = BufferPool(keep=2)
    pool.put(big[1:])                                                  # a view: not recycled
    pool.put(big)
    assert pool.get(big.shape, big.dtype) is big
    del big, pool
    assert _mapping_flags(address) is None                             # unmapped with the last reference


FAULTS_OF_REUSE = """
import resource, sys
import numpy as np
from gptoss_convert.buffers import keep_freed_memory
print(keep_freed_memory())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(64 << 20, np.uint8)             # a block over glibc's largest dynamic threshold (32 MB), freed
before = faults()
for _ in range(4):
    np.ones(64 << 20, np.uint8)         # the same size again: its pages faulted in anew, or reused
print((faults() - before) // 4)
"""


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux with glibc (no other OS here)")
@pytest.mark.parametrize("setting", ["", "default"])
def test_keep_freed_memory_reuses_large_blocks_instead_of_faulting_them_in(setting):
    """What keep_freed_memory is for: a freed 64 MB block's pages serve the next one (no page
    faults instead of hundreds), and GPTOSS_CONVERT_MALLOC=default leaves malloc alone.
    In a fresh process: the setting is per process."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_CONVERT_MALLOC"} | (
        {"GPTOSS_CONVERT_MALLOC": setting} if setting else {})
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_REUSE], env=env, capture_output=True, text=True, check=True)
    took, faults = out.stdout.split()
    if setting == "default":       # at least one fault per 2 MB (numpy asks for huge pages), mapped anew
        assert took == "False" and int(faults) >= (64 << 20) // (2 << 20)
    else:                           # the freed block, still mapped
        assert took == "True" and int(faults) < 8


def test_recycling_pool_takes_memory_back_only_when_the_last_view_is_gone():
    """What TensorStore's borrowed writes need: a block's memory is reused only after every
    reference to it (the array itself or any view of it) is gone, and then it comes back warm."""
    import gc
    pool = RecyclingPool(keep=1)
    shape = (MAP_MIN_BYTES // 4, 2)
    a = pool.empty(shape, np.uint16)
    a[...] = 5
    address = a.ctypes.data
    view = np.expand_dims(a, 0)[..., :1]                 # what a writer might hold on to
    del a
    gc.collect()
    b = pool.empty(shape, np.uint16)
    assert b.ctypes.data != address                      # still referenced: not handed out again
    assert int(view.sum()) == 5 * shape[0]               # and untouched
    del view
    gc.collect()
    c = pool.empty(shape, np.uint16)
    assert c.ctypes.data == address                      # the same (already mapped) memory
    assert "nh" in _mapping_flags(address)
    del b, c
    gc.collect()                                         # two come back, one is kept (keep=1)
    assert len(pool._free[math.prod(shape) * 2]) == 1
    small = pool.empty((3, 3), np.float32)               # small arrays: plain numpy
    assert small.base is None


def test_read_tensor_into_out(tmp_path):
    from gptoss_convert.io.safetensors import save_file
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    save_file({"x": x}, tmp_path / "x.safetensors")
    info = read_header(tmp_path / "x.safetensors")[0]["x"]
    out = np.full((2, 6), -1, np.float32)
    assert read_tensor(info, slice(1, 3), out=out) is out
    np.testing.assert_array_equal(out, x[1:3])
    with pytest.raises(ValueError, match="out"):
        read_tensor(info, slice(1, 3), out=np.empty((3, 6), np.float32))


def test_mapped_files_view_the_same_bytes_read_only(tmp_path):
    """MappedFiles gives the rows read_tensor reads, as read-only views of one map per file;
    the `safetensors` package wrote the file."""
    from safetensors.numpy import save_file

    from gptoss_convert.io.safetensors import MappedFiles
    rng = np.random.default_rng(0)
    tensors = {"a": rng.integers(0, 256, (5, 3, 16), dtype=np.uint8),
               "b": rng.standard_normal((7, 2)).astype(np.float32)}
    save_file(tensors, tmp_path / "x.safetensors")
    infos = read_header(tmp_path / "x.safetensors")[0]
    mapped = MappedFiles()
    for name, want in tensors.items():
        np.testing.assert_array_equal(mapped.view(infos[name]), want)
        rows = mapped.view(infos[name], slice(2, 4))
        np.testing.assert_array_equal(rows, want[2:4])
        np.testing.assert_array_equal(rows, read_tensor(infos[name], slice(2, 4)))
        assert not rows.flags.writeable
    assert len(mapped._maps) == 1


def test_mapped_files_refuse_a_range_past_the_end(tmp_path):
    """A shard cut short after its header was read, before or after it was mapped: the same
    one-line error as read_tensor, not SIGBUS."""
    from safetensors.numpy import save_file

    from gptoss_convert.errors import CorruptTensorError
    from gptoss_convert.io.safetensors import MappedFiles
    path = tmp_path / "x.safetensors"
    save_file({"a": np.zeros((4, 1024), np.uint8)}, path)
    info = read_header(path)[0]["a"]
    mapped = MappedFiles()
    np.testing.assert_array_equal(mapped.view(info, slice(2, 4)), 0)      # mapped while whole
    os.truncate(path, path.stat().st_size - 1500)                          # then cut short
    np.testing.assert_array_equal(mapped.view(info, slice(0, 2)), 0)      # rows still whole
    for read in (lambda: mapped.view(info, slice(2, 4)), lambda: read_tensor(info, slice(2, 4)),
                 lambda: MappedFiles().view(info, slice(2, 4))):         # mapped after the cut
        with pytest.raises(CorruptTensorError, match=r"x.safetensors: tensor 'a' is cut short \(548 of 2048 bytes\)"):
            read()


def _rss_file_kb() -> int:
    """This process's resident file-backed pages (kB), from /proc/self/status."""
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("RssFile:"))


def test_mapped_files_drop_takes_the_pages_out_of_rss(tmp_path):
    """Viewing a range maps its pages into the process (RSS grows by its size); drop() unmaps
    them, and a later view still reads the same bytes."""
    from safetensors.numpy import save_file

    from gptoss_convert.io.safetensors import MappedFiles
    data = np.random.default_rng(0).integers(0, 256, (64, 1 << 18), dtype=np.uint8)   # 16 MiB
    save_file({"a": data}, tmp_path / "x.safetensors")
    info = read_header(tmp_path / "x.safetensors")[0]["a"]
    mapped = MappedFiles()
    before = _rss_file_kb()
    assert int(mapped.view(info).sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))
    assert _rss_file_kb() - before > 12 << 10
    mapped.drop(info)
    assert _rss_file_kb() - before < 4 << 10
    np.testing.assert_array_equal(mapped.view(info, slice(3, 5)), data[3:5])


def test_read_ahead_hashes_stay_ahead_by_at_most_the_bound_and_hash_every_file(tmp_path, monkeypatch):
    """ReadAheadHashes (to-hf's source hash): files hashed block by block at most `ahead` blocks
    before the writer took them, then the rest; every digest that of the file on its own."""
    import threading
    import time

    from gptoss_convert.converters import provenance
    from gptoss_convert.io.files import file_digest

    names = [f"d/{i}" for i in range(12)]
    (tmp_path / "d").mkdir()
    for i, n in enumerate(names):
        (tmp_path / n).write_bytes(bytes([i]) * (1000 + i))
    read: list[str] = []
    lock = threading.Lock()

    def digest(path, *a, **k):
        with lock:
            read.append(Path(path).relative_to(tmp_path).as_posix())
        return file_digest(path, *a, **k)

    monkeypatch.setattr(provenance, "file_digest", digest)
    hasher = provenance.ReadAheadHashes(tmp_path, names, ahead=2)
    hasher.expect([[names[0], names[1]], [names[2]], [names[3]], [], [names[4], names[0]]])
    time.sleep(0.3)
    assert read == names[:3]                       # two blocks ahead of a writer that took none
    hasher.taken()
    time.sleep(0.3)
    assert read == names[:4]
    for _ in range(4):
        hasher.taken()
    got = hasher.result()                          # then every other file, each once
    assert sorted(read) == sorted(names) and len(read) == len(names) and read[:5] == names[:5]
    assert got == {n: {"xxh3_128": file_digest(tmp_path / n)} for n in names}


@pytest.mark.parametrize("size", [MAP_MIN_BYTES + 4096, MAP_MIN_BYTES + 1234, 5000])
def test_read_file_reads_every_byte_direct_or_not(tmp_path, size):
    """read_file (to-hf's read of a whole chunk file): with O_DIRECT into a page-aligned mapped
    buffer (sizes not a multiple of the page included: the tail comes short), or an ordinary
    read into numpy's own memory; the same bytes as the file either way, and the file's size."""
    from gptoss_convert.io.files import _aligned, read_file

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    pool = RecyclingPool(keep=1)
    buf = pool.empty((-(-size // 4096) * 4096,), np.uint8)
    assert _aligned(memoryview(buf)) == (size > MAP_MIN_BYTES)      # mapped memory: O_DIRECT
    assert read_file(tmp_path / "f", buf) == size and bytes(buf[:size]) == data
    small = np.zeros(size - 1000, np.uint8)                         # too small: its start, and the size
    assert read_file(tmp_path / "f", small) == size and bytes(small) == data[:size - 1000]

"""conversion.json: what produced an output, from what, and the checksum of every file."""

from __future__ import annotations

import datetime
import json
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gptoss_convert
from gptoss_convert.converters.stream import background
from gptoss_convert.io.files import HASH, file_digest, hub_blob_sha256, new_hash, temp_path, write_durably
from gptoss_convert.io.location import Location

RECORD = "conversion.json"
PROGRESS = ".gptoss-progress"  # the staging journal (converters/output.py), never part of an output


def hash_files(root: Path, names: list[str], workers: int | None = None) -> dict[str, str]:
    """{name: HASH digest} of many files, on several threads, largest first."""
    names = sorted(names, key=lambda f: -(root / f).stat().st_size)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return dict(zip(names, pool.map(lambda f: file_digest(root / f), names)))


def source_hashes(root: Path, names: list[str], workers: int | None = None) -> dict[str, dict[str, str]]:
    """{name: {algorithm: digest}} for the source files: the sha256 a hub-cache blob is named by
    (free, and comparable with the hub's own listing), else HASH read from the file."""
    named = {f: {"sha256": h} for f in names if (h := hub_blob_sha256(root / f))}
    rest = hash_files(root, [f for f in names if f not in named], workers)
    return named | {f: {HASH: h} for f, h in rest.items()}


class ReadAheadHashes:
    """The source's files hashed in the order a conversion reads them, a bounded distance ahead.

    A source bigger than memory (the 20b's BF16 Orbax checkpoint is 42 GB) was read from disk
    twice: once by the conversion and once, in another order, by the background hash. Here the
    hash reads each block's files just before the conversion does (at most `ahead` blocks
    before the writer takes them), so the conversion finds them in the page cache: one read
    from disk, and the hash's read doubles as read-ahead. `expect` queues each block's files
    (in the order the writer will take the blocks), `taken` says the writer took one, and
    `result()` hashes the rest of `files` (what no block read: shards a resumed run skipped,
    chunks that are not files) and returns source_hashes()'s map of `files`. `first` (the
    metadata every block depends on) is hashed before any block; `known()` gives what is hashed
    so far, so that the journal can release a unit as soon as the files it read are hashed."""

    def __init__(self, root: Path, files: list[str], ahead: int, first: list[str] = ()):
        self.root, self._files, self._wanted, self._first = root, files, set(files), list(first)
        self._blocks: queue.Queue = queue.Queue()
        self._room = threading.Semaphore(ahead)
        self._done: dict[str, str] = {}
        self._future = background(self._run)

    def expect(self, blocks: list[list[str]]) -> None:
        for files in blocks:
            self._blocks.put(files)

    def taken(self) -> None:
        self._room.release()

    def have(self, file: str, digest: str) -> None:
        """`file`'s digest, from bytes someone else read (then it is not read again)."""
        self._done[file] = digest

    def result(self) -> dict[str, dict[str, str]]:
        if not self._future.done():
            self._blocks.put(None)
        return self._future.result()

    def done(self) -> bool:
        """Whether every file is hashed: only once the writer is done (result() called)."""
        return self._future.done()

    def known(self) -> dict[str, dict[str, str]]:
        """The files of `files` hashed so far (as result() gives them)."""
        return {f: {HASH: d} for f, d in list(self._done.items()) if f in self._wanted}

    def _hash(self, files: list[str]) -> None:
        for f in files:
            if f not in self._done:
                self._done[f] = file_digest(self.root / f)

    def _run(self) -> dict[str, dict[str, str]]:
        self._hash([f for f in self._first if f in self._wanted])      # what every block reads (metadata)
        while (files := self._blocks.get()) is not None:
            self._room.acquire()
            self._hash(files)
        self._hash(self._files)
        return {f: {HASH: self._done[f]} for f in self._files}


def tree_files(root: Path) -> list[Path]:
    """Every regular file under `root` (relative), sorted, excluding the record (and its temporary
    file, which an interrupted write_record may leave behind) and the journal."""
    skip = (RECORD, temp_path(root / RECORD).name)
    files = (p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name not in skip)
    return sorted(p for p in files if p.parts[0] != PROGRESS)


def _digest(data: bytes) -> str:
    h = new_hash()
    h.update(data)
    return h.hexdigest()


def remote_outputs(out: Location, hashes: dict[str, str], sizes: dict[str, int],
                   pending: dict[str, bytes]) -> dict[str, dict]:
    """{key: {"size", HASH}} of every object under `out` (but the record and the journal) and of
    those `pending` (written after the record): the writer's figures where it has both, else
    the bytes hashed (objects read back)."""
    outputs = {}
    for key, data in pending.items():
        hashes[key], sizes[key] = _digest(data), len(data)
    for key in sorted(set(out.keys()) | set(pending)):
        if key == RECORD or key.split("/")[0] == PROGRESS:
            continue
        if key not in hashes or key not in sizes:
            data = (out / key).read_bytes()
            hashes[key], sizes[key] = _digest(data), len(data)
        outputs[key] = {"size": sizes[key], HASH: hashes[key]}
    return outputs


def write_record(out_dir: Path | Location, *, command: str, source_dir: Path, source_files: list[str],
                 options: dict, extra: dict | None = None, output_hashes: dict[str, str] | None = None,
                 output_sizes: dict[str, int] | None = None, pending: dict[str, bytes] | None = None) -> dict:
    """Write `out_dir/conversion.json`; HASH digests of outputs not given are computed from disk.
    Each file's entry names its hash's algorithm: {"size": n, "xxh3_128": hex} (or "sha256").

    `source_files` may instead be source_hashes()'s map (e.g. hashed in the background meanwhile).
    On an object store (`out_dir` a Location) `output_sizes` saves reading back those objects,
    and `pending` {key: bytes} are recorded before they are written (Orbax's commit marker)."""
    sources = source_files if isinstance(source_files, dict) else source_hashes(source_dir, source_files)
    hashes = dict(output_hashes or {})
    if isinstance(out_dir, Location):
        outputs = remote_outputs(out_dir, hashes, dict(output_sizes or {}), dict(pending or {}))
    else:
        files = [rel.as_posix() for rel in tree_files(out_dir)]
        hashes |= hash_files(out_dir, [f for f in files if f not in hashes])
        outputs = {f: {"size": (out_dir / f).stat().st_size, HASH: hashes[f]} for f in files}
    record = {
        "tool": "gptoss-convert", "version": gptoss_convert.__version__, "command": command,
        "argv": sys.argv, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "source": {"path": str(source_dir), "files": {
            # a bucket's objects come with their size (hash_source); files are sized here
            f: h if "size" in h else {"size": (source_dir / f).stat().st_size, **h} for f, h in sources.items()}},
        "outputs": outputs, **(extra or {}),
    }
    if isinstance(out_dir, Location):
        (out_dir / RECORD).write_text(json.dumps(record, indent=1))     # one PUT: atomic
    else:
        write_durably(out_dir / RECORD, json.dumps(record, indent=1))
    return record

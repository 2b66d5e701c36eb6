"""Reading a conversion record (`conversion.json`) as untrusted input.

The record lists every output file with its size and hash; `check` confirms a copy against it
and the readers (OrbaxSource, verify, generate) check what they read against it. Like every
file of a downloaded checkpoint it may be damaged or hostile, so it is read with a size limit,
its shape validated before use, and every path in it must stay inside the checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from gptoss_convert.errors import InputError
from gptoss_convert.io.files import HASH, HASHES, MAX_RECORD_BYTES, file_digest, object_digest, read_small

RECORD = "conversion.json"      # converters/provenance.py writes it under this name


def relative_inside(rel) -> bool:
    """Whether `rel` is a non-empty relative POSIX path that stays inside its root (no '..')."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and "." not in rel.split("/")


def _shape_problem(rec) -> str | None:
    """Why `rec` is not a conversion record this tool can use, or None."""
    if not isinstance(rec, dict) or not isinstance(rec.get("outputs"), dict):
        return "it must be an object with an 'outputs' object"
    for rel, meta in rec["outputs"].items():
        if not relative_inside(rel):
            return f"output {rel!r} is not a relative path inside the checkpoint"
        if not isinstance(meta, dict):
            return f"output {rel!r}: its entry is not an object"
    item = rec.get("maxtext_item", "0/items")
    if not relative_inside(item):
        return f"maxtext_item {item!r} is not a relative path inside the checkpoint"
    leaves = rec.get("leaves", {})
    is_shape = lambda s: isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in s)  # noqa: E731
    if not isinstance(leaves, dict) or not all(is_shape(s) for s in leaves.values()):
        return "'leaves' must map leaf paths to shapes (lists of integers)"
    if not isinstance(rec.get("options", {}), dict):
        return "'options' must be an object"
    return None


def read_record(path) -> dict:
    """The conversion record at `path` (a file or a Location), validated: InputError naming the
    file when it is over MAX_RECORD_BYTES, not JSON, or not shaped like a record."""
    try:
        rec = json.loads(read_small(path, MAX_RECORD_BYTES, RECORD))
    except (ValueError, RecursionError):     # not JSON / not UTF-8, absurdly deep nesting
        raise InputError(f"{path}: not a valid conversion record (not JSON); run the conversion again") from None
    if why := _shape_problem(rec):
        raise InputError(f"{path}: not a valid conversion record ({why}); run the conversion again")
    return rec


def recorded_hash(meta: dict) -> tuple[str, str] | None:
    """(algorithm, digest) of one recorded file: xxh3_128 now, sha256 in records written by
    earlier versions; None if the entry gives neither."""
    return next(((a, meta[a]) for a in HASHES if isinstance(meta.get(a), str)), None)


def link_in_path(root: Path, rel: str) -> bool:
    """Whether any component of `root/rel` below `root` is a symbolic link (so reading it could
    leave `root`); False for a path that does not exist."""
    p = Path(root)
    for part in PurePosixPath(rel).parts:
        p = p / part
        if os.path.islink(p):
            return True
    return False


def step_outputs(rec: dict, step: str) -> dict[str, dict]:
    """The record's entries for the files of step folder `step` ("0"), keyed relative to it."""
    head = step + "/"
    return {rel[len(head):]: meta for rel, meta in rec["outputs"].items() if rel.startswith(head)}


def digest_of(path, algorithm: str) -> str:
    """`algorithm` digest of a local file or an object, read in bounded pieces."""
    if isinstance(path, (str, os.PathLike)):
        return file_digest(Path(path), algorithm)
    return object_digest(path, algorithm=algorithm)[1]


def mismatch(path, algorithm: str) -> InputError:
    """The refusal of a file whose bytes are not the ones its record names."""
    return InputError(f"{path}: {algorithm} differs from its {RECORD} (corrupted or modified since it was "
                      "written); run `gptoss-convert check` on the checkpoint, and replace or reconvert it")


class RecordedFiles:
    """The files of one checkpoint folder (`root`) as its conversion record lists them: each file
    read through here is hashed and compared with the record, once. With no record (a checkpoint
    this tool did not write) nothing is checked; with one, a file it does not list is refused."""

    def __init__(self, root, outputs: dict[str, dict] | None):
        self.root, self.outputs = root, outputs
        self._verified: set[str] = set()

    @property
    def active(self) -> bool:
        """Whether there is a record to check against."""
        return self.outputs is not None

    def expected(self, file: str) -> tuple[str, str] | None:
        """(algorithm, digest) the record gives `file` (relative to root), or None."""
        meta = (self.outputs or {}).get(file)
        return recorded_hash(meta) if isinstance(meta, dict) else None

    def check_digest(self, file: str, digest: str, algorithm: str = HASH) -> None:
        """Compare a digest computed elsewhere (of bytes just read) with the record's; a record
        naming another algorithm leaves `file` to verify_file."""
        want = self.expected(file)
        if want is None or want[0] != algorithm:
            return
        if digest != want[1]:
            raise mismatch(self.root / file, algorithm)
        self._verified.add(file)

    def verify_file(self, file: str) -> None:
        """Hash `file` (once) and compare it with the record; refuse a file the record lacks."""
        if self.outputs is None or file in self._verified or not (self.root / file).is_file():
            return                   # (a missing file is reported by whoever reads it)
        want = self.expected(file)
        if want is None:
            raise InputError(f"{self.root / file}: not listed in {RECORD} (added or renamed since the conversion); "
                             "run `gptoss-convert check` on the checkpoint")
        if digest_of(self.root / file, want[0]) != want[1]:
            raise mismatch(self.root / file, want[0])
        self._verified.add(file)

    def verify_hashes(self, hashes: dict[str, dict[str, str]]) -> None:
        """Check {file: {algorithm: digest}} (as provenance computes them) against the record."""
        for file, digests in hashes.items():
            for algorithm, digest in (digests or {}).items():
                if algorithm in HASHES and isinstance(digest, str):
                    self.check_digest(file, digest, algorithm)

    def verify_all(self) -> None:
        """Hash every recorded file present under root (bounded memory: pieces of 1 MiB)."""
        for file in sorted(self.outputs or {}):
            if (self.root / file).is_file():
                self.verify_file(file)

"""`gptoss-convert check OUT`: re-read a finished output and confirm it against its conversion.json.

For a copy moved between machines or buckets: every recorded file must exist with its size and
hash (xxh3-128; sha256 in records of earlier versions), no unrecorded file may appear, and
(Orbax) every leaf's shape/dtype and the leaf count must match the record; (safetensors) every
shard header must parse and agree with the index.
"""

from __future__ import annotations

import os
from pathlib import Path

from gptoss_convert.converters.provenance import PROGRESS, RECORD, tree_files
from gptoss_convert.errors import ConvertError, InputError, ProblemList, problem_report
from gptoss_convert.io.files import HASHES, file_digest
from gptoss_convert.io.location import Location, is_url, resolve
from gptoss_convert.io.files import object_digest
from gptoss_convert.io.orbax_source import COMMIT_FILE, uncommitted_allowed
from gptoss_convert.io.record import link_in_path, read_record, recorded_hash
from gptoss_convert.progress import progress


class CheckFailed(ProblemList, ConvertError):
    """The output does not match its record: every problem, one per line (capped)."""

    exit_code = 5

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        super().__init__(problem_report(message, self.problems) if problems else message)


def _record(out: Path) -> dict:
    path = out / RECORD
    if not path.is_file():
        raise InputError(f"{path}: missing; only outputs of gptoss-convert carry a conversion record")
    return read_record(path)     # size-limited, shape-checked, paths contained


_recorded_hash = recorded_hash


def _check_objects(out: Location, rec: dict) -> list[str]:
    """_check_files for an object-store prefix: every object read back and hashed."""
    problems = []
    present = {k for k in out.keys() if k != RECORD}
    for rel, meta in sorted(rec["outputs"].items()):
        recorded = _recorded_hash(meta)
        if rel not in present:
            problems.append(f"{rel}: missing")
            continue
        if recorded is None:
            problems.append(f"{rel}: the record gives no hash this version knows ({', '.join(HASHES)})")
            continue
        size = meta.get("size")
        got = object_digest(out / rel, limit=size if isinstance(size, int) else 0, algorithm=recorded[0])
        if got is None or got[0] != size:       # read in pieces, never past the recorded size + 1
            problems.append(f"{rel}: size {'larger than that' if got is None else got[0]} != recorded {size}")
        elif got[1] != recorded[1]:
            problems.append(f"{rel}: {recorded[0]} differs from the record (corrupted or modified)")
    problems += [f"{rel}: not part of the recorded output" for rel in sorted(present - set(rec["outputs"]))]
    return problems


def _check_files(out: Path, rec: dict) -> list[str]:
    if isinstance(out, Location):
        return _check_objects(out, rec)
    problems = []
    present = {p.as_posix() for p in tree_files(out)}
    with progress(sum(map(_size, rec["outputs"].values())), "check") as bar:
        for rel, meta in sorted(rec["outputs"].items()):
            _check_file(out, rel, meta, present, problems)
            bar.update(_size(meta))
    problems += [f"{rel}: not part of the recorded output" for rel in sorted(present - set(rec["outputs"]))]
    return problems


def _size(meta) -> int:
    """A recorded file's size for the progress report (0 where the record gives none)."""
    size = meta.get("size") if isinstance(meta, dict) else None
    return size if isinstance(size, int) and size > 0 else 0


def _check_file(out: Path, rel: str, meta: dict, present: set, problems: list) -> None:
    """One recorded file: there, a regular file, its size and hash as recorded."""
    f = out / rel
    if rel not in present:
        problems.append(f"{rel}: missing")
    elif link_in_path(out, rel):
        problems.append(f"{rel}: is a symbolic link (or under one); an output holds regular files only, "
                        "and check follows no link out of it")
    elif f.stat().st_size != meta.get("size"):
        problems.append(f"{rel}: size {f.stat().st_size} != recorded {meta.get('size')}")
    elif (recorded := _recorded_hash(meta)) is None:
        problems.append(f"{rel}: the record gives no hash this version knows ({', '.join(HASHES)})")
    elif file_digest(f, recorded[0]) != recorded[1]:
        problems.append(f"{rel}: {recorded[0]} differs from the record (corrupted or modified)")


def _check_orbax(out: Path, rec: dict) -> list[str]:
    from gptoss_convert.io.orbax_reader import read_metadata
    item = rec.get("maxtext_item", "0/items")           # relative and without '..' (read_record)
    if not isinstance(out, Location) and link_in_path(out, item):
        return [f"maxtext_item {item}: is a symbolic link (or under one); check follows no link out of OUT"]
    try:
        leaves = read_metadata(out / item)["leaves"]
    except (InputError, OSError, ValueError, KeyError) as e:
        return [f"Orbax metadata unreadable: {e}"]
    want = {p: tuple(s) for p, s in rec.get("leaves", {}).items()}
    dtype = rec.get("options", {}).get("dtype")
    problems = [] if len(leaves) == len(want) else [f"{len(leaves)} leaves, record says {len(want)}"]
    for p, s in want.items():
        if p not in leaves:
            problems.append(f"leaf {p}: missing from the Orbax metadata")
        elif tuple(leaves[p][0]) != s or (dtype and str(leaves[p][1]) != dtype):
            problems.append(f"leaf {p}: {leaves[p][1]}{list(leaves[p][0])}, record says {dtype}{list(s)}")
    return problems


def _check_safetensors(out: Path) -> list[str]:
    from gptoss_convert.io.hf_checkpoint import HFCheckpoint
    if isinstance(out, Location):       # every object was read back and hashed against the record
        return []
    try:
        HFCheckpoint(out)
    except InputError as e:
        return [e.one_line()]
    return []


def check(out: str | os.PathLike, log=print, *, allow_uncommitted: bool | None = None) -> dict:
    """Confirm `out` (a directory, or a gs:// or s3:// prefix) against its conversion.json;
    raises CheckFailed listing every problem. A to-orbax output whose step lacks its commit
    marker fails, naming it, unless `allow_uncommitted` (None: as
    allowing_uncommitted says; then the rest is still checked)."""
    out = resolve(out)
    if is_url(out) and (out / PROGRESS / "plan.json").is_file():
        raise CheckFailed(f"{out}: the conversion writing it did not finish ({PROGRESS}/ is still there); "
                          "rerun it with --resume")
    if not out.is_dir():
        raise InputError(f"{out}: not a directory" + (" (no object under this prefix)" if is_url(out) else ""))
    rec = _record(out)
    problems = _check_files(out, rec)
    orbax = "maxtext_item" in rec or rec.get("command") == "to-orbax"     # merge-lora --to-orbax writes one too
    if orbax:
        marker = f"{rec.get('maxtext_item', '0/items').split('/')[0]}/{COMMIT_FILE}"
        if uncommitted_allowed(allow_uncommitted):
            problems = [p for p in problems if p != f"{marker}: missing"]
        else:
            problems = [p + (" (the step's commit marker: an unfinished save or a damaged copy; --allow-uncommitted "
                             "checks the rest)" if p == f"{marker}: missing" else "") for p in problems]
    # the tree's problems first: one link or a wrong leaf explains many file problems after it
    if orbax:
        problems = _check_orbax(out, rec) + problems
    else:
        problems += _check_safetensors(out)
    if problems:
        raise CheckFailed(f"{out}", problems)
    log(f"check: OK — {len(rec['outputs'])} files match {RECORD} "
        f"({rec.get('command')}, gptoss-convert {rec.get('version')})")
    return rec

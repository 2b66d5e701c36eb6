"""`gptoss-convert check OUT`: re-read a finished output and confirm it against its conversion.json.

For a copy moved between machines or buckets: every recorded file must exist with its size and
hash (xxh3-128; sha256 in records of earlier versions), no unrecorded file may appear, and
(Orbax) every leaf's shape/dtype and the leaf count must match the record; (safetensors) every
shard header must parse and agree with the index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gptoss_convert.converters.provenance import PROGRESS, RECORD, tree_files
from gptoss_convert.errors import ConvertError, InputError
from gptoss_convert.io.files import HASHES, file_digest
from gptoss_convert.io.location import Location, is_url, resolve


class CheckFailed(ConvertError):
    exit_code = 5


def _record(out: Path) -> dict:
    path = out / RECORD
    if not path.is_file():
        raise InputError(f"{path}: missing; only outputs of gptoss-convert carry a conversion record")
    try:
        rec = json.loads(path.read_text())
        assert isinstance(rec.get("outputs"), dict)
    except (ValueError, AssertionError, AttributeError, RecursionError):   # not JSON, not an object, absurdly nested
        raise InputError(f"{path}: not a valid conversion record") from None
    return rec


def _recorded_hash(meta: dict) -> tuple[str, str] | None:
    """(algorithm, digest) of one recorded file: xxh3_128 now, sha256 in records written by
    earlier versions (still verified)."""
    return next(((a, meta[a]) for a in HASHES if isinstance(meta.get(a), str)), None)


def _check_objects(out: Location, rec: dict) -> list[str]:
    """_check_files for an object-store prefix: every object read back and hashed."""
    problems = []
    present = {k for k in out.keys() if k != RECORD}
    for rel, meta in sorted(rec["outputs"].items()):
        recorded = _recorded_hash(meta)
        if rel not in present:
            problems.append(f"{rel}: missing")
            continue
        data = (out / rel).read_bytes()
        if len(data) != meta.get("size"):
            problems.append(f"{rel}: size {len(data)} != recorded {meta.get('size')}")
        elif recorded is None:
            problems.append(f"{rel}: the record gives no hash this version knows ({', '.join(HASHES)})")
        elif HASHES[recorded[0]](data).hexdigest() != recorded[1]:
            problems.append(f"{rel}: {recorded[0]} differs from the record (corrupted or modified)")
    problems += [f"{rel}: not part of the recorded output" for rel in sorted(present - set(rec["outputs"]))]
    return problems


def _check_files(out: Path, rec: dict) -> list[str]:
    if isinstance(out, Location):
        return _check_objects(out, rec)
    problems = []
    present = {p.as_posix() for p in tree_files(out)}
    for rel, meta in sorted(rec["outputs"].items()):
        f = out / rel
        if rel not in present:
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != meta.get("size"):
            problems.append(f"{rel}: size {f.stat().st_size} != recorded {meta.get('size')}")
        elif (recorded := _recorded_hash(meta)) is None:
            problems.append(f"{rel}: the record gives no hash this version knows ({', '.join(HASHES)})")
        elif file_digest(f, recorded[0]) != recorded[1]:
            problems.append(f"{rel}: {recorded[0]} differs from the record (corrupted or modified)")
    problems += [f"{rel}: not part of the recorded output" for rel in sorted(present - set(rec["outputs"]))]
    return problems


def _check_orbax(out: Path, rec: dict) -> list[str]:
    from gptoss_convert.io.orbax_reader import read_metadata
    try:
        leaves = read_metadata(out / rec.get("maxtext_item", "0/items"))["leaves"]
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


def check(out: str | os.PathLike, log=print) -> dict:
    """Confirm `out` (a directory, or a gs:// or s3:// prefix) against its conversion.json;
    raises CheckFailed listing every problem."""
    out = resolve(out)
    if is_url(out) and (out / PROGRESS / "plan.json").is_file():
        raise CheckFailed(f"{out}: the conversion writing it did not finish ({PROGRESS}/ is still there); "
                          "rerun it with --resume")
    if not out.is_dir():
        raise InputError(f"{out}: not a directory" + (" (no object under this prefix)" if is_url(out) else ""))
    rec = _record(out)
    problems = _check_files(out, rec)
    problems += _check_orbax(out, rec) if rec.get("command") == "to-orbax" else _check_safetensors(out)
    if problems:
        raise CheckFailed(f"{out}: {len(problems)} problem(s): " + "; ".join(problems))
    log(f"check: OK — {len(rec['outputs'])} files match {RECORD} ({rec.get('command')}, gptoss-convert {rec.get('version')})")
    return rec

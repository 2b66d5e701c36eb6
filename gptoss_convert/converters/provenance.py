"""conversion.json: what produced an output, from what, and the checksum of every file."""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
from pathlib import Path

import gptoss_convert
from gptoss_convert.io.files import write_durably

RECORD = "conversion.json"
PROGRESS = ".gptoss-progress"  # the staging journal (converters/output.py), never part of an output


def sha256_file(path: Path, bufsize: int = 8 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def tree_files(root: Path) -> list[Path]:
    """Every regular file under `root` (relative), sorted, excluding the record (and its temporary
    file, which an interrupted write_record may leave behind) and the journal."""
    files = (p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name not in (RECORD, RECORD + ".tmp"))
    return sorted(p for p in files if p.parts[0] != PROGRESS)


def write_record(out_dir: Path, *, command: str, source_dir: Path, source_files: list[str],
                 options: dict, extra: dict | None = None, output_hashes: dict[str, str] | None = None) -> dict:
    """Write `out_dir/conversion.json`; hashes of outputs not given are computed from disk."""
    hashes = dict(output_hashes or {})
    outputs = {}
    for rel in tree_files(out_dir):
        key = rel.as_posix()
        outputs[key] = {"size": (out_dir / rel).stat().st_size,
                        "sha256": hashes.get(key) or sha256_file(out_dir / rel)}
    record = {
        "tool": "gptoss-convert", "version": gptoss_convert.__version__, "command": command,
        "argv": sys.argv, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "source": {"path": str(source_dir), "files": {
            f: {"size": (source_dir / f).stat().st_size, "sha256": sha256_file(source_dir / f)} for f in source_files}},
        "outputs": outputs, **(extra or {}),
    }
    write_durably(out_dir / RECORD, json.dumps(record, indent=1))
    return record

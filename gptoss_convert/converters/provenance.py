"""conversion.json: what produced an output, from what, and the checksum of every file."""

from __future__ import annotations

import datetime
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gptoss_convert
from gptoss_convert.io.files import sha256_file, temp_path, write_durably

RECORD = "conversion.json"
PROGRESS = ".gptoss-progress"  # the staging journal (converters/output.py), never part of an output


def sha256_files(root: Path, names: list[str], workers: int | None = None) -> dict[str, str]:
    """sha256 of many files on all cores (hashlib releases the GIL), largest first."""
    names = sorted(names, key=lambda f: -(root / f).stat().st_size)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return dict(zip(names, pool.map(lambda f: sha256_file(root / f), names)))


def tree_files(root: Path) -> list[Path]:
    """Every regular file under `root` (relative), sorted, excluding the record (and its temporary
    file, which an interrupted write_record may leave behind) and the journal."""
    skip = (RECORD, temp_path(root / RECORD).name)
    files = (p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name not in skip)
    return sorted(p for p in files if p.parts[0] != PROGRESS)


def write_record(out_dir: Path, *, command: str, source_dir: Path, source_files: list[str],
                 options: dict, extra: dict | None = None, output_hashes: dict[str, str] | None = None) -> dict:
    """Write `out_dir/conversion.json`; hashes of outputs not given are computed from disk.

    `source_files` may instead be a {name: sha256} map (e.g. hashed in the background meanwhile)."""
    source_hashes = source_files if isinstance(source_files, dict) else sha256_files(source_dir, source_files)
    hashes = dict(output_hashes or {})
    files = [rel.as_posix() for rel in tree_files(out_dir)]
    hashes |= sha256_files(out_dir, [f for f in files if f not in hashes])
    outputs = {f: {"size": (out_dir / f).stat().st_size, "sha256": hashes[f]} for f in files}
    record = {
        "tool": "gptoss-convert", "version": gptoss_convert.__version__, "command": command,
        "argv": sys.argv, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": options,
        "source": {"path": str(source_dir), "files": {
            f: {"size": (source_dir / f).stat().st_size, "sha256": h} for f, h in source_hashes.items()}},
        "outputs": outputs, **(extra or {}),
    }
    write_durably(out_dir / RECORD, json.dumps(record, indent=1))
    return record

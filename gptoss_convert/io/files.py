"""Small durable-file helpers shared by the writers and readers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gptoss_convert.errors import InputError


def fsync_dir(directory: Path) -> None:
    """Make a rename/creation inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

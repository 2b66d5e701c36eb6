"""The published gpt-oss config.json files, verbatim, as package data."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
PUBLISHED = ("gpt-oss-20b", "gpt-oss-120b")


def published_config_path(name: str) -> Path:
    """Path of the `config.json` that openai/<name> publishes (copied verbatim)."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown published model {name!r}; known: {', '.join(PUBLISHED)}")
    return DATA / f"{name}.config.json"


def published_config(name: str) -> dict:
    """A fresh copy of the published `config.json` of openai/<name>."""
    return json.loads(published_config_path(name).read_text())

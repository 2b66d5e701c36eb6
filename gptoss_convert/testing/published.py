"""The published gpt-oss config.json files, verbatim, as package data; and the variants'.

openai/gpt-oss-safeguard-20b and -120b are fine-tunes of gpt-oss-20b/120b with the same
architecture. Their exact published config.json text could not be retrieved here, so
`gpt-oss-safeguard-*.config.json` are modeled on gpt-oss-20b's/120b's (architectures
[GptOssForCausalLM], model_type gpt_oss, the same fields); replace them with the published text
when it is at hand."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
PUBLISHED = ("gpt-oss-20b", "gpt-oss-120b")
VARIANTS = ("gpt-oss-safeguard-20b", "gpt-oss-safeguard-120b")     # same architecture (see above)


def published_config_path(name: str) -> Path:
    """Path of the `config.json` that openai/<name> publishes (copied verbatim)."""
    if name not in PUBLISHED + VARIANTS:
        raise ValueError(f"unknown published model {name!r}; known: {', '.join(PUBLISHED + VARIANTS)}")
    return DATA / f"{name}.config.json"


def published_config(name: str) -> dict:
    """A fresh copy of the published `config.json` of openai/<name>."""
    return json.loads(published_config_path(name).read_text())

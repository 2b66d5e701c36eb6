"""Model families, registered by their HF `model_type`."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from gptoss_convert.errors import InputError


@dataclasses.dataclass(frozen=True)
class Backend:
    """What a model family provides to the converters and the verifier."""

    model_type: str
    config_from_dict: Callable[[dict, str], Any]     # HF config.json -> typed config (allowlist)
    flat_shapes: Callable[[Any, bool], dict]         # (cfg, scanned) -> {target path: shape}
    layout_for: Callable[[Any, bool], Any]           # (cfg, scanned) -> backends.layout.Layout
    rules: Callable[[Any], list]                     # cfg -> mapping table (converters.plan.Rule)

# model_type -> module exposing BACKEND. One line per family.
_BACKENDS = {
    "gpt_oss": "gptoss_convert.backends.gpt_oss",
}


def known_model_types() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(model_type: str):
    """The backend for `model_type`; unknown types fail at once and list the known ones."""
    if model_type not in _BACKENDS:
        raise InputError(f"model_type {model_type!r} is not supported; known model types: {', '.join(known_model_types())}")
    return importlib.import_module(_BACKENDS[model_type]).BACKEND

"""Helpers shared by the converting commands that read an HF source: sizes and the checked plan."""

from __future__ import annotations

import re

from gptoss_convert.converters.plan import Plan, build_plan, edges_from_rules
from gptoss_convert.converters.sources import backend_for
from gptoss_convert.errors import ConvertError, InputError
from gptoss_convert.io.hf_checkpoint import HFCheckpoint

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConvertError(f"size {size!r} not understood; write e.g. 5GB or 500MiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ConvertError(f"size {size!r} must be positive")
    return value


def source_shapes(ck: HFCheckpoint) -> dict[str, tuple[tuple[int, ...], str]]:
    return {n: (t.shape, t.dtype) for n, t in ck.tensors.items()}


def config_for(ck: HFCheckpoint, *, strict: bool = False):
    """(backend, config) for `ck`'s config.json under the config policy (sources.backend_for)."""
    return backend_for(ck.config_raw, ck.dir / "config.json", strict=strict)


def plan_for(ck: HFCheckpoint, *, scanned: bool, itemsize: int, block_bytes: int | None = None,
             strict_config: bool = False):
    """(backend, config, checked Plan) for converting `ck` to the backend's parameter tree."""
    backend, cfg = config_for(ck, strict=strict_config)
    edges = edges_from_rules(backend.rules(cfg), cfg.L, backend.layout_for(cfg, scanned))
    kw = {} if block_bytes is None else {"block_bytes": block_bytes}
    plan: Plan = build_plan(source_shapes(ck), backend.flat_shapes(cfg, scanned), edges, itemsize=itemsize, **kw)
    return backend, cfg, plan


def check_against_backend(ck: HFCheckpoint, *, strict_config: bool = False):
    """Validate every tensor of `ck` against its config (the to-orbax plan, never executed);
    returns the config."""
    _, cfg, _ = plan_for(ck, scanned=False, itemsize=2, strict_config=strict_config)
    float_kinds = {"BF16", "F16", "F32", "MXFP4", "FP8"}
    bad = [f"{n!r} is {t.dtype}" for n, t in ck.tensors.items() if t.dtype not in float_kinds]
    if bad:
        raise InputError(f"{ck.dir}: tensors with non-float dtypes: {', '.join(bad)}")
    return cfg

"""`gptoss-convert demo`: the whole pipeline on a tiny gpt-oss checkpoint generated on the spot."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def demo(workdir: str | os.PathLike = "demo-out", *, moe: str = "ragged_dot", progress: bool = True,
         log=print) -> list[dict]:
    """Generate a tiny MXFP4 gpt-oss (with tokenizer), then dequantize, to-orbax --scanned and
    --unscanned, golden and verify each output (a progress line per step unless not
    `progress`). Prints one table; returns its rows."""
    from gptoss_convert.progress import step as progress_step
    from gptoss_convert.converters.dequantize import dequantize
    from gptoss_convert.converters.to_orbax import to_orbax
    from gptoss_convert.testing import tiny_config, write_checkpoint
    from gptoss_convert.verify.golden import golden
    from gptoss_convert.verify.verify import verify

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, bf16 = work / "gpt-oss-tiny-mxfp4", work / "gpt-oss-tiny-bf16"
    scanned, unscanned, gold = work / "orbax-scanned", work / "orbax-unscanned", work / "golden.jsonl"
    quiet = dict(progress=False, log=lambda *_: None, overwrite=True)
    rows: list[dict] = []

    def step(name: str, fn, out: Path | None):
        t0 = time.perf_counter()
        with progress_step(f"demo {len(rows) + 1}/8: {name}", progress):
            result = fn()
        if isinstance(result, dict):
            verdict = "PASS" if result.get("pass") else "FAIL"
        else:
            verdict = "ok"
        rows.append({"step": name, "seconds": time.perf_counter() - t0, "bytes": _size(out) if out else None,
                     "verdict": verdict})
        return result

    step("generate tiny MXFP4 gpt-oss", lambda: write_checkpoint(src, tiny_config(), fmt="mxfp4"), src)
    step("dequantize -> HF BF16", lambda: dequantize(src, bf16, **quiet), bf16)
    step("to-orbax --scanned", lambda: to_orbax(src, scanned, scanned=True, **quiet), scanned)
    step("to-orbax --unscanned", lambda: to_orbax(src, unscanned, scanned=False, **quiet), unscanned)
    step("golden (HF transformers)", lambda: golden(src, gold, log=lambda *_: None), gold)
    for name, ck, strategy in (("verify orbax-scanned", scanned, moe), ("verify orbax-unscanned", unscanned, "dense"),
                               ("verify HF BF16", bf16, moe)):
        step(f"{name} (moe={strategy})",
             lambda ck=ck, s=strategy: verify(ck, golden=gold, moe=s, log=lambda *_: None), None)
    log(_table(rows, work))
    return rows


def _table(rows: list[dict], work: Path) -> str:
    lines = [f"{'step':<38} {'time':>8} {'size':>10}  verdict", "-" * 68]
    for r in rows:
        size = "" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f} MB"
        lines.append(f"{r['step']:<38} {r['seconds']:>7.2f}s {size:>10}  {r['verdict']}")
    lines.append(f"total {sum(r['seconds'] for r in rows):.1f} s; outputs in {work}/")
    return "\n".join(lines)

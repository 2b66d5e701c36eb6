"""`verify OUT --hf SRC` at full size on one CPU box: the streamed transformers golden, then the
streamed JAX verify, on a synthetic gpt-oss-20b with every real shape (the published config,
vocab 201088) and *dense* random values, so the logits mean something.

    python -m benchmarks.bench_verify_fullsize --workdir /work/bench-golden [--layers 24] [--json out.json]

benchmarks/synthetic.py writes random bit patterns (finite, but most BF16 values are denormal-small
and the norms random): fine for converters, useless for a golden. Here every BF16 tensor is
normal (embedding std 1, norms 1 ± 0.1, projections/router/LM head std 0.02, sinks std 1) and
the MXFP4 experts have random codes with scales 2^-9..2^-6 (values ~0.01). Then `to-orbax
--scanned` (BF16) and one `verify OUT --hf SRC --tokens FILE --streamed --json R` in a fresh
process: wall time and peak RSS of each half from the report's "phases" (the peak is reset
between them through /proc/self/clear_refs) and of the command (the larger of the two). Token ids are random (the
synthetic checkpoint has no tokenizer): 4 prompts of 5, 5, 4 and `--long` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import synthetic
from benchmarks.common import machine
from gptoss_convert.io.safetensors import DTYPES

SCALES = (118, 122)           # MXFP4 scale bytes: 2^-9 .. 2^-6 times FP4 codes up to 6


def dense_random(rng, name: str, dtype: str, shape) -> np.ndarray:
    """Dense random values for tensor `name` (see the module docstring)."""
    if name.endswith("_scales"):
        return rng.integers(*SCALES, shape, dtype=np.uint8)
    if dtype == "U8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        x = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
    elif name.endswith("embed_tokens.weight") or name.endswith("sinks"):
        x = rng.standard_normal(shape, np.float32)
    else:
        x = 0.02 * rng.standard_normal(shape, np.float32)
    return x.astype(DTYPES["BF16"])


def write_source(out: Path, layers: int) -> Path:
    """The synthetic MXFP4 checkpoint (published 20b config cut to `layers`), dense values."""
    synthetic._random = dense_random                  # the writer's value generator, for this run
    return synthetic.write(out, cfg=synthetic.config("20b", layers), shard_bytes=5 << 30)


def run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS GiB, exit code) of `cmd` in a fresh process (wait4's ru_maxrss)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd)
    _, status, ru = os.wait4(p.pid, 0)
    return time.perf_counter() - t0, ru.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status)


def tokens_file(path: Path, vocab: int, long: int) -> Path:
    rng = np.random.default_rng(0)
    path.write_text(json.dumps([rng.integers(0, vocab, n).tolist() for n in (5, 5, 4, long)]))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="~60 GB free at 24 layers (source 14 GB, Orbax 42 GB)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--long", type=int, default=300, help="tokens of the long prompt")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "gptoss_convert"]
    t0 = time.perf_counter()
    src = write_source(work / f"dense-20b-{a.layers}L", a.layers)
    row = {"layers": a.layers, "source_s": round(time.perf_counter() - t0, 1)}
    out = work / f"orbax-{a.layers}L"
    if not (out / "0").is_dir():
        secs, rss, rc = run_measured(py + ["to-orbax", str(src), str(out), "--scanned", "--no-progress"])
        assert rc == 0, rc
        row |= {"to_orbax_s": round(secs, 1), "to_orbax_peak_GiB": round(rss, 2)}
    toks = tokens_file(work / "tokens.json", 201088, a.long)
    report = work / f"verify-{a.layers}L.json"
    secs, rss, rc = run_measured(py + ["verify", str(out), "--hf", str(src), "--tokens", str(toks),
                                       "--streamed", "--json", str(report)])
    rep = (json.loads(report.read_text())["result"] or {}) if report.is_file() else {}     # --json: the summary
    # verify resets the kernel's high-water mark between its halves, so wait4's figure is the
    # last half's peak: the command's peak is the larger of the halves'
    peaks = [p["peak_rss_GiB"] for p in (rep.get("phases") or {}).values()] + [rss]
    row |= {"verify_rc": rc, "verify_s": round(secs, 1), "verify_peak_GiB": round(max(peaks), 2),
            "phases": rep.get("phases"), "coverage": (rep.get("coverage") or {}).get("summary"),
            "worst": {k: max(p[k] for p in rep.get("prompts", [{k: None}])) for k in ("max_abs_diff", "max_kl")}
            if rep.get("prompts") else None, "machine": machine(),
            "maxrss_self_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    print(json.dumps(row, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

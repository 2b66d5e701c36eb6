"""MXFP4 decode benchmark: our numpy codec vs transformers' `convert_moe_packed_tensors` (torch CPU)
on one gpt-oss-20b layer of experts (random bytes in the real shapes), bf16 output.

    python -m benchmarks.bench_codec [--repeats 5] [--json codec.json]

Timing: all methods in one process, interleaved repeat by repeat so that they share the noise of
a shared machine; median per method; GB/s = bf16 bytes produced / second. transformers returns
[E, in, out], so `dequantize_transposed` is the like-for-like row. `dequantize` keeps the stored
[E, out, in]; it runs once into fresh arrays and once into a reused `out=` buffer (no page faults
for the output: the decode alone, as a converter that reuses its buffer sees it). The baseline row allocates and
fills the same output bytes without decoding: the floor any fresh-output method pays here.
Peak RSS: each method runs once more in its own subprocess, which reports its RSS before the
call (inputs, imports) and its peak during it, so peaks of different methods never mix.
The numpy path uses no BLAS: it is also timed in children with OPENBLAS_CORETYPE unset and
forced to the oldest kernel (Prescott); equal times, within noise, show the setting is moot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from benchmarks.common import machine, markdown_table, median_seconds, run_isolated

# gpt-oss-20b, one layer: [E, rows (out), G (in / 32)]; blocks add a trailing 16.
LAYER_SHAPES = {"gate_up_proj": (32, 5760, 90), "down_proj": (32, 2880, 90)}
OUT_BYTES = sum(int(np.prod(s)) * 32 * 2 for s in LAYER_SHAPES.values())      # bf16 output of the layer

OURS = "ours dequantize [E,out,in]"
OURS_OUT = "ours dequantize out= reused [E,out,in]"
OURS_T = "ours dequantize_transposed [E,in,out]"
HF = "transformers convert_moe_packed_tensors [E,in,out]"
FILL = "baseline: np.empty + fill of the output, no decode"
METHODS = (OURS, OURS_OUT, OURS_T, HF, FILL)


def make_layer(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random block bytes; scale bytes 110..126 as in the released checkpoints (finite values)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.integers(0, 256, (*shape, 16), dtype=np.uint8),
                   rng.integers(110, 127, shape, dtype=np.uint8)) for name, shape in LAYER_SHAPES.items()}


def method(name: str):
    """(blocks, scales) -> decoded bf16 array/tensor; imports torch only for transformers."""
    if name == HF:
        import torch
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        def hf(blocks, scales):
            return convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                              dtype=torch.bfloat16)
        return hf
    from gptoss_convert.mxfp4 import dequantize, dequantize_transposed
    if name == FILL:                                  # the page-fault and write cost of a fresh output
        def fill(blocks, scales):
            out = np.empty((*scales.shape[:-1], scales.shape[-1] * 32), np.uint16)
            out.fill(0x3F80)
            return out
        return fill
    if name == OURS_OUT:
        buffers = {}                                  # one output buffer per shape, reused by every call

        def into_buffer(blocks, scales):
            key = scales.shape
            if key not in buffers:
                buffers[key] = np.zeros((*key[:-1], key[-1] * 32), ml_dtypes.bfloat16)   # touched once
            return dequantize(blocks, scales, "bfloat16", out=buffers[key])
        return into_buffer
    fn = dequantize if name == OURS else dequantize_transposed
    return lambda blocks, scales: fn(blocks, scales, "bfloat16")


def run_layer(fn, layer) -> None:
    for blocks, scales in layer.values():
        out = fn(blocks, scales)
        del out                                                   # one output alive at a time


def check_equal(layer) -> None:
    """Bit-exact agreement of the compared outputs (the benchmark would be moot otherwise)."""
    import torch
    ours_t, hf = method(OURS_T), method(HF)
    for name, (blocks, scales) in layer.items():
        a = ours_t(blocks, scales).view(np.uint16)
        b = hf(blocks, scales).view(torch.int16).numpy().view(np.uint16)
        if not np.array_equal(a, b):
            raise SystemExit(f"{name}: our dequantize_transposed differs from transformers")


# Peak is measured from just before the first call: inputs + outputs + the method's temporaries.
CHILD = """
import json, sys
from benchmarks import bench_codec as B
from benchmarks.common import median_seconds, reset_peak_rss, rss_mb
name, repeats = sys.argv[1], int(sys.argv[2])
fn, layer = B.method(name), B.make_layer()
before = rss_mb()
reset_peak_rss()
med, times = median_seconds(lambda: B.run_layer(fn, layer), repeats, warmup=0)
print(json.dumps({"rss_before_mb": before, "median_s": med, "times_s": times}))
"""


def side_by_side(repeats: int) -> dict[str, list[float]]:
    layer = make_layer()
    fns = {name: method(name) for name in METHODS}
    check_equal(layer)                                            # also the warm-up of OURS_T and HF
    for name in (OURS, OURS_OUT, FILL):
        run_layer(fns[name], layer)
    times = {name: [] for name in METHODS}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(median_seconds(lambda: run_layer(fn, layer), 1, warmup=0)[0])
    return times


def isolated(name: str, repeats: int, env: dict | None = None) -> dict:
    result, peak = run_isolated(CHILD, [name, str(repeats)], env)
    return {**result, "peak_rss_mb": round(peak), "rss_before_mb": round(result["rss_before_mb"])}


def report(times: dict[str, list[float]], children: dict[str, dict], blas: dict[str, dict]) -> dict:
    med = {name: float(np.median(t)) for name, t in times.items()}
    rows = []
    for name in METHODS:
        child = children[name]
        rows.append({"method": name, "median_s": round(med[name], 3),
                     "GB/s (bf16 out)": round(OUT_BYTES / med[name] / 1e9, 2),
                     "x transformers": round(med[HF] / med[name], 1),
                     "RSS before call MiB": child["rss_before_mb"], "peak RSS in call MiB": child["peak_rss_mb"],
                     "call's own MiB": child["peak_rss_mb"] - child["rss_before_mb"],
                     "times_s": [round(t, 3) for t in times[name]]})
    return {"machine": machine(), "layer": {k: list(v) for k, v in LAYER_SHAPES.items()},
            "out_bytes": OUT_BYTES, "rows": rows,
            "openblas_coretype": {k: {"median_s": round(v["median_s"], 3),
                                      "times_s": [round(t, 3) for t in v["times_s"]]} for k, v in blas.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median reported)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this path")
    a = ap.parse_args()
    times = side_by_side(a.repeats)
    children = {name: isolated(name, 1) for name in METHODS}
    blas = {label: isolated(OURS, a.repeats, {"OPENBLAS_CORETYPE": value})
            for label, value in (("unset", None), ("Prescott", "Prescott"))}
    result = report(times, children, blas)
    cols = ["method", "median_s", "GB/s (bf16 out)", "x transformers", "RSS before call MiB",
            "peak RSS in call MiB", "call's own MiB"]
    print(f"one gpt-oss-20b layer of experts, {OUT_BYTES / 1e9:.2f} GB bf16 out; {json.dumps(result['machine'])}")
    print(markdown_table(result["rows"], cols))
    print("ours dequantize, own process, by OPENBLAS_CORETYPE: "
          + ", ".join(f"{k}: median {v['median_s']} s" for k, v in result["openblas_coretype"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

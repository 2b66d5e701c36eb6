"""MXFP4 decode benchmark: our numpy codec vs transformers' `convert_moe_packed_tensors` (torch CPU)
on one gpt-oss-20b layer of experts (random bytes in the real shapes), bf16 output.

    python -m benchmarks.bench_codec [--repeats 5] [--json codec.json]

Every measurement is one fresh process that builds the layer, warms the method up on one expert,
then decodes the whole layer once, timed, and reports its RSS before the call and its peak during
it (so the peaks of different methods never mix, and no method inherits another's heap). The
methods run interleaved, in a new random order every repeat, so they share the noise of a shared
machine, each after a cooldown (`--cooldown`, 3 s): on this project's VM a process that starts
right after another one freed GBs gets those pages back cheaply, while one that starts later
faults them in from the host, several times slower; the cooldown makes every measurement the
latter, as a user's first call in a fresh process is; the
table gives the median time, GB/s = bf16 bytes produced per second, the median CPU time of the
call (sys is mostly the kernel zeroing fresh output pages), and the worst peak.

Rows: transformers returns [E, in, out], so `dequantize_transposed` is the like-for-like row, next
to `dequantize` + a numpy transpose copy (the path it replaces). `dequantize` keeps the stored
[E, out, in]; it also runs into reused `out=` buffers (allocated and touched before the call, so
no page faults: the decode alone, as a converter reusing its buffers sees it). The numpy path
uses no BLAS: it also runs with OPENBLAS_CORETYPE forced to the oldest kernel (Prescott).

Where fresh output goes: `dequantize` allocates its output with `gptoss_convert.buffers.empty`
(ordinary pages, transparent huge pages refused); one row runs it with numpy's `np.empty` instead
(numpy advises huge pages), as before that change. Two rows decode nothing: they allocate the
same output and fill it with zeros on two threads, the floor any decoder into a fresh array
pays for its pages, with each allocator.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np

from benchmarks.common import machine, markdown_table, run_isolated

# gpt-oss-20b, one layer: [E, rows (out), G (in / 32)]; blocks add a trailing 16.
LAYER_SHAPES = {"gate_up_proj": (32, 5760, 90), "down_proj": (32, 2880, 90)}
OUT_BYTES = sum(int(np.prod(s)) * 32 * 2 for s in LAYER_SHAPES.values())      # bf16 output of the layer

OURS = "ours dequantize [E,out,in]"
OURS_BLAS = "ours dequantize, OPENBLAS_CORETYPE=Prescott"
OURS_OUT = "ours dequantize, out= buffers reused"
OURS_T = "ours dequantize_transposed [E,in,out]"
OURS_SWAP = "ours dequantize + swapaxes + ascontiguousarray [E,in,out]"
OURS_NP = "ours dequantize, output from np.empty (huge pages advised)"
FLOOR = "no decode: buffers.empty + fill (fresh pages only)"
FLOOR_NP = "no decode: np.empty + fill (fresh pages only, huge pages advised)"
HF = "transformers convert_moe_packed_tensors [E,in,out]"
METHODS = (OURS, OURS_BLAS, OURS_NP, OURS_OUT, OURS_T, OURS_SWAP, FLOOR, FLOOR_NP, HF)
ENV = {OURS: {"OPENBLAS_CORETYPE": None}, OURS_BLAS: {"OPENBLAS_CORETYPE": "Prescott"}}


def make_layer(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random block bytes; scale bytes 110..126 as in the released checkpoints (finite values)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.integers(0, 256, (*shape, 16), dtype=np.uint8),
                   rng.integers(110, 127, shape, dtype=np.uint8)) for name, shape in LAYER_SHAPES.items()}


def first_expert(layer):
    return {name: (blocks[:1], scales[:1]) for name, (blocks, scales) in layer.items()}


def method(name: str):
    """(blocks, scales) -> decoded bf16 array/tensor; imports torch only for transformers."""
    if name == HF:
        import torch
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
        return lambda blocks, scales: convert_moe_packed_tensors(
            torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.bfloat16)
    from gptoss_convert.mxfp4 import codec, dequantize, dequantize_transposed
    if name in (FLOOR, FLOOR_NP):
        from gptoss_convert.buffers import empty
        return functools.partial(fill_fresh, np.empty if name == FLOOR_NP else empty)
    if name == OURS_NP:
        codec.empty = np.empty                        # the allocation before buffers.empty
    if name == OURS_OUT:
        buffers = {s: np.ones((*s[:-1], s[-1] * 32), ml_dtypes.bfloat16) for s in LAYER_SHAPES.values()}  # touched
        return lambda blocks, scales: dequantize(blocks, scales, "bfloat16",
                                                 out=buffers.get(scales.shape))   # warm-up slice: fresh
    if name == OURS_SWAP:                             # what a caller does without dequantize_transposed
        return lambda blocks, scales: np.ascontiguousarray(np.swapaxes(dequantize(blocks, scales), -1, -2))
    fn = dequantize_transposed if name == OURS_T else dequantize
    return lambda blocks, scales: fn(blocks, scales, "bfloat16")


def fill_fresh(alloc, blocks, scales) -> np.ndarray:
    """The output `dequantize` would return, allocated with `alloc` and zero-filled by 2 threads."""
    out = alloc((*scales.shape[:-1], scales.shape[-1] * 32), ml_dtypes.bfloat16).reshape(-1).view(np.uint16)
    edges = np.linspace(0, out.size, 9).astype(int)                 # 8 ranges, as the codec splits
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda a, b: out[a:b].fill(0), edges[:-1], edges[1:]))
    return out


def run_layer(fn, layer) -> None:
    for blocks, scales in layer.values():
        out = fn(blocks, scales)
        del out                                                   # one output alive at a time


def check_equal() -> None:
    """Bit-exact agreement of the like-for-like outputs, on two experts (else the race is moot)."""
    import torch
    ours_t, hf = method(OURS_T), method(HF)
    for name, (blocks, scales) in make_layer(1).items():
        a = ours_t(blocks[:2], scales[:2]).view(np.uint16)
        b = hf(blocks[:2], scales[:2]).view(torch.int16).numpy().view(np.uint16)
        if not np.array_equal(a, b):
            raise SystemExit(f"{name}: our dequantize_transposed differs from transformers")


# One measurement: build, warm up on one expert, reset the peak, decode the layer once.
CHILD = """
import json, resource, sys, time
from benchmarks import bench_codec as B
from benchmarks.common import reset_peak_rss, rss_mb
fn, layer = B.method(sys.argv[1]), B.make_layer()
B.run_layer(fn, B.first_expert(layer))
before = rss_mb()
reset_peak_rss()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
B.run_layer(fn, layer)
seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "rss_before_mb": before,
                  "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime}))
"""


def measure(repeats: int, cooldown: float) -> dict[str, list[dict]]:
    runs = {name: [] for name in METHODS}
    order, shuffle = list(METHODS), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            time.sleep(cooldown)
            result, peak = run_isolated(CHILD, [name], ENV.get(name))
            runs[name].append({**result, "peak_rss_mb": peak})
            print(f"  {name}: {result['seconds']:.3f} s", flush=True)
    return runs


def report(runs: dict[str, list[dict]]) -> dict:
    med = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    rows = []
    for name, rs in runs.items():
        before = round(max(r["rss_before_mb"] for r in rs))
        peak = round(max(r["peak_rss_mb"] for r in rs))
        rows.append({"method": name, "median s": round(med[name], 3),
                     "GB/s (bf16 out)": round(OUT_BYTES / med[name] / 1e9, 2),
                     "x transformers": round(med[HF] / med[name], 1),
                     "CPU user s": round(statistics.median(r["user_s"] for r in rs), 2),
                     "CPU sys s": round(statistics.median(r["sys_s"] for r in rs), 2),
                     "RSS before call MiB": before, "peak RSS in call MiB": peak, "call's own MiB": peak - before,
                     "seconds": [round(r["seconds"], 3) for r in rs]})
    return {"machine": machine(), "layer": {k: list(v) for k, v in LAYER_SHAPES.items()},
            "out_bytes": OUT_BYTES, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="measurements per method (median reported)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this path")
    ap.add_argument("--cooldown", type=float, default=3.0,
                    help="seconds to wait before each measurement, so that the memory the previous process "
                         "freed has gone back to the VM's host (free page reporting waits 2 s) and every "
                         "process starts as cold as the first; 0 to measure back to back")
    a = ap.parse_args()
    check_equal()
    start = machine()
    result = report(measure(a.repeats, a.cooldown))
    result["cooldown_s"] = a.cooldown
    result["machine"]["loadavg_1m_at_start"] = start["loadavg_1m"]
    print(f"one gpt-oss-20b layer of experts, {OUT_BYTES / 1e9:.2f} GB bf16 out; {json.dumps(result['machine'])}")
    print(markdown_table(result["rows"], ["method", "median s", "GB/s (bf16 out)", "x transformers", "CPU user s",
                                          "CPU sys s", "RSS before call MiB", "peak RSS in call MiB",
                                          "call's own MiB"]))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

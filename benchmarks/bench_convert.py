"""Streaming conversion benchmark: dequantize and to-orbax on shape-faithful synthetic gpt-oss-20b
checkpoints with 2, 4 and 8 layers. Reports peak RSS (flat in the layer count = streaming works)
and throughput against the machine's sequential write bandwidth measured in the same run.

    python -m benchmarks.bench_convert --workdir /tmp/gptoss-bench [--layers 2 4 8] [--json out.json]

Each conversion runs in its own subprocess (peak RSS from wait4); the write baseline writes the
same number of bytes with numpy `tofile` + fsync. Outputs are deleted after each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks import synthetic
from benchmarks.common import machine, run_isolated

CONVERT = """
import json, sys, time
from gptoss_convert.converters.dequantize import dequantize
from gptoss_convert.converters.to_orbax import to_orbax
cmd, src, out = sys.argv[1:4]
t0 = time.perf_counter()
if cmd == "dequantize":
    dequantize(src, out, progress=False, log=lambda *_: None)
else:
    to_orbax(src, out, scanned=(cmd == "scanned"), progress=False, log=lambda *_: None)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def run_child(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of a fresh process running CONVERT with `args` (its own peak)."""
    result, peak_mb = run_isolated(CONVERT, args)
    return result["seconds"], peak_mb * 2**20 / 1e9


def write_bandwidth(path: Path, nbytes: int, block: int = 256 << 20) -> float:
    """Sequential write GB/s of `nbytes` (numpy tofile in 256 MiB blocks, then fsync)."""
    buf = np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            buf[: min(block, left)].tofile(f)
            left -= block
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return nbytes / dt / 1e9


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/gptoss-bench")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--commands", nargs="+", default=["dequantize", "scanned", "unscanned"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in a.layers:
        src = synthetic.write(work / f"synthetic-20b-{layers}L", "20b", layers)
        for cmd in a.commands:
            out = work / f"out-{cmd}-{layers}L"
            shutil.rmtree(out, ignore_errors=True)
            secs, rss = run_child([cmd, str(src), str(out)])
            written = tree_bytes(out)
            shutil.rmtree(out)
            bw = write_bandwidth(work / "bandwidth.bin", written)
            gbps = written / secs / 1e9
            rows.append({"command": cmd if cmd == "dequantize" else f"to-orbax --{cmd}", "layers": layers,
                         "source_GB": round(tree_bytes(src) / 1e9, 2), "written_GB": round(written / 1e9, 2),
                         "seconds": round(secs, 1), "GB_per_s": round(gbps, 3), "peak_rss_GB": round(rss, 2),
                         "write_bw_GB_per_s": round(bw, 3), "ratio_to_write_bw": round(gbps / bw, 2)})
            print(json.dumps(rows[-1]), flush=True)
    head = "| command | layers | source GB | written GB | s | GB/s | peak RSS GB | disk write GB/s | ratio |"
    print("\n" + head + "\n|" + "---|" * 9)
    for r in rows:
        print(f"| {r['command']} | {r['layers']} | {r['source_GB']} | {r['written_GB']} | {r['seconds']} | "
              f"{r['GB_per_s']} | {r['peak_rss_GB']} | {r['write_bw_GB_per_s']} | {r['ratio_to_write_bw']} |")
    print(f"machine: {machine()}")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Streamed verify memory: peak RSS of `verify --streamed`'s forward on shape-faithful synthetic
gpt-oss-20b Orbax checkpoints with 4 and 8 layers, against the checkpoint's size.

    python -m benchmarks.bench_verify --workdir /tmp/gptoss-bench [--layers 4 8] [--json out.json]

Each checkpoint is made by `to-orbax --unscanned` from a synthetic MXFP4 checkpoint (random
weights: routing is arbitrary, which is the worst case for how many experts a prompt touches),
then the streamed forward runs on MaxText's three short prompts' lengths plus a 300-token one
in a subprocess (peak RSS from wait4). No golden is needed to measure memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks import synthetic
from benchmarks.bench_convert import run_child, tree_bytes
from benchmarks.common import machine, run_isolated

FORWARD = """
import json, sys, numpy as np
from pathlib import Path
from gptoss_convert.backends.gpt_oss.config import config_from_dict
from gptoss_convert.verify.streamed import streamed_logits
ckpt, cfg_dir = sys.argv[1:3]
cfg = config_from_dict(json.loads((Path(cfg_dir) / "config.json").read_text()), cfg_dir)
lengths = [5, 5, 4, 300]
tokens = np.zeros((len(lengths), max(lengths)), np.int32)
mask = np.zeros_like(tokens)
rng = np.random.default_rng(0)
for b, n in enumerate(lengths):
    tokens[b, :n] = rng.integers(0, cfg.V, n)
    mask[b, :n] = 1
import time
t0 = time.perf_counter()
logits = streamed_logits(ckpt, cfg, False, tokens, mask)
assert all(np.isfinite(x).all() for x in logits)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def run_forward(ckpt: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of the streamed forward in a fresh process."""
    result, peak_mb = run_isolated(FORWARD, [str(ckpt / "0"), str(ckpt)])
    return result["seconds"], peak_mb * 2**20 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/gptoss-bench")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    rows = []
    for layers in a.layers:
        src = synthetic.write(work / f"synthetic-20b-{layers}L", "20b", layers)
        ckpt = work / f"orbax-unscanned-{layers}L"
        if not (ckpt / "0" / "_CHECKPOINT_METADATA").is_file():
            shutil.rmtree(ckpt, ignore_errors=True)
            run_child(["unscanned", str(src), str(ckpt)])
        secs, rss = run_forward(ckpt)
        size = tree_bytes(ckpt)
        rows.append({"layers": layers, "checkpoint_GB": round(size / 1e9, 2), "peak_rss_GB": round(rss, 2),
                     "rss_over_size": round(rss * 1e9 / size, 3), "seconds": round(secs, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| layers | checkpoint GB | peak RSS GB | RSS / size | s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['checkpoint_GB']} | {r['peak_rss_GB']} | {r['rss_over_size']} | {r['seconds']} |")
    print(f"machine: {machine()}")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

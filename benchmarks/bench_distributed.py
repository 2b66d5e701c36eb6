"""Multi-process conversion: 1, 2 and 4 local processes (`--distributed`, coordinator on
127.0.0.1) against the plain single-process command, side by side in one run, on a
shape-faithful synthetic gpt-oss-20b checkpoint.

    python -m benchmarks.bench_distributed --workdir /tmp/gptoss-bench --layers 2 [--json out.json]
    python -m benchmarks.bench_distributed --workdir /tmp/gptoss-bench --paper 120b

`--paper MODEL` measures nothing: it builds the real plan of gpt-oss-MODEL (a sparse checkpoint
of real headers over holes) and prints, for N processes, the bytes the busiest and the idlest
process read and write under the code's own assignment (`converters.distributed.balance`),
and the time that implies at a given single-process rate (docs/multihost.md).

Each row is one CLI run (every process a fresh `python -m gptoss_convert`): wall seconds from
launching the processes until the last one exits (imports and jax.distributed start-up
included) and the leader's own conversion time (its log line: from its first plan step to the
commit). Every output's conversion.json hashes must equal the single-process run's (the same
bytes) or the benchmark fails. Outputs are deleted after each run; the source is read once
first so every run finds it in the page cache.

On one machine N processes share its cores and its disk: this measures the coordination
overhead and whether splitting the work costs anything, not the multi-host speed-up, which
needs N machines (docs/multihost.md gives the expected figures from the single-process rates).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import synthetic
from benchmarks.common import ROOT, machine

COMMANDS = {"to-orbax --scanned": ["to-orbax", "--scanned"], "dequantize": ["dequantize"]}
VOLATILE = ("_CHECKPOINT_METADATA", "commit_success.txt")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], src: Path, out: Path, n: int | None, timeout: float = 3600) -> dict:
    """One conversion: n=None is the plain command, else n processes with --distributed."""
    base = [sys.executable, "-m", "gptoss_convert", cmd[0], str(src), str(out), *cmd[1:], "--no-progress"]
    port = _port()
    argvs = [base] if n is None else [base + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(n),
                                              "--process-id", str(i)] for i in range(n)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for a in argvs]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit(f"{cmd} with {n} processes failed: " + " | ".join(e[-500:] for _, e in outs))
    leader = float(re.search(r" in ([0-9.]+) s \(", outs[0][0]).group(1))
    return {"wall_s": round(wall, 2), "leader_s": leader}


def output_hashes(out: Path) -> dict:
    """conversion.json's hash of every output file except the two that hold timestamps/paths."""
    rec = json.loads((out / "conversion.json").read_text())
    return {f: v for f, v in rec["outputs"].items() if Path(f).name not in VOLATILE}


def bench(workdir: Path, layers: int, procs: list[int]) -> dict:
    src = synthetic.write(workdir / f"src-20b-{layers}l", "20b", layers)
    for f in src.iterdir():                      # into the page cache: every run reads it warm
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    rows = []
    for name, cmd in COMMANDS.items():
        ref = None
        for n in [None, *procs]:
            out = workdir / "out"
            shutil.rmtree(out, ignore_errors=True)
            r = run(cmd, src, out, n)
            written = sum(v["size"] for v in json.loads((out / "conversion.json").read_text())["outputs"].values())
            hashes = output_hashes(out)
            ref = ref or (r, hashes)
            if hashes != ref[1]:
                raise SystemExit(f"{name} with {n} processes wrote different bytes than the single-process run")
            rows.append({"command": name, "processes": n or "plain", **r, "GB": round(written / 1e9, 2),
                         "GB/s (wall)": round(written / 1e9 / r["wall_s"], 3),
                         "wall ratio to plain": round(ref[0]["wall_s"] / r["wall_s"], 2), "identical": True})
            shutil.rmtree(out)
            print(json.dumps(rows[-1]), flush=True)
    return {"machine": machine(), "layers": layers, "rows": rows}


def shares(model: str, workdir: Path, procs: list[int]) -> list[dict]:
    """Per command and N: GB read and written by the busiest and the idlest process."""
    from gptoss_convert.converters import distributed as dist
    from gptoss_convert.converters.common import plan_for
    from gptoss_convert.converters.dequantize import _out_tensors
    from gptoss_convert.converters.shards import split_shards
    from gptoss_convert.io.hf_checkpoint import HFCheckpoint
    from gptoss_convert.testing.published import published_config
    from gptoss_convert.testing.tiny import write_sparse_checkpoint

    src = workdir / f"sparse-{model}"
    if not (src / "config.json").is_file():
        write_sparse_checkpoint(src, published_config(f"gpt-oss-{model}"), shards=15)
    ck = HFCheckpoint(src)

    def read_per_out(name: str) -> float:             # source bytes read per output byte of a tensor
        vt = ck.tensors[name]
        return sum(t.nbytes for t in vt.sources) / (math.prod(vt.shape) * 2)

    units = {}
    for scanned in (True, False):
        _, _, plan = plan_for(ck, scanned=scanned, itemsize=2)
        groups = dist.shared_chunk_groups([[(e.target, e.index) for e in b.emits] for b in plan.blocks],
                                          plan.chunk_shapes())
        units[f"to-orbax --{'un' * (not scanned)}scanned"] = (
            [b.nbytes for b in plan.blocks], [b.nbytes * read_per_out(b.source) for b in plan.blocks], groups)
    shards = split_shards(_out_tensors(ck, "BF16", 64 << 20), 5 * 10**9)
    units["dequantize (5GB shards)"] = ([sum(t.nbytes for t in s) for s in shards],
                                        [sum(t.nbytes * read_per_out(t.name) for t in s) for s in shards], None)
    rows = []
    for name, (written, read, groups) in units.items():
        for n in procs:
            owners = dist.balance(written, groups if groups is not None else list(range(len(written))), n)
            w = [sum(x for x, o in zip(written, owners) if o == p) for p in range(n)]
            r = [sum(x for x, o in zip(read, owners) if o == p) for p in range(n)]
            rows.append({"command": name, "processes": n, "units": len(written), "write GB max": round(max(w) / 1e9, 2),
                         "write GB min": round(min(w) / 1e9, 2), "read GB max": round(max(r) / 1e9, 2),
                         "total write GB": round(sum(w) / 1e9, 2), "total read GB": round(sum(r) / 1e9, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gptoss-bench"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--paper", choices=["20b", "120b"], default=None, help="Shares of the real plan; no conversion.")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.paper:
        rows = shares(a.paper, a.workdir, [1, 2, 4, 8, 16, 32, 64])
        print("| command | N | units | GB written, busiest / idlest process | GB read, busiest | "
              "total written / read GB |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['command']} | {r['processes']} | {r['units']} | {r['write GB max']} / {r['write GB min']} "
                  f"| {r['read GB max']} | {r['total write GB']} / {r['total read GB']} |")
        return
    result = bench(a.workdir, a.layers, a.processes)
    print("| command | processes | wall s | leader s | GB written | GB/s (wall) | wall ratio to plain | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['command']} | {r['processes']} | {r['wall_s']} | {r['leader_s']} | {r['GB']} | {r['GB/s (wall)']} "
              f"| {r['wall ratio to plain']} | yes |")
    print(json.dumps(result["machine"]))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Peak memory against model size, under the --max-memory ceiling (issue 24 §5).

`to-orbax --scanned` on synthetic gpt-oss-20b checkpoints with every real shape (vocab 201088,
32 experts, 2880 wide) and 2, 12 and 24 of its 24 layers, each at the ceilings given
(`--max-memory`, default 1.5GB and 1GB), each run in a fresh process: its wall time, the
estimate and parallelism the protocol fitted (conversion.json's `memory`), and its peak RSS
(the child's VmHWM as the kernel reports it). Then gpt-oss-120b's
plan under the same ceilings, from real-shape sparse shards (`--dry-run`: the estimate only,
nothing converted). `--relayout N` also relays each source's scanned Orbax conversion out to
unscanned and back, N times each way, at the default ceiling.

    python -m benchmarks.bench_memory --workdir /work/big/mem [--src-24 /work/big/src20b] [--json mem.json]

Sources are generated once (bounded memory) unless given; each output is deleted after its run.
Disk: the largest source (13.8 GB) and its output (42 GB) at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import synthetic
from benchmarks.bench_fullsize import dry_run_120b, published_config
from benchmarks.common import ROOT, status_mb, machine, markdown_table


def convert(src: Path, out: Path, ceiling: str, layout: str = "--scanned", keep: bool = False) -> dict:
    """One `to-orbax SRC OUT <layout> --max-memory ceiling` in a fresh process (SRC an HF
    checkpoint, or an Orbax one: the relayout); its figures. OUT is deleted after unless `keep`."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "gptoss_convert", "to-orbax", str(src), str(out), layout, "--no-progress",
           "--max-memory", ceiling]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hwm = [0.0]

    def watch():                    # VmHWM until the process ends
        while proc.poll() is None:
            hwm[0] = max(hwm[0], status_mb("VmHWM:", proc.pid))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    secs = time.perf_counter() - t0
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd} exited {proc.returncode}: {stderr[-2000:]}")
    mem = json.loads((out / "conversion.json").read_text())["memory"]
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if not keep:
        shutil.rmtree(out)
    return {"command": f"to-orbax {layout}" + (" (relayout)" if (src / "0").is_dir() else ""), "max_memory": ceiling,
            "written_GB": round(written / 1e9, 2), "seconds": round(secs, 1),
            "largest_block_MB": round(mem["largest_block"] / 1e6), "parallel": mem["parallel"],
            "estimate_GB": round(mem["estimate"] / 1e9, 2), "vmhwm_GB": round(hwm[0] * 2**20 / 1e9, 3),
            "load_1m": round(os.getloadavg()[0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/gptoss-bench-memory")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 12, 24])
    ap.add_argument("--max-memory", nargs="+", default=["1.5GB", "1GB"])
    ap.add_argument("--src-24", default=None, help="an existing 24-layer synthetic 20b source (not deleted)")
    ap.add_argument("--keep-sources", action="store_true")
    ap.add_argument("--relayout", type=int, default=0, metavar="N",
                    help="also relayout each source's scanned Orbax conversion to unscanned and back, N times each")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in a.layers:
        given = a.src_24 if layers == 24 and a.src_24 else None
        src = Path(given) if given else synthetic.write(work / f"src-{layers}", "20b", layers)
        for ceiling in a.max_memory:
            row = {"layers": layers, **convert(src, work / "out", ceiling)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        if a.relayout:              # the Orbax -> Orbax relayout, both ways, at the default ceiling
            convert(src, work / "orbax-scanned", "1.5GB", keep=True)
            convert(work / "orbax-scanned", work / "orbax-unscanned", "1.5GB", "--unscanned", keep=True)
            for _ in range(a.relayout):
                for orbax, layout in (("orbax-scanned", "--unscanned"), ("orbax-unscanned", "--scanned")):
                    row = {"layers": layers, **convert(work / orbax, work / "out", "1.5GB", layout)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            shutil.rmtree(work / "orbax-scanned")
            shutil.rmtree(work / "orbax-unscanned")
        if not given and not a.keep_sources:
            shutil.rmtree(src)
    plan = {}
    for ceiling in a.max_memory:
        cfg = published_config("120b", None)
        plan[ceiling] = dry_run_120b(work, cfg, max_memory=ceiling)
        print(json.dumps({"gpt-oss-120b": ceiling, **plan[ceiling]}), flush=True)
    print(markdown_table(rows, ["layers", "command", "max_memory", "written_GB", "seconds", "largest_block_MB",
                                "parallel", "estimate_GB", "vmhwm_GB", "load_1m"]))
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows, "gpt-oss-120b": plan}, indent=2))


if __name__ == "__main__":
    main()

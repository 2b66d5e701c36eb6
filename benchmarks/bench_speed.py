"""Disk speed of every converting command, both families, cold cache (issue 24 §4).

For each (family, command) row: the page cache is dropped, the disk's O_DIRECT write speed is
measured on `--baseline-gb` (bench_convert.direct_write_bandwidth), the command runs in a fresh
process through the CLI (`python -m gptoss_convert ... --no-progress`; its user + sys CPU from
wait4, its peak RSS = VmHWM read inside it), its output is measured and deleted (unless the
next rows read it), the cache is dropped again and O_DIRECT is measured once more. The ratio is
the command's GB/s (bytes written / wall) over the mean of the two O_DIRECT figures around it.

    python -m benchmarks.bench_speed --workdir /work/big/speed --src20b /work/big/src20b \
        --json speed.json [--groups gpt-oss gpt-oss-orbax qwen3] [--qwen-layers 12] [--orbax-layers 8]
    python -m benchmarks.bench_speed --workdir W --code OLD_TREE NEW_TREE --repeats 3 \
        --alternate "to-orbax SRC --scanned"        # one command, trees alternated, medians

Groups (the run holds the shared disk lock `--lock` from its first group to its last; every
output is deleted before the release):
  gpt-oss        the full-size synthetic 20b at `--src20b` (made here if absent, under the lock):
                 dequantize, to-orbax --scanned, to-orbax --unscanned.
  gpt-oss-orbax  the commands that read an Orbax checkpoint, from a synthetic 20b cut to
                 `--orbax-layers` layers (the full 42 GB Orbax source and a 42 GB output do not
                 fit this disk together): to-orbax --scanned (the source of the next rows, and a
                 row itself), the relayout to --unscanned, to-hf (BF16), to-hf --mxfp4.
  qwen3          a synthetic Qwen3-30B-A3B with its real shapes and `--qwen-layers` of its 48
                 layers (bench_qwen3.write_source): to-orbax --scanned, --unscanned, the relayout
                 (scanned -> unscanned), to-hf (BF16).
Peak RSS and CPU are of the child alone. Machine load (1-minute load average) is recorded before
and after each row: the machine is shared, so only ratios measured side by side count.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import synthetic
from benchmarks.bench_convert import direct_write_bandwidth, tree_bytes
from benchmarks.common import ROOT, machine

# Runs the CLI in this process, then prints its own peak RSS (VmHWM) as the last stdout line:
# wait4's ru_maxrss would include the parent's pages of a vfork'ed child.
_CLI = """
import json, runpy, sys
code = 0
try:
    runpy.run_module("gptoss_convert", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (1 if e.code else 0)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_kb": int(hwm.split()[1]), "rc": code}))
"""


def drop_caches() -> bool:
    """Drop the page cache (root only): every row starts cold. False where not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def disk_lock(path: str | None):
    """Hold the shared big-disk lock (flock) for the block; no-op without a path."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        t0 = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        print(json.dumps({"lock_wait_s": round(time.perf_counter() - t0, 1)}), flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_cli(args: list[str], code: Path = ROOT) -> dict:
    """One CLI command of the tree `code` in a fresh process: wall s, user/sys CPU s (wait4), peak
    RSS GB (VmHWM)."""
    env = dict(os.environ, PYTHONPATH=str(code) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CLI, *args, "--no-progress"], stdout=subprocess.PIPE,
                            env=env, text=True)
    out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = json.loads(out.strip().splitlines()[-1])
    if proc.returncode or tail["rc"]:
        raise RuntimeError(f"{args} exited with {proc.returncode or tail['rc']}:\n{out[-2000:]}")
    return {"seconds": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "peak_rss_GB": tail["peak_rss_kb"] * 1024 / 1e9}


def o_direct(work: Path, nbytes: int) -> float:
    """The disk's O_DIRECT write GB/s on `nbytes`, cache dropped first."""
    drop_caches()
    return direct_write_bandwidth(work / "o_direct.bin", nbytes)


CODE: list[Path] = [ROOT]      # the code trees each row runs, in turn (--code)
COMPARE: set[str] = set()      # the groups whose rows run with every tree of CODE (--compare); others: the last
GROUP = [""]                   # the group running now


def measure(family: str, label: str, args: list[str], out: Path, work: Path, baseline: int, keep: bool = False,
            note: str = "") -> list[dict]:
    """The row (see the module docstring) once per code tree of CODE, alternated (only the last
    tree's for the groups not in COMPARE); deletes `out` afterwards unless `keep` (then the
    last tree's output stays)."""
    codes = CODE if GROUP[0] in COMPARE else CODE[-1:]
    return [_measure(family, label, args, out, work, baseline, keep and i == len(codes) - 1, note, code)
            for i, code in enumerate(codes)]


def _measure(family: str, label: str, args: list[str], out: Path, work: Path, baseline: int, keep: bool,
             note: str, code: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    load0 = os.getloadavg()[0]
    before = o_direct(work, baseline)
    drop_caches()
    r = run_cli([*args, str(out)], code)
    written = tree_bytes(out)
    if not keep:
        shutil.rmtree(out)
    after = o_direct(work, baseline)
    direct = (before + after) / 2
    gbps = written / r["seconds"] / 1e9
    cpu = r["user_s"] + r["sys_s"]
    row = {"code": code.name, "family": family, "command": label, "note": note, "written_GB": round(written / 1e9, 2),
           "seconds": round(r["seconds"], 1), "GB_per_s": round(gbps, 3),
           "o_direct_before": round(before, 3), "o_direct_after": round(after, 3),
           "ratio": round(gbps / direct, 2), "cpu_s": round(cpu, 1), "user_s": round(r["user_s"], 1),
           "sys_s": round(r["sys_s"], 1), "cpu_s_per_GB": round(cpu / (written / 1e9), 2),
           "peak_rss_GB": round(r["peak_rss_GB"], 2), "load_before": round(load0, 2),
           "load_after": round(os.getloadavg()[0], 2)}
    row["meets"] = row["ratio"] >= 0.9 and row["cpu_s_per_GB"] <= 1.0
    print(json.dumps(row), flush=True)
    return row


def gpt_oss(a, work: Path, baseline: int) -> list[dict]:
    from benchmarks.bench_fullsize import published_config
    src = synthetic.write(a.src20b, cfg=published_config("20b", None), shard_bytes=5 << 30)
    layers = json.loads((Path(src) / "config.json").read_text())["num_hidden_layers"]
    note = f"{layers} of 24 layers"
    rows = measure("gpt-oss-20b", "dequantize", ["dequantize", str(src)], work / "out", work, baseline, note=note)
    for layout in a.layouts:
        rows.extend(measure("gpt-oss-20b", f"to-orbax --{layout}", ["to-orbax", str(src), f"--{layout}"],
                            work / "out", work, baseline, note=note))
    return rows


def gpt_oss_orbax(a, work: Path, baseline: int) -> list[dict]:
    """The Orbax-reading commands, from a cut 20b (see the module docstring)."""
    L = a.orbax_layers
    hf = synthetic.write(work / f"src20b-{L}L", "20b", L, shard_bytes=5 << 30)
    note, orb = f"{L} of 24 layers", work / "orbax-scanned"
    rows = measure("gpt-oss-20b", "to-orbax --scanned", ["to-orbax", str(hf), "--scanned"], orb, work, baseline,
                   keep=True, note=note)
    shutil.rmtree(hf)
    try:
        rows.extend(measure("gpt-oss-20b", "relayout (Orbax scanned -> --unscanned)",
                            ["to-orbax", str(orb), "--unscanned"], work / "out", work, baseline, note=note))
        rows.extend(measure("gpt-oss-20b", "to-hf (BF16)", ["to-hf", str(orb)], work / "out", work, baseline,
                            note=note))
        rows.extend(measure("gpt-oss-20b", "to-hf --mxfp4", ["to-hf", str(orb), "--mxfp4"], work / "out", work,
                            baseline, note=note))
    finally:
        shutil.rmtree(orb, ignore_errors=True)
    return rows


def qwen3(a, work: Path, baseline: int) -> list[dict]:
    from benchmarks.bench_qwen3 import write_source
    src, _ = write_source(work, a.qwen_layers)
    note, orb = f"{a.qwen_layers} of 48 layers, real shapes", work / "orbax-scanned"
    try:
        rows = measure("Qwen3-30B-A3B", "to-orbax --unscanned", ["to-orbax", str(src.dir), "--unscanned"],
                       work / "out", work, baseline, note=note)
        rows += measure("Qwen3-30B-A3B", "to-orbax --scanned", ["to-orbax", str(src.dir), "--scanned"], orb, work,
                        baseline, keep=True, note=note)
        shutil.rmtree(src.dir)
        rows.extend(measure("Qwen3-30B-A3B", "relayout (Orbax scanned -> --unscanned)",
                            ["to-orbax", str(orb), "--unscanned"], work / "out", work, baseline, note=note))
        rows.extend(measure("Qwen3-30B-A3B", "to-hf (BF16)", ["to-hf", str(orb)], work / "out", work, baseline,
                            note=note))
    finally:
        shutil.rmtree(orb, ignore_errors=True)
        shutil.rmtree(src.dir, ignore_errors=True)
    return rows


def alternate(command: list[str], out: Path, repeats: int) -> dict:
    """`command` (CLI arguments before OUT) with each tree of CODE in turn, `repeats` times, the
    order reversed every other round, cache dropped before each: {tree: [run_cli results]}."""
    import statistics
    runs: dict[str, list[dict]] = {c.name: [] for c in CODE}
    for i in range(repeats):
        for code in CODE if i % 2 == 0 else CODE[::-1]:
            shutil.rmtree(out, ignore_errors=True)
            drop_caches()
            runs[code.name].append(run_cli([*command, str(out)], code))
            shutil.rmtree(out, ignore_errors=True)
            last = {k: round(v, 2) for k, v in runs[code.name][-1].items()}
            print(json.dumps({"code": code.name, **last}), flush=True)
    for name, rs in runs.items():
        med = {k: round(statistics.median(r[k] for r in rs), 1) for k in ("seconds", "user_s", "sys_s")}
        print(json.dumps({"code": name, "median": med, "load_1m": round(os.getloadavg()[0], 2)}), flush=True)
    return runs


GROUPS = {"gpt-oss": gpt_oss, "gpt-oss-orbax": gpt_oss_orbax, "qwen3": qwen3}
COLUMNS = ["code", "family", "command", "note", "written_GB", "seconds", "GB_per_s", "o_direct_before",
           "o_direct_after", "ratio", "cpu_s", "user_s", "sys_s", "cpu_s_per_GB", "peak_rss_GB", "load_before",
           "load_after", "meets"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="not inside a repository; deleted outputs only")
    ap.add_argument("--src20b", default="/work/big/src20b", help="the shared full-size synthetic 20b (kept)")
    ap.add_argument("--groups", nargs="+", choices=list(GROUPS), default=["gpt-oss", "gpt-oss-orbax", "qwen3"])
    ap.add_argument("--layouts", nargs="+", default=["scanned", "unscanned"], help="gpt-oss group's to-orbax rows")
    ap.add_argument("--orbax-layers", type=int, default=8)
    ap.add_argument("--qwen-layers", type=int, default=12)
    ap.add_argument("--baseline-gb", type=float, default=8.0, help="GB written by each O_DIRECT measurement")
    ap.add_argument("--lock", default="/work/.bigdisk.lock", help="flock file held by each group ('' for none)")
    ap.add_argument("--code", nargs="+", default=[str(ROOT)],
                    help="code trees to run each row with, alternated (e.g. a checkout of main, then this tree)")
    ap.add_argument("--compare", nargs="*", default=None,
                    help="groups run with every --code tree (default: all); the others with the last one only")
    ap.add_argument("--alternate", default=None, metavar="'COMMAND SRC [OPTIONS]'",
                    help="instead of the groups: run this command (CLI arguments before OUT, one string) with each "
                         "--code tree in turn, --repeats times, cache dropped before each, and print the medians")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    CODE[:] = [Path(c).resolve() for c in a.code]
    COMPARE.update(a.groups if a.compare is None else a.compare)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    baseline = int(a.baseline_gb * 1e9)
    if a.alternate:
        import shlex
        alternate(shlex.split(a.alternate), work / "out", a.repeats)
        return
    rows = []
    with disk_lock(a.lock):         # once for all groups: the lock is not handed to a queued run between them
        for g in a.groups:
            GROUP[0] = g
            rows += GROUPS[g](a, work, baseline)
    from benchmarks.common import markdown_table
    print(markdown_table(rows, COLUMNS))
    print(f"machine: {machine()}")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

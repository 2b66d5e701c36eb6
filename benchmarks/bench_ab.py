"""Before/after: one conversion run by an earlier revision of this repository and by the working
tree, alternated, on the same shape-faithful synthetic gpt-oss-20b checkpoint.

    python -m benchmarks.bench_ab --rev 9128be2 --layers 4 --command "to-orbax --scanned" [--repeats 2]

On a shared, noisy machine two runs minutes apart can differ by 30%; alternating the two trees
(old, new, old, new, ...) with a pause before each run lets both share the same noise. Each run
is a fresh `python -m gptoss_convert` process; its wall time, CPU time (user, sys) and peak RSS
come from the kernel (wait4). The earlier revision is checked out in a git worktree under
--workdir; its output, like ours, is deleted after every run, once every file of it is hashed:
the two trees' outputs must be byte-identical (the record's times and paths, Orbax's
timestamped metadata and commit marker text aside), or the benchmark fails.

    python -m benchmarks.bench_ab --rev 037ed72 --layers 2 --command "to-hf --mxfp4" --from-orbax

`--from-orbax` converts the synthetic source to a scanned Orbax checkpoint first (with the
working tree) and runs the command on that: to-hf, or the relayout (`to-orbax --unscanned`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import synthetic
from benchmarks.common import ROOT, markdown_table


def worktree(rev: str, workdir: Path) -> Path:
    """A checkout of `rev` (made once, reused)."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    path = workdir / f"ab-{sha}"
    if not (path / "gptoss_convert").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha], check=True,
                       capture_output=True)
    return path


def run(tree: Path, args: list[str]) -> dict:
    """One conversion by the code in `tree`; the child's own wall, CPU and peak RSS."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gptoss_convert", *args, "--no-progress"], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tree}: {' '.join(args)} failed")
    return {"wall_s": round(wall, 2), "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2),
            "peak_rss_GB": round(usage.ru_maxrss * 1024 / 1e9, 2)}


VARIABLE = ("conversion.json", "_CHECKPOINT_METADATA", "commit_success.txt")   # times and paths inside


def digests(out: Path) -> dict[str, str]:
    """{file: sha256} of an output, except the files whose bytes hold times or paths."""
    import hashlib

    got = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in VARIABLE:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(64 << 20):
                    h.update(chunk)
            got[p.relative_to(out).as_posix()] = h.hexdigest()
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the earlier revision (any git revision name)")
    ap.add_argument("--command", default="dequantize",
                    help="gptoss-convert command and its flags, e.g. 'to-orbax --scanned'")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cooldown", type=float, default=4.0, help="seconds of pause before each run")
    ap.add_argument("--workdir", default="/tmp/gptoss-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (needs root)")
    ap.add_argument("--from-orbax", action="store_true",
                    help="run the command on a scanned Orbax conversion of the source")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = synthetic.write(work / f"synthetic-20b-{a.layers}L", "20b", a.layers)
    if a.from_orbax:
        orbax = work / f"synthetic-20b-{a.layers}L-orbax"
        if not orbax.is_dir():
            run(ROOT, ["to-orbax", str(src), str(orbax), "--scanned"])
        shutil.rmtree(src)
        src = orbax
    seen: dict[str, dict[str, str]] = {}
    out = work / "ab-out"
    trees = {a.rev: worktree(a.rev, work), "working tree": ROOT}
    rows = []
    for repeat in range(a.repeats):
        for name, tree in trees.items():
            shutil.rmtree(out, ignore_errors=True)
            time.sleep(a.cooldown)
            if a.cold:
                from benchmarks.bench_export import drop_page_cache
                drop_page_cache()
            cmd, *flags = a.command.split()
            rows.append({"code": name, "repeat": repeat + 1, **run(tree, [cmd, str(src), str(out), *flags])})
            print(json.dumps(rows[-1]), flush=True)
            if name not in seen:
                seen[name] = digests(out)
    if len({json.dumps(d, sort_keys=True) for d in seen.values()}) != 1:
        a_, b_ = seen.values()
        differ = sorted(f for f in set(a_) | set(b_) if a_.get(f) != b_.get(f))
        raise SystemExit(f"outputs differ between the trees: {differ[:10]}")
    print(f"outputs byte-identical between the trees: {len(next(iter(seen.values())))} files")
    shutil.rmtree(out, ignore_errors=True)
    for name in trees:
        mine = [r for r in rows if r["code"] == name]
        rows.append({"code": f"{name} (median)", **{k: round(statistics.median(r[k] for r in mine), 2)
                                                    for k in ("wall_s", "user_s", "sys_s", "peak_rss_GB")}})
    print(f"\n{a.command}, synthetic gpt-oss-20b, {a.layers} layers")
    print(markdown_table(rows, ["code", "repeat", "wall_s", "user_s", "sys_s", "peak_rss_GB"]))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

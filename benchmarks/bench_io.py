"""The I/O facts the streaming writers are built on, measured on this machine:

1. Sequential writes of a fresh multi-GB file, each mode in its own fresh process after a pause
   (so memory freed earlier has been handed back, on VMs with free page reporting):
   plain buffered `os.write` + fsync; the same through `io.files.WriteBehind` (fdatasync and
   drop the synced range every 256 MB); O_DIRECT from one aligned buffer.
2. sha256 of data right after writing it, 1 MB at a time (as `ShardWriter` did: the piece is
   still in the CPU cache) vs. sha256 of the same bytes afterwards, in one pass from memory;
   and xxh3-128 (`io.files.HASH`, what conversion.json records now) of the same bytes from memory.

    python -m benchmarks.bench_io --workdir /tmp/gptoss-bench [--gb 3] [--repeats 2] [--pause 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import machine, run_isolated

WRITE = """
import hashlib, json, mmap, os, sys, time
from gptoss_convert.io.files import WriteBehind
mode, path, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
block = 32 << 20
buf = mmap.mmap(-1, block)                     # page-aligned (O_DIRECT needs it), touched below
buf.write(os.urandom(1 << 20) * (block >> 20))
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == "o_direct" else 0)
r0, t0 = os.times(), time.perf_counter()
fd = os.open(path, flags, 0o644)
behind = WriteBehind(fd) if mode == "write_behind" else None
n = -(-nbytes // block)
for i in range(n):
    os.write(fd, buf)
    if behind:
        behind.wrote((i + 1) * block)
if behind:
    behind.close()
else:
    os.fsync(fd)
os.close(fd)
dt, r1 = time.perf_counter() - t0, os.times()
os.unlink(path)
print(json.dumps({"GB_per_s": n * block / dt / 1e9, "sys_s": r1.system - r0.system, "user_s": r1.user - r0.user}))
"""

HASH = """
import hashlib, json, os, sys, time
import numpy as np
path, nbytes = sys.argv[1], int(sys.argv[2])
data = np.frombuffer(os.urandom(nbytes), np.uint8)
piece = 1 << 20
mv = memoryview(data)
h, hashing = hashlib.sha256(), 0.0
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(0, nbytes, piece):
    os.write(fd, mv[i:i + piece])
    t = time.perf_counter(); h.update(mv[i:i + piece]); hashing += time.perf_counter() - t
os.close(fd); os.unlink(path)
after_write = h.hexdigest()
t = time.perf_counter(); whole = hashlib.sha256(mv).hexdigest(); dt = time.perf_counter() - t
assert whole == after_write
from gptoss_convert.io.files import new_hash
t = time.perf_counter(); h = new_hash(); h.update(mv); h.hexdigest(); dt_xxh3 = time.perf_counter() - t
print(json.dumps({"after_write_GB_per_s": nbytes / hashing / 1e9, "from_memory_GB_per_s": nbytes / dt / 1e9,
                  "xxh3_128_from_memory_GB_per_s": nbytes / dt_xxh3 / 1e9}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/gptoss-bench")
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pause", type=float, default=5.0, help="seconds before each fresh process")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    nbytes = int(a.gb * 1e9)
    rows = []
    for r in range(a.repeats):
        for mode in ("buffered", "write_behind", "o_direct"):
            time.sleep(a.pause)
            res, _ = run_isolated(WRITE, [mode, str(work / "io.bin"), str(nbytes)])
            rows.append({"repeat": r, "mode": mode, **{k: round(v, 2) for k, v in res.items()}})
            print(json.dumps(rows[-1]), flush=True)
    hashing = [run_isolated(HASH, [str(work / "hash.bin"), str(512 << 20)])[0] for _ in range(a.repeats)]
    for h in hashing:
        print(json.dumps({k: round(v, 2) for k, v in h.items()}), flush=True)
    print(f"machine: {machine()}")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "writes": rows, "sha256": hashing}, indent=1))


if __name__ == "__main__":
    main()

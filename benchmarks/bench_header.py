"""The safetensors header parser on hostile headers: N tensor entries, one name repeated at the end.

Before issue 22 the duplicate check compared every key with every other once a duplicate
existed (`keys.count(k)` per key: quadratic, 40k keys took 20 s); now it is one set. Each row
times `read_header` (refusing the duplicate) with the current hook and, where it finishes in
reasonable time (`--old-max`), with the old one, median of `--repeats`.

    python -m benchmarks.bench_header [--keys 1000 10000 100000] [--old-max 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import time
from pathlib import Path
from unittest import mock

from benchmarks.common import median_seconds
from gptoss_convert.errors import CorruptTensorError
from gptoss_convert.io import safetensors


def _old_dup_check(pairs):
    """The hook as it was at 7ec050a."""
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate tensor names {dup}")
    return dict(pairs)


def hostile_shard(path: Path, n: int) -> Path:
    """A shard whose header lists `n` one-byte tensors and then the first name again."""
    entries = [f'"t{i}": {{"dtype": "U8", "shape": [1], "data_offsets": [{i}, {i + 1}]}}' for i in range(n)]
    entries.append('"t0": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}')
    header = ("{" + ", ".join(entries) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(n))
    return path


def _refuse(path: Path) -> None:
    try:
        safetensors.read_header(path)
    except CorruptTensorError:
        return
    raise AssertionError("the duplicate was not refused")


def main() -> None:
    """Print one JSON line per key count: seconds with the new hook and (if run) the old one."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--old-max", type=int, default=10000, help="time the old hook only up to this many keys")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for n in args.keys:
            path = hostile_shard(Path(d) / f"h{n}.safetensors", n)
            new, _ = median_seconds(lambda: _refuse(path), repeats=args.repeats)
            row = {"keys": n, "header_bytes": path.stat().st_size - n - 8, "new_s": round(new, 4)}
            if n <= args.old_max:
                with mock.patch.object(safetensors, "_dup_check", _old_dup_check):
                    old, _ = median_seconds(lambda: _refuse(path), repeats=args.repeats, warmup=0)
                row["old_s"] = round(old, 4)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"# {time.perf_counter() - t0:.1f} s in all")

"""Reading MXFP4 experts for decoding: copies (`read_tensor` into recycled buffers) against views of
the page cache (`MappedFiles`), in one process, alternated.

Every expert of every MXFP4 tensor of a shape-faithful synthetic gpt-oss-20b checkpoint is read
(blocks and scales) and decoded with `dequantize_transposed` into a reused output, as the
converters do (views are dropped from the process after each expert, as HFCheckpoint does).
The checkpoint is read once before timing, so both ways read from the page cache.
Wall time and the process's CPU time (user + sys) per pass; medians over the repeats.

    python -m benchmarks.bench_read [--layers 4] [--repeats 3] [--workdir /tmp/gptoss-bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from benchmarks import synthetic
from benchmarks.common import machine, markdown_table
from gptoss_convert.buffers import BufferPool
from gptoss_convert.io.hf_checkpoint import open_checkpoint
from gptoss_convert.io.safetensors import MappedFiles, read_tensor
from gptoss_convert.mxfp4 import dequantize_transposed


def decode_all(ck, read, outs: dict) -> int:
    """Decode every expert of every MXFP4 tensor, reading blocks/scales with `read(info, rows)`;
    returns the bytes decoded."""
    total = 0
    for vt in ck.tensors.values():
        if not vt.is_mxfp4:
            continue
        for e in range(vt.shape[0]):
            rows = slice(e, e + 1)
            blocks, scales = read(vt.blocks, rows), read(vt.scales, rows)
            shape = (1, scales.shape[-1] * 32, scales.shape[1])
            out = outs.setdefault(shape, np.ones(shape, ml_dtypes.bfloat16))
            dequantize_transposed(blocks, scales, "bfloat16", out=out)
            total += out.nbytes
            read.done(vt, rows, blocks, scales)
    return total


class Copies:
    def __init__(self):
        self.pool = BufferPool(keep=4)

    def __call__(self, info, rows):
        return read_tensor(info, rows, out=self.pool.get((1, *info.shape[1:]), info.np_dtype))

    def done(self, vt, rows, blocks, scales):
        self.pool.put(blocks)
        self.pool.put(scales)


class Views(MappedFiles):
    __call__ = MappedFiles.view

    def done(self, vt, rows, blocks, scales):
        self.drop(vt.blocks, rows)                              # as HFCheckpoint does: RSS stays bounded
        self.drop(vt.scales, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/gptoss-bench")
    a = ap.parse_args()
    src = synthetic.write(Path(a.workdir) / f"synthetic-20b-{a.layers}L", "20b", a.layers)
    ck = open_checkpoint(src)
    for f in ck.files:                                          # into the page cache
        with open(ck.dir / f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    outs: dict = {}
    runs: dict[str, list[tuple[float, float]]] = {"read_tensor copies": [], "MappedFiles views": []}
    for _ in range(a.repeats):
        for name, read in (("read_tensor copies", Copies()), ("MappedFiles views", Views())):
            c0, t0 = os.times(), time.perf_counter()
            nbytes = decode_all(ck, read, outs)
            t1, c1 = time.perf_counter(), os.times()
            runs[name].append((t1 - t0, (c1.user - c0.user) + (c1.system - c0.system)))
    rows = [{"read": name, "wall s (each)": ", ".join(f"{w:.2f}" for w, _ in v),
             "CPU s (each)": ", ".join(f"{c:.2f}" for _, c in v),
             "median wall s": round(statistics.median(w for w, _ in v), 2),
             "median CPU s": round(statistics.median(c for _, c in v), 2),
             "GB/s (bf16 out)": round(nbytes / statistics.median(w for w, _ in v) / 1e9, 2)}
            for name, v in runs.items()]
    print(f"every MXFP4 expert of synthetic gpt-oss-20b, {a.layers} layers ({nbytes / 1e9:.2f} GB bf16 out); "
          f"{machine()}")
    print(markdown_table(rows, ["read", "wall s (each)", "CPU s (each)", "median wall s", "median CPU s",
                                "GB/s (bf16 out)"]))


if __name__ == "__main__":
    main()

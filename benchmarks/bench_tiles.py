"""Tile and step sizes of the codec and the tiled transposes, in one process, into reused outputs
(no page faults):

- the codec's `dequantize` on 8 experts of gpt-oss-20b's gate_up ([8, 5760, 90, 16] blocks ->
  [8, 5760, 2880] bf16) with 1 and 2 worker threads, for several `codec.CHUNK_GROUPS` (groups
  decoded per numpy call);
- the codec's `dequantize_transposed` (decoded row tiles written out transposed) on 8 experts of
  gpt-oss-20b's gate_up ([8, 5760, 90, 16] blocks -> [8, 2880, 5760] bf16), for several
  `codec.TILE_BYTES` and two `codec.CHUNK_GROUPS`;
- `mapping.transforms.transposed` (the LM head's [V, H] -> [H, V], one 64 MB row block of
  gpt-oss-20b's: [11650, 2880] bf16) for several `TRANSPOSE_TILE_BYTES`, against
  one untiled copy of the transposed view in output order (as `np.ascontiguousarray(x.T)` or
  TensorStore's encoder walk it), all as plain 2-byte copies.

    python -m benchmarks.bench_tiles [--repeats 5]

Medians over the repeats, the sizes interleaved within each repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ml_dtypes
import numpy as np

from benchmarks.common import machine, markdown_table
from gptoss_convert.buffers import as_bits
from gptoss_convert.mapping import transforms
from gptoss_convert.mxfp4 import codec

TILES = [256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20]
STEPS = [2048, 8192, 32768]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (8, 5760, 90, 16), dtype=np.uint8)
    scales = rng.integers(110, 127, (8, 5760, 90), dtype=np.uint8)
    out = np.ones((8, 2880, 5760), ml_dtypes.bfloat16)                 # touched: no faults in the timing
    head = rng.integers(0, 1 << 15, (11650, 2880), dtype=np.uint16).view(ml_dtypes.bfloat16)
    head_t = np.ones(head.shape[::-1], head.dtype)
    out_plain = np.ones((8, 5760, 2880), ml_dtypes.bfloat16)
    defaults = codec.TILE_BYTES, codec.CHUNK_GROUPS, transforms.TRANSPOSE_TILE_BYTES, transforms.empty
    plain_s = {(w, c): [] for w in (1, 2) for c in STEPS}
    codec_s = {(t, c): [] for t in TILES for c in (STEPS[0], STEPS[-1])}
    trans_s = {t: [] for t in TILES} | {"untiled": []}
    transforms.empty = lambda shape, dtype: head_t                     # reuse one output for every call
    try:
        for _ in range(a.repeats):
            for w, c in plain_s:
                codec.CHUNK_GROUPS = c
                plain_s[w, c].append(timed(lambda: codec.dequantize(blocks, scales, out=out_plain, workers=w)))
            for t, c in codec_s:
                codec.TILE_BYTES, codec.CHUNK_GROUPS = t, c
                codec_s[t, c].append(timed(lambda: codec.dequantize_transposed(blocks, scales, out=out, workers=2)))
            codec.CHUNK_GROUPS = defaults[1]
            for t in TILES:
                transforms.TRANSPOSE_TILE_BYTES = t
                trans_s[t].append(timed(lambda: transforms.transposed(head)))
            trans_s["untiled"].append(timed(lambda: np.copyto(as_bits(head_t), as_bits(head).T)))
    finally:
        codec.TILE_BYTES, codec.CHUNK_GROUPS, transforms.TRANSPOSE_TILE_BYTES, transforms.empty = defaults
    gbs = lambda v: round(out.nbytes / statistics.median(v) / 1e9, 2)  # noqa: E731
    rows = [{"copy": f"codec dequantize, 8 experts gate_up, {w} worker(s)", "step (groups)": c,
             "median s": round(statistics.median(v), 3), "GB/s (bf16 out)": gbs(v)} for (w, c), v in plain_s.items()]
    rows += [{"copy": "codec dequantize_transposed, 8 experts gate_up, 2 workers", "tile": f"{t >> 10} KB",
              "step (groups)": c, "median s": round(statistics.median(v), 3), "GB/s (bf16 out)": gbs(v)}
             for (t, c), v in codec_s.items()]
    rows += [{"copy": "LM head block [11650, 2880] transposed", "tile": t if isinstance(t, str) else f"{t >> 10} KB",
              "median s": round(statistics.median(v), 3),
              "G elements/s": round(head.size / statistics.median(v) / 1e9, 2)} for t, v in trans_s.items()]
    print(machine())
    print(markdown_table(rows, ["copy", "tile", "step (groups)", "median s", "GB/s (bf16 out)", "G elements/s"]))


if __name__ == "__main__":
    main()

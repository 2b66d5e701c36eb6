"""Block-scaled FP8 (E4M3, `weight_scale_inv` per [b0, b1] block) dequantization, pure numpy.

The layout is the one of HF's "fine-grained FP8" (`quant_method: fp8`, DeepSeek-V3, Qwen3-*-FP8):
a weight `W` [..., R, C] stored as float8_e4m3fn and a float scale grid `S` [..., R/b0, C/b1];
the real weight is `W[r, c] * S[r // b0, c // b1]`. As transformers' `Fp8Dequantize` does, the
product is taken in float32 (exact for BF16 scales; an F32 scale's up-to-28-bit product is
rounded once to float32) and then rounded to the output dtype with round-to-nearest-even: the
same two roundings, so the result equals transformers' bit for bit (tests/test_fp8.py).
Only dimensions that are whole multiples of the block
are accepted: for a ragged last block, implementations disagree on which block size applies.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from gptoss_convert.errors import CorruptTensorError

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0
BF16_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
# byte -> its float32 value (0x7F and 0xFF are E4M3's NaNs; refused before they are looked up)
VALUES = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
_NAN_BITS = 0x7F                   # (byte & 0x7F) == 0x7F: NaN in float8_e4m3fn
_ROWS = 128                        # rows looked up at once (cache-sized work)


def grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid of a weight of `shape`: [..., ceil(R/b0), ceil(C/b1)]."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def layout_problem(shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int]) -> str | None:
    """Why a weight of `shape` with scales of `scale_shape` cannot be dequantized with `block`
    (None if it can): at least 2-D, both dimensions whole multiples of the block, grid as expected."""
    if len(shape) < 2:
        return f"is {len(shape)}-D; FP8 block scaling needs a [..., rows, cols] matrix"
    if shape[-2] % block[0] or shape[-1] % block[1]:
        return (f"shape {list(shape)} is not a whole number of {list(block)} blocks (implementations disagree "
                "on ragged blocks); re-quantize it with a block size that divides it, or use the BF16 release")
    if tuple(scale_shape) != grid_shape(shape, block):
        return (f"scale grid {list(scale_shape)} does not match shape {list(shape)} in {list(block)} blocks "
                f"(expected {list(grid_shape(shape, block))})")
    return None


def check_scales(scales: np.ndarray, name: str, where: str = "") -> None:
    """Refuse a scale grid with a NaN/inf, zero or negative scale, or one so large that an E4M3
    value times it overflows BF16 (the dequantized weight would hold inf)."""
    s = np.asarray(scales, np.float32)
    bad = ~(np.isfinite(s) & (s > 0) & (s <= np.float32(BF16_MAX / E4M3_MAX)))
    if bad.any():
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), s.shape))
        raise CorruptTensorError(f"{where}tensor {name!r} has {int(bad.sum())} scale(s) that are not finite positive "
                                 f"numbers (first {float(s[idx])!r} at index {idx}); the checkpoint is corrupt, "
                                 "re-download it")


def _check_bits(bits: np.ndarray, name: str, where: str, row0: int) -> None:
    nan = (bits & np.uint8(_NAN_BITS)) == np.uint8(_NAN_BITS)
    if nan.any():
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(nan)), nan.shape))
        idx = (idx[0] + row0,) + idx[1:]
        raise CorruptTensorError(f"{where}tensor {name!r} holds {int(nan.sum())} FP8 NaN byte(s) (first at index "
                                 f"{idx}); the checkpoint is corrupt, re-download it")


def _round(f: np.ndarray, out: np.ndarray) -> None:
    """Finite float32 `f` into `out`: bfloat16 rounded to nearest, ties to even (the bits of
    `f.astype(bfloat16)`, by integer arithmetic: faster), or float32 as is. `f` is overwritten."""
    if out.dtype == np.float32:
        np.copyto(out, f)
        return
    u = f.view(np.uint32)
    tie = (u >> np.uint32(16)) & np.uint32(1)
    tie += np.uint32(0x7FFF)
    u += tie
    u >>= np.uint32(16)
    np.copyto(out.view(np.uint16), u, casting="unsafe")


def dequantize(weight: np.ndarray, scales: np.ndarray, block: tuple[int, int], dtype=ml_dtypes.bfloat16, *,
               row0: int = 0, name: str = "weight", where: str = "", out: np.ndarray | None = None) -> np.ndarray:
    """Rows of a block-scaled FP8 matrix, dequantized to `dtype` (bfloat16 or float32).

    `weight` [n, C] is rows row0..row0+n of the stored E4M3 weight (uint8 bits or float8_e4m3fn),
    `scales` [G, C/b1] the scale rows row0//b0 .. (row0+n-1)//b0 of its grid. NaN bytes and bad
    scales are refused naming `name` (`where`: a prefix such as the file, for the message).

    Work goes one row of blocks at a time: for each of its scales, the 256 possible products
    (every byte's float32 value times the scale, rounded as `_round` rounds) make a table, and each
    output value is a look-up of its byte in its column block's table. That is the same float32
    product and the same rounding per value as computing each one (bit for bit), in two passes
    over the block instead of five.
    """
    bits = np.asarray(weight).view(np.uint8)
    if bits.ndim != 2 or scales.ndim != 2:
        raise ValueError(f"{name}: dequantize takes [rows, cols] rows and a 2-D scale grid")
    n, cols = bits.shape
    b0, b1 = block
    if cols != scales.shape[1] * b1 or (n and (row0 + n - 1) // b0 - row0 // b0 + 1 != scales.shape[0]):
        raise ValueError(f"{name}: rows {row0}..{row0 + n} [{n}, {cols}] and scales {list(scales.shape)} do not match "
                         f"block {list(block)}")
    check_scales(scales, name, where)
    out = np.empty((n, cols), dtype) if out is None else out
    out_bits = out.view(np.uint16 if out.dtype.itemsize == 2 else np.uint32)
    s32 = np.asarray(scales, np.float32)
    index_type = np.uint16 if scales.shape[1] * 256 <= 1 << 16 else np.uint32
    column_table = (np.arange(cols) // b1 * 256).astype(index_type)     # where column c's table starts
    for g in range(s32.shape[0]):
        a, b = max(0, (row0 // b0 + g) * b0 - row0), min(n, (row0 // b0 + g + 1) * b0 - row0)
        for r in range(a, b, _ROWS):                                      # cache-sized pieces of a tall block
            rows = bits[r:min(b, r + _ROWS)]
            _check_bits(rows, name, where, row0 + r)
            index = np.add(rows, column_table, dtype=index_type)
            np.take(_tables(s32[g], out.dtype), index, out=out_bits[r:r + len(rows)])
    return out


def _tables(scales: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """For a row of scales [G1]: [G1 * 256] output bits, entry (j, byte) = VALUES[byte] * scales[j]
    (float32) rounded to `dtype`."""
    products = (scales[:, None] * VALUES[None, :]).reshape(-1)
    table = np.empty(products.shape, dtype)
    _round(products, table)
    return table.view(np.uint16 if table.dtype.itemsize == 2 else np.uint32)


def quantize(w: np.ndarray, block: tuple[int, int], scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A float matrix as (E4M3 weight, scale grid) with one scale per block: amax / 448, the way
    published FP8 checkpoints are made (for fixtures and tests). Dimensions must be whole blocks."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    b0, b1 = block
    if rows % b0 or cols % b1:
        raise ValueError(f"shape {list(w.shape)} is not a whole number of {list(block)} blocks")
    tiles = w.reshape(rows // b0, b0, cols // b1, b1)
    amax = np.abs(tiles).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(scale_dtype)
    q = (tiles / scale.astype(np.float32)[:, None, :, None]).clip(-E4M3_MAX, E4M3_MAX)
    return q.reshape(rows, cols).astype(E4M3), scale

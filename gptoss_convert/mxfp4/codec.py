"""MXFP4 encode/decode. Knows nothing about models: arrays in, arrays out."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from gptoss_convert.errors import CorruptTensorError

# E2M1 code -> value. Code 8 is -0.0 (kept as such).
FP4_VALUES = np.array(
    [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)

_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
           "float16": np.float16, "fp16": np.float16, "float32": np.float32, "fp32": np.float32}


def _resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        return np.dtype(_DTYPES[dtype])
    return np.dtype(dtype)


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype="bfloat16", *, name: str = "tensor",
               workers: int | None = None) -> np.ndarray:
    """Decode MXFP4 `blocks` [..., G, 16] (uint8) with `scales` [..., G] (uint8) to [..., G*32].

    Byte b of a group holds element 2b in its low nibble and 2b+1 in its high nibble;
    value = FP4_VALUES[nibble] * 2**(scale - 127). Scale byte 255 (NaN in the OCP spec) is
    rejected as corrupt input, naming `name` and the first offending index.
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise CorruptTensorError(f"{name}: MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise CorruptTensorError(f"{name}: blocks {blocks.shape} and scales {scales.shape} do not pair as [..., G, 16] / [..., G]")
    out_dtype = _resolve_dtype(dtype)
    bad = np.flatnonzero(scales == 255)
    if bad.size:
        idx = np.unravel_index(bad[0], scales.shape)
        raise CorruptTensorError(f"{name}: scale byte 255 (NaN in MXFP4) at group index {tuple(int(i) for i in idx)}; the checkpoint is corrupt, re-download it")
    lo = FP4_VALUES[blocks & 0x0F]
    hi = FP4_VALUES[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(*scales.shape, 32)
    scale = np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127)[..., None]
    return (vals * scale).astype(out_dtype).reshape(*scales.shape[:-1], scales.shape[-1] * 32)


def quantize(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode float weights [..., K] (K % 32 == 0) as MXFP4 blocks [..., K/32, 16], scales [..., K/32].

    OCP MX rule: shared exponent = floor(log2(max|w| of the group)) - 2 (E2M1's emax), elements
    rounded to nearest E2M1 value, ties to even code, saturating at +-6. An all-zero group gets
    scale byte 127. The sign of -0.0 is kept.
    """
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim < 1 or w.shape[-1] % 32:
        raise ValueError(f"weights: last axis must be a multiple of 32, got shape {w.shape}")
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = np.abs(groups).max(axis=-1)
    with np.errstate(divide="ignore"):
        exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, 0)
    exp = np.clip(exp, -127, 127).astype(np.int32)
    scaled = np.abs(groups) / np.ldexp(np.float32(1), exp)[..., None]
    mid = (FP4_VALUES[1:8] + FP4_VALUES[0:7]) / 2            # [7] midpoints between magnitudes
    code = np.searchsorted(mid, scaled, side="left")         # count of midpoints < x
    tie = (code < 7) & (code % 2 == 1) & (scaled == mid[np.minimum(code, 6)])
    code = (code + tie).astype(np.uint8) | (np.signbit(groups).astype(np.uint8) << 3)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)        # element 2b low nibble, 2b+1 high
    return blocks.astype(np.uint8), (exp + 127).astype(np.uint8)

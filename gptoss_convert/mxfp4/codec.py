"""MXFP4 encode/decode. Knows nothing about models: arrays in, arrays out."""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from gptoss_convert.buffers import BufferPool, RecyclingPool, as_bits, empty
from gptoss_convert.errors import CorruptTensorError
from gptoss_convert.mxfp4 import columns
from gptoss_convert.mxfp4.columns import SAT_BITS, scale_step
from gptoss_convert.mxfp4.rules import RULES, SCALE_RULES, ScaleRule

# E2M1 code -> value. Code 8 is -0.0 (kept as such).
FP4_VALUES = np.array(
    [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)

_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
           "float16": np.float16, "fp16": np.float16, "float32": np.float32, "fp32": np.float32}
_OUT_DTYPES = tuple(np.dtype(t) for t in (ml_dtypes.bfloat16, np.float16, np.float32, np.float64))

# Per-thread working buffers, recycled across calls: fresh ones are page-faulted and zeroed every
# time once malloc returns them to the kernel (see gptoss_convert.buffers).
_SCRATCH = BufferPool(keep=16, min_bytes=0)
# The requantized blocks to-hf hands to its writer: their mappings come back once it drops them.
_OUT = RecyclingPool(keep=8)
# Groups decoded per step (three numpy calls). Larger steps overflow L2, but each call is a point
# where the worker threads pass the GIL to each other, which on this project's 2-core VM costs
# more: 8 experts of gate_up on 2 threads ran at 2.63 GB/s with 2048 groups per step, 3.86 with
# 8192 and 4.16 with 32768; on one thread, 2.08 and 2.34 (benchmarks/bench_tiles.py).
CHUNK_GROUPS = 32768
# Bytes of decoded rows per transposed tile: in L2 while written out; more rows, longer row writes.
# 8 experts of gate_up into a reused output: 1.37 GB/s with 512 KB tiles, 1.95 with 2 MB, 1.81
# with 4 MB (benchmarks/bench_tiles.py, docs/benchmarks-history.md §2); a 2 MB tile is one step.
TILE_BYTES = 2 << 20


def _resolve_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        return np.dtype(_DTYPES[dtype])
    resolved = np.dtype(dtype)
    if resolved not in _OUT_DTYPES:
        raise ValueError(f"dtype: expected bfloat16, float16, float32 or float64, got {resolved}")
    return resolved


@functools.lru_cache(maxsize=None)
def _pair_table(dtype: np.dtype) -> np.ndarray:
    """[65536] table: entry (scale << 8 | byte) holds the byte's two finished values, packed.

    Each entry is one unsigned word (or a 16-byte void for float64) whose memory is
    [value of element 2b, value of element 2b+1] in `dtype`, so a gather over the index
    writes the decoded row directly, whatever the byte order of the machine.
    Values are computed in float32 (as transformers does) and then cast: exact for
    bf16/fp32 except |value| >= 2**128 (scale bytes 253/254), which is inf in every
    oracle; fp16 follows numpy's float32 -> float16 cast (round to nearest even,
    overflow to +-inf, underflow to +-0 or subnormal).
    """
    byte = np.arange(256)
    vals = FP4_VALUES[np.stack([byte & 0x0F, byte >> 4], axis=-1)]                 # [256 byte, 2]
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.ldexp(np.float32(1), np.arange(256, dtype=np.int32) - 127)      # [256 scale]
        table = scale[:, None, None] * vals[None]                                   # [256, 256, 2] f32
        table[255] = np.nan             # scale 255 is rejected before any lookup; never emit it
        packed = np.ascontiguousarray(table.astype(dtype))
    word = {2: np.uint32, 4: np.uint64}.get(dtype.itemsize, np.dtype((np.void, 2 * dtype.itemsize)))
    return packed.view(word).reshape(65536)


def _check_pair(blocks, scales, name: str) -> tuple[np.ndarray, np.ndarray]:
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise CorruptTensorError(
            f"{name}: MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise CorruptTensorError(
            f"{name}: blocks {blocks.shape} and scales {scales.shape} do not pair as [..., G, 16] / [..., G]")
    return blocks, scales


def _check_scales(scales: np.ndarray, name: str) -> None:
    """Reject scale byte 255 (NaN in OCP MX). One max() pass; the search runs only on failure."""
    if scales.size == 0 or scales.max() != 255:
        return
    idx = np.unravel_index(int(np.argmax(scales.reshape(-1) == 255)), scales.shape)
    raise CorruptTensorError(
        f"{name}: scale byte 255 (NaN in MXFP4) at group index {tuple(int(i) for i in idx)}; "
        "the checkpoint is corrupt, re-download it")


def _check_out(out: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out: expected a numpy array, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out: expected shape {shape} dtype {dtype}, got {out.shape} {out.dtype}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out: must be C-contiguous and writeable")
    return out


def _decode_groups(table, blocks, scales, out, start: int, stop: int) -> None:
    """Decode groups [start, stop): blocks [G, 16] u8, scales [G] u8 -> out [G, 16] packed pairs."""
    step = min(CHUNK_GROUPS, stop - start)
    hi = _SCRATCH.get((step,), np.uint16)
    idx = _SCRATCH.get((step, 16), np.uint16)
    for a in range(start, stop, step):
        b = min(a + step, stop)
        n = b - a
        np.left_shift(scales[a:b], 8, out=hi[:n], dtype=np.uint16)
        np.add(blocks[a:b], hi[:n, None], out=idx[:n])                 # (scale << 8) | byte
        np.take(table, idx[:n], out=out[a:b], mode="wrap")             # indices < 65536: no wrap
    _SCRATCH.put(hi)
    _SCRATCH.put(idx)


def _resolve_workers(workers: int | None) -> int:
    if workers is None:
        return os.cpu_count() or 1
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers: expected a positive int or None, got {workers!r}")
    return int(workers)


def _parallel(fn, n: int, workers: int, grain: int) -> None:
    """Call fn(start, stop) over [0, n) in ranges of whole `grain`s, on up to `workers` threads.

    numpy releases the GIL in the ufuncs and take() used by the workers, so threads scale.
    A few ranges per worker keep the threads balanced on a shared, noisy machine.
    """
    n_grains = -(-n // grain)
    tasks = min(n_grains, workers * 4)
    if workers == 1 or tasks <= 1:
        fn(0, n)
        return
    edges = [min(n, (n_grains * i // tasks) * grain) for i in range(tasks + 1)]
    with ThreadPoolExecutor(max_workers=min(workers, tasks)) as pool:
        list(pool.map(fn, edges[:-1], edges[1:]))


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype="bfloat16", *, name: str = "tensor",
               workers: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Decode MXFP4 `blocks` [..., G, 16] (uint8) with `scales` [..., G] (uint8) to [..., G*32].

    Byte b of a group holds element 2b in its low nibble and 2b+1 in its high nibble;
    value = FP4_VALUES[nibble] * 2**(scale - 127), in the stored orientation (no transpose).
    Bit-exact for bfloat16 and float32 (-0.0 stays -0.0); float16 rounds like numpy's cast
    (values beyond fp16's range become +-inf, tiny ones +-0). Scale byte 255 (NaN in the OCP
    spec) is rejected as corrupt input, naming `name` and the first offending group index.

    Decoding is a table gather indexed by (scale, byte), chunked to stay in cache and spread
    over `workers` threads (None: one per CPU). `out`, if given, must be a C-contiguous array
    of the result's shape and dtype; it is filled and returned.
    """
    blocks, scales = _check_pair(blocks, scales, name)
    out_dtype = _resolve_dtype(dtype)
    n_workers = _resolve_workers(workers)
    shape = (*scales.shape[:-1], scales.shape[-1] * 32)
    out = empty(shape, out_dtype) if out is None else _check_out(out, shape, out_dtype)
    _check_scales(scales, name)
    if out.size == 0:
        return out
    table = _pair_table(out_dtype)
    flat_blocks = np.ascontiguousarray(blocks).reshape(-1, 16)         # [groups, 16]
    flat_scales = np.ascontiguousarray(scales).reshape(-1)             # [groups]
    flat_out = out.reshape(-1, 32).view(table.dtype)                   # [groups, 16] value pairs
    _parallel(functools.partial(_decode_groups, table, flat_blocks, flat_scales, flat_out),
              flat_scales.size, n_workers, CHUNK_GROUPS)
    return out


def dequantize_transposed(blocks: np.ndarray, scales: np.ndarray, dtype="bfloat16", *,
                          name: str = "tensor", workers: int | None = None,
                          out: np.ndarray | None = None) -> np.ndarray:
    """Decode [..., R, G, 16] / [..., R, G] MXFP4 to [..., G*32, R]: the last two axes swapped.

    Same values, errors and options as `dequantize`; the result (C-contiguous) equals
    `np.ascontiguousarray(np.swapaxes(dequantize(...), -1, -2))` bit for bit, e.g. the HF
    parameter orientation [E, in, out] from the stored [E, out, in]. Row tiles are decoded in
    cache and written transposed, so no full-size intermediate exists: peak memory is the
    output, and the transpose costs no extra pass over main memory.
    """
    blocks, scales = _check_pair(blocks, scales, name)
    if scales.ndim < 2:
        raise CorruptTensorError(
            f"{name}: blocks {blocks.shape} have no row axis to transpose (need [..., R, G, 16])")
    out_dtype = _resolve_dtype(dtype)
    n_workers = _resolve_workers(workers)
    *lead, rows, groups = scales.shape
    shape = (*lead, groups * 32, rows)
    out = empty(shape, out_dtype) if out is None else _check_out(out, shape, out_dtype)
    _check_scales(scales, name)
    if out.size == 0:
        return out
    blocks3 = np.ascontiguousarray(blocks).reshape(-1, rows, groups * 16)   # [N, R, G*16]
    scales3 = np.ascontiguousarray(scales).reshape(-1, rows, groups)        # [N, R, G]
    out3 = out.reshape(-1, groups * 32, rows)                               # [N, K, R]
    tile = max(16, TILE_BYTES // (groups * 32 * out_dtype.itemsize) // 16 * 16)
    tiles_per_matrix = -(-rows // tile)
    fn = functools.partial(_decode_tiles_transposed, _pair_table(out_dtype), blocks3, scales3, out3, tile)
    small = scales.size <= CHUNK_GROUPS                                     # not worth a thread pool
    _parallel(fn, blocks3.shape[0] * tiles_per_matrix, 1 if small else n_workers, 1)
    return out


def _decode_tiles_transposed(table, blocks, scales, out, tile: int, start: int, stop: int) -> None:
    """Tiles [start, stop) of (matrix n, rows r0:r0+tile): decode [tile, K] in cache, store into out[n, :, r0:r1]."""
    _, rows, groups = scales.shape
    scratch = _SCRATCH.get((tile, groups * 32), out.dtype)                 # [tile, K]
    pairs = scratch.reshape(-1, 32).view(table.dtype)                      # [tile*G, 16]
    tiles_per_matrix = -(-rows // tile)
    for unit in range(start, stop):
        n, t = divmod(unit, tiles_per_matrix)
        r0, r1 = t * tile, min(rows, (t + 1) * tile)
        m = r1 - r0
        _decode_groups(table, blocks[n, r0:r1].reshape(-1, 16), scales[n, r0:r1].reshape(-1), pairs, 0, m * groups)
        np.copyto(as_bits(out[n, :, r0:r1]), as_bits(scratch[:m]).T)       # [K, m] <- [m, K]ᵀ
    _SCRATCH.put(scratch)




def _rule(rule: str) -> ScaleRule:
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {SCALE_RULES}, got {rule!r}")
    return RULES[rule]


def _round_up_scale(rule: str) -> bool:
    """Whether `rule` takes triton_kernels' round-up shared exponent (both triton rules)."""
    return _rule(rule).scale == "round-up"


def _ties_up(rule: str) -> bool:
    """Whether `rule` rounds an element exactly between two E2M1 values up (triton_kernels
    before its round-to-nearest-even change, triton PR #8110) rather than to the even code."""
    return _rule(rule).ties_up


def quantize(weights: np.ndarray, rule: str = "ocp") -> tuple[np.ndarray, np.ndarray]:
    """Encode float weights [..., K] (K % 32 == 0) as MXFP4 blocks [..., K/32, 16], scales [..., K/32].

    rule="ocp" (OCP MX): shared exponent = floor(log2(max|w| of the group)) - 2 (E2M1's emax),
    clamped to the E8M0 range [-127, 127]; elements are rounded to the nearest E2M1 value, ties
    to the even code, saturating at +-6. An all-zero group gets scale byte 127.
    rule="triton" (triton_kernels' downcast_to_mxfp, DequantScaleRoundingMode.ROUND_UP, as it
    was when gpt-oss was published and as vLLM still ships it): scale = 2**ceil(log2(fp32(amax
    / 6))) taken from the fp32 bits, so nothing saturates; elements are multiplied by 1/scale in
    fp32 and rounded to nearest with ties UP (the guard bit alone decides); an all-zero group
    gets scale byte 0. rule="triton-rtne": the same scale, elements rounded as triton_kernels
    does since its PR #8110 (ties to even by a guard/sticky rule; below 0.5 the bits shifted
    out do not count as sticky). rule="compressed-tensors" (its MXFP4 scheme, as llm-compressor
    writes it): shared exponent = floor(log2(amax)) - 2, one more when amax >= 1.75 *
    2**floor(log2(amax)) (its round_to_power_2 adds a quarter of the mantissa range and keeps the
    exponent), the byte clamped to [0, 254]; elements as OCP (nearest, ties to even, saturating at
    6, which happens for amax in [1.5, 1.75) * 2**e); an all-zero group gets scale byte 0. See
    `quantize_report` for what a rule lost. The sign is kept under every rule, so -0.0 encodes as
    code 8 (-0).
    """
    spec = _rule(rule)
    w = np.asarray(weights)
    if w.ndim < 1 or w.shape[-1] % 32:
        raise ValueError(f"weights: last axis must be a multiple of 32, got shape {w.shape}")
    if w.dtype.kind not in "fiub" and w.dtype != ml_dtypes.bfloat16:
        raise ValueError(f"weights: expected a real float array, got dtype {w.dtype}")
    if w.dtype == ml_dtypes.bfloat16:
        fast = _quantize_bf16(np.ascontiguousarray(w), rule)
        if fast is not None:
            return fast
    if _round_up_scale(rule):
        if w.dtype == np.float64:
            raise ValueError("weights: rule 'triton' takes bf16, fp16 or fp32 (as triton_kernels does), not float64")
        w = w.astype(np.float32)
    else:
        w = w.astype(np.float64 if w.dtype == np.float64 else np.float32)  # exact for every float input
    if not np.isfinite(w).all():
        raise ValueError("weights: contain inf or NaN, which MXFP4 cannot encode")
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)           # [..., G, 32]
    if _round_up_scale(rule):
        code, scales = _triton_codes(groups, ties_up=_ties_up(rule))
    else:
        amax = np.abs(groups).max(axis=-1)
        exp = _shared_exponent(amax, spec.scale == "threshold")       # [..., G] int32
        scaled = np.abs(groups) * np.ldexp(w.dtype.type(1), -exp)[..., None]  # exact: power of two
        code = _round_magnitude(scaled) | (np.signbit(groups).astype(np.uint8) << 3)
        scales = np.where(amax == 0, spec.zero_byte, exp + 127).astype(np.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)                  # element 2b low nibble, 2b+1 high
    return blocks.astype(np.uint8), scales


# bf16 magnitude bits (exponent << 7 | mantissa) of a value already divided by its scale -> its
# E2M1 magnitude code. For bf16 inputs "ocp" and "triton-rtne" round elements the same way (to
# nearest, ties to even, saturating at 6: triton's dropped sticky bits are zero for 7-bit
# mantissas) and "triton" rounds ties up; one table per tie rule, built from _round_magnitude
# on every such value.
CHUNK_ROWS_BYTES = 1 << 20


@functools.lru_cache(maxsize=None)
def _bf16_code_table(ties_up: bool = False) -> np.ndarray:
    bits = (np.arange(1 << 15, dtype=np.uint32) << 16).view(np.float32)
    return _round_magnitude(bits, ties_up=ties_up)


@functools.lru_cache(maxsize=None)
def _bf16_error_tables(ties_up: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(squared rounding error, squared value) of every scaled bf16 magnitude, at scale 1."""
    with np.errstate(invalid="ignore", over="ignore"):      # the inf/NaN patterns are never looked up
        q = (np.arange(1 << 15, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)
        err = q - np.abs(FP4_VALUES[_bf16_code_table(ties_up)]).astype(np.float64)
        return (err * err).astype(np.float32), (q * q).astype(np.float32)


def quantize_with_report(weights: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """quantize() plus quantize_report()'s figures; for bf16 both come from one pass over
    the bits (the error of each value read from a table of every scaled bf16 magnitude)."""
    w = np.asarray(weights)
    if w.dtype == ml_dtypes.bfloat16 and rule in SCALE_RULES and w.ndim and w.shape[-1] % 32 == 0:
        report: dict = {"err2": 0.0, "ref2": 0.0, "saturated": 0, "clamped_groups": 0}
        fast = _quantize_bf16(np.ascontiguousarray(w), rule, report)
        if fast is not None:
            return (*fast, report)
    blocks, scales = quantize(w, rule)
    return blocks, scales, quantize_report(w, blocks, scales, rule)


def quantize_with_report_transposed(weights: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """`quantize_with_report(np.swapaxes(weights, -1, -2), rule)`, byte for byte, for weights
    [..., K, N] whose groups of 32 run down the columns (HF's [E, in, out] expert parameters ->
    the stored [E, out, in/32, 16] blocks and [E, out, in/32] scales); `quantize_columns` of one part."""
    return quantize_columns([weights], rule)


def quantize_columns(parts: list[np.ndarray], rule: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """The weights `interleave(parts)` ([..., K, N * len(parts)], out[..., p::n] = parts[p]) as
    quantize_with_report_transposed quantizes them, without building the interleaved array:
    groups run down the columns, so each part is quantized alone and its packed columns are
    interleaved as they are transposed (to-hf's gate_up_proj, from MaxText's wi_0 and wi_1).

    bf16 and fp32 go through one fused XLA loop (mxfp4/columns.py) and only the packed bytes, a
    quarter of the input, are transposed; other inputs, and groups that need the float path, are
    interleaved, transposed and given to quantize_with_report."""
    ws = [np.asarray(w) for w in parts]
    w = ws[0]
    if (w.dtype in (ml_dtypes.bfloat16, np.float32) and rule in SCALE_RULES and w.ndim >= 2 and w.shape[-2] % 32 == 0
            and all(x.shape == w.shape and x.dtype == w.dtype for x in ws)):
        fast = _quantize_bf16_columns(ws, rule)
        if fast is not None:
            return fast
    x = ws[0] if len(ws) == 1 else np.stack(ws, axis=-1).reshape(*ws[0].shape[:-1], -1)   # out[..., p::n] = parts[p]
    return quantize_with_report(np.ascontiguousarray(np.swapaxes(x, -1, -2)), rule)


def _quantize_bf16_columns(parts: list[np.ndarray], rule: str) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """quantize_columns for bf16 or fp32 parts [..., K, N] by their bits (merge-lora's merged
    experts are fp32); None when a group needs the float path."""
    *lead, rows, cols = parts[0].shape
    m, groups, n = math.prod(lead), rows // 32, len(parts)
    blocks = _OUT.empty((m, cols, n, groups * 16), np.uint8)         # [M, N, parts, G*16]: interleaved columns
    scales = _OUT.empty((m, cols, n, groups), np.uint8)
    blocks_le = blocks.view("<u4")                                    # the kernel's words: 4 packed bytes each
    report: dict = {}
    for p, w in enumerate(parts):
        bits = np.ascontiguousarray(w).view(f"u{w.dtype.itemsize}").reshape(m * groups, 32, cols)
        got = columns.encode_columns(bits, _rule(rule), quarter_sticky=rule == "triton-rtne" and w.dtype.itemsize == 4)
        if got is None:
            return None
        words, s, rep = got
        for k, v in rep.items():
            report[k] = report.get(k, 0) + v
        words, s = words.reshape(m, groups * 4, cols), s.reshape(m, groups, cols)
        for i in range(m):     # numpy's own loop order: 8 ms for [1440, 5760] u8; 32-row tiles took 38
            np.copyto(blocks_le[i, :, p], words[i].T)
            np.copyto(scales[i, :, p], s[i].T)
    return blocks.reshape(*lead, cols * n, groups, 16), scales.reshape(*lead, cols * n, groups), report


def _quantize_bf16(w: np.ndarray, rule: str, report: dict | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """quantize() for bf16 weights by integer ops on their bits, in cache-sized chunks; the same
    bytes as the float path (tested), ~10x faster. None when a group needs the float path:
    NaN/inf (its error), or a largest magnitude so small that the scale leaves E8M0's range."""
    bits = w.view(np.uint16).reshape(-1, 32)                           # [groups, 32]
    mag = bits & np.uint16(0x7FFF)
    scaled = _bf16_scales(mag.max(axis=-1), rule)
    if scaled is None:
        return None
    k, scales = scaled
    table = _bf16_code_table(_ties_up(rule))
    codes = np.empty(bits.shape, np.uint8)
    step = max(1, CHUNK_ROWS_BYTES // 128)
    for a in range(0, bits.shape[0], step):
        b = min(a + step, bits.shape[0])
        idx = mag[a:b].astype(np.int32) - (k[a:b, None] << 7)          # q = |w| / 2**k as bf16 bits
        np.maximum(idx, 0, out=idx)                                    # underflowed: code 0
        np.take(table, idx, out=codes[a:b])
        codes[a:b] |= ((bits[a:b] >> 15) << 3).astype(np.uint8)
        if report is not None:
            _add_stats(report, idx, k[a:b], _ties_up(rule))
    blocks = codes[:, 0::2] | (codes[:, 1::2] << 4)
    shape = w.shape[:-1] + (w.shape[-1] // 32,)
    return blocks.reshape(*shape, 16), scales.reshape(shape)


def _bf16_scales(amax: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per group, from its largest magnitude's bf16 bits: (log2 of the scale as int32, the scale
    byte); None when a group needs the float path (inf/NaN, or a scale below E8M0's range)."""
    if amax.max(initial=0) >= 0x7F80 or ((amax > 0) & (amax < (8 << 7))).any():
        return None
    e, m = (amax >> 7).astype(np.int32), (amax & 0x7F).astype(np.int32)
    spec = _rule(rule)
    k = e - 129 + scale_step(spec.scale, m)                           # log2 of the scale
    zero = amax == 0
    k[zero] = 0
    return k, np.where(zero, np.uint8(spec.zero_byte), (k + 127).astype(np.uint8))



def _add_stats(report: dict, idx: np.ndarray, k: np.ndarray, ties_up: bool) -> None:
    """Add a chunk's squared error, squared weights and saturated count (idx: scaled bf16 bits,
    a group's 32 values along the last axis; k: log2 of each group's scale, idx's shape without it)."""
    err_t, val_t = _bf16_error_tables(ties_up)
    factor = np.ldexp(1.0, 2 * k.astype(np.int64))                     # per group: scale**2
    # multiply and sum, not np.dot: BLAS's threads took ~15 ms a call on the loaded 2-core VM
    for key, table in (("err2", err_t), ("ref2", val_t)):
        report[key] += float(np.multiply(np.take(table, idx).sum(axis=-1, dtype=np.float64), factor).sum())
    report["saturated"] += int(np.count_nonzero(idx > SAT_BITS))


def _triton_codes(groups: np.ndarray, ties_up: bool) -> tuple[np.ndarray, np.ndarray]:
    """groups [..., G, 32] fp32 -> (E2M1 codes [..., G, 32], scale bytes [..., G]) by the
    ROUND_UP rule of triton_kernels' downcast_to_mxfp, bit for bit in fp32; elements rounded
    with ties up (the guard bit alone) or, as since triton PR #8110, to even (guard/sticky)."""
    amax = np.abs(groups).max(axis=-1)
    dq = (amax / np.float32(6.0)).astype(np.float32).view(np.uint32)
    dq_exp = (dq + np.uint32(0x007FFFFF)) & np.uint32(0x7F800000)     # 2**ceil(log2), as fp32 bits
    scale = dq_exp.view(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(scale == 0, np.float32(0), np.float32(1) / scale).astype(np.float32)
    q = (groups * inv[..., None]).astype(np.float32).view(np.uint32)
    sign = (q >> 31).astype(np.uint8)
    exp = (q >> 23) & np.uint32(0xFF)
    man = q & np.uint32(0x7FFFFF)
    shift = np.minimum(np.uint32(126) - np.minimum(exp, np.uint32(126)), np.uint32(31))
    man = np.where(exp < 127, (np.uint32(0x400000) | (man >> 1)) >> shift, man)   # below 1: denormal E2M1
    e2 = np.maximum(exp, np.uint32(126)) - np.uint32(126)
    m2 = man >> 21
    inc = m2 & 1
    if not ties_up:
        inc &= ((man & np.uint32(0x1FFFFF)) != 0) | ((m2 >> 1) & 1)
    code = np.minimum((((e2 << 2) | m2) + inc) >> 1, np.uint32(7)).astype(np.uint8)
    return code | (sign << 3), (dq_exp >> 23).astype(np.uint8)


def quantize_report(weights: np.ndarray, blocks: np.ndarray, scales: np.ndarray, rule: str) -> dict:
    """What quantizing `weights` to (blocks, scales) lost: sum of squared errors and of squared
    weights (relative RMS error = sqrt(err2 / ref2)), values that saturated (|w| beyond 6x their
    group's scale), and groups clamped because E8M0's smallest scale is still too large for them."""
    w = np.asarray(weights).astype(np.float32).reshape(-1, 32)
    d = dequantize(blocks, scales, np.float32, workers=1).reshape(-1, 32)
    d -= w
    amax = np.maximum(w.max(axis=-1), -w.min(axis=-1))
    limit = 6 * np.ldexp(np.float32(1), scales.reshape(-1).astype(np.int32) - 127)
    over = amax > limit                                                # groups with a saturated value
    spec = _rule(rule)
    with np.errstate(divide="ignore"):
        if spec.scale == "round-up":
            ideal, lowest = np.ceil(np.log2(amax / 6)), -126
        else:
            ideal, lowest = _ideal_exponent(amax, spec.scale == "threshold"), -127
    return {"err2": float(np.dot(d.reshape(-1), d.reshape(-1))), "ref2": float(np.dot(w.reshape(-1), w.reshape(-1))),
            "saturated": int(np.count_nonzero(np.abs(w[over]) > limit[over, None])),
            "clamped_groups": int(np.count_nonzero((amax > 0) & (ideal < lowest)))}


def _shared_exponent(amax: np.ndarray, threshold: bool = False) -> np.ndarray:
    """floor(log2(amax)) - 2, exactly (frexp, not a rounded log2), plus one with `threshold` when
    amax >= 1.75 * 2**floor(log2(amax)) (compressed-tensors); clamped to [-127, 127]; 0 for 0."""
    exp = np.where(amax > 0, _ideal_exponent(amax, threshold), 0)
    return np.clip(exp, -127, 127).astype(np.int32)


def _ideal_exponent(amax: np.ndarray, threshold: bool) -> np.ndarray:
    """The unclamped shared exponent of groups with largest magnitude amax > 0 (int32), exactly."""
    mant, e = np.frexp(amax)                                           # amax = mant * 2**e, mant in [0.5, 1)
    return e.astype(np.int32) - 3 + ((mant >= 0.875) if threshold else 0)


_MIDPOINTS = (FP4_VALUES[1:8] + FP4_VALUES[0:7]) / 2                   # [7] 0.25 0.75 1.25 1.75 2.5 3.5 5


def _round_magnitude(x: np.ndarray, ties_up: bool = False) -> np.ndarray:
    """|x| (already divided by the scale) -> E2M1 magnitude code 0..7, nearest; a tie goes to the
    even code, or up with `ties_up`."""
    mid = _MIDPOINTS.astype(x.dtype)
    if ties_up:
        return np.searchsorted(mid, x, side="right").astype(np.uint8)  # count of midpoints <= x
    code = np.searchsorted(mid, x, side="left")                        # count of midpoints < x; > 5 -> 7
    tie = (code < 7) & (code % 2 == 1) & (x == mid[np.minimum(code, 6)])
    return (code + tie).astype(np.uint8)

"""MXFP4 encoding of bf16 weights whose groups of 32 run down the columns, compiled by XLA.

What `to-hf --mxfp4` runs: HF's expert weights are [E, in, out] and the published blocks group
`in` (blocks [E, out, in/32, 16]), so each group is 32 rows of one column. One fused XLA loop
on the CPU takes the bf16 bits to the group scales, the E2M1 codes, the packed bytes and the
error figures, all in integers but the error sums; numpy then only transposes the packed bytes
(a quarter of the input). The same bytes as `codec.quantize` under every rule (tested against
it on every bf16 pattern), at ~40 ms per [2880, 5760] gate_up expert where numpy's table
lookups took ~130 (BENCHMARKS.md, "to-hf --mxfp4").

The codes are computed, not looked up: for q = |w| / 2**k as bf16 bits (exponent E, mantissa
m), q >= 1 maps to E2M1's normal codes ((E - 126) << 1 | top mantissa bit, then rounded on
the 6 bits below, saturating at 7), [0.5, 1) to 1 or 2 and [0.25, 0.5) to 0 or 1 by the tie
rule; `codes(...)` equals `codec._bf16_code_table` on all 32768 magnitudes (tested).
"""

from __future__ import annotations

import functools

import numpy as np

SAT_BITS = 0x40C0          # bf16 bits of 6.0: a scaled magnitude above it saturated (OCP's rule only)


def codes(idx, ties_up: bool, mant: int = 7, quarter_sticky: bool = False):
    """E2M1 magnitude code (int32, 0..7) of scaled magnitudes `idx` (int32 bits, >= 0) of a float
    with `mant` mantissa bits (7: bf16, 23: fp32). `quarter_sticky`: in [0.25, 0.5) only the
    mantissa bits from bit 2 up make the value round up (triton_kernels' round-to-nearest-even,
    which shifts the others out before it looks; only fp32 has such bits)."""
    import jax.numpy as jnp
    e, man = idx >> mant, idx & ((1 << mant) - 1)
    normal = ((e - 126) << 1) | (man >> (mant - 1))                   # 2..7 for q in [1, 8)
    rest, half = man & ((1 << (mant - 1)) - 1), 1 << (mant - 2)
    up = (rest > half) | ((rest == half) & (True if ties_up else (normal & 1) == 1))
    normal = jnp.minimum(normal + up.astype(jnp.int32), 7)
    half_code = 1 + (man >= (1 << (mant - 1))).astype(jnp.int32)      # [0.5, 1): the tie 0.75 -> 1.0 either way
    if ties_up:
        quarter = jnp.ones_like(man)
    else:                                                              # [0.25, 0.5): 0.25 ties to 0
        quarter = ((man >> 2) > 0 if quarter_sticky else man > 0).astype(jnp.int32)
    return jnp.where(e >= 127, normal, jnp.where(e == 126, half_code, jnp.where(e == 125, quarter, 0)))


def scale_step(scale: str, m, mant: int = 7):
    """What a scale rule adds to floor(log2(amax)) - 2 given amax's `mant`-bit mantissa `m` (numpy
    or jax ints; 7 for bf16, 23 for fp32): "round-up", 1 above a mantissa of exactly 1.5 (amax /
    6 > 2**e / 4; for a normal fp32 amax, fp32(amax / 6) never rounds onto a power of two, so
    this is triton's ceil(log2(fp32(amax / 6))) exactly); "threshold" (compressed-tensors), 1 from
    1.75; "floor", 0."""
    if scale == "round-up":
        return (m > (1 << (mant - 1))).astype(m.dtype)
    if scale == "threshold":
        return (m >= (3 << (mant - 2))).astype(m.dtype)
    return 0


def _value(c):
    """|E2M1 value| of code c (0..7) as float32, from its bits: 0, 0.5, then 2**(c//2 - 1) * (1 + (c&1)/2)."""
    import jax
    import jax.numpy as jnp
    bits = jnp.where(c >= 2, ((126 + (c >> 1)) << 23) | ((c & 1) << 22), jnp.where(c == 1, 126 << 23, 0))
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)


def _sum32(x):
    """x [G, 32, N] summed over axis 1 by halving: elementwise adds that XLA vectorizes along N
    (its reduce over the middle axis ran ~4x slower)."""
    while x.shape[1] > 1:
        h = x.shape[1] // 2
        x = x[:, :h] + x[:, h:]
    return x[:, 0]


# (mantissa bits, magnitude mask) of the float formats the kernel takes, by bit width
FORMATS = {16: (7, 0x7FFF), 32: (23, 0x7FFFFFFF)}


@functools.lru_cache(maxsize=None)
def _kernel(scale_rule: str, ties_up: bool, zero_byte: int, width: int = 16, quarter_sticky: bool = False):
    import jax
    import jax.numpy as jnp
    mant, mask = FORMATS[width]
    sat_bits = SAT_BITS if width == 16 else SAT_BITS << 16

    def encode(bits):
        """uint16 (bf16) or uint32 (fp32) bits [G, 32, N] -> packed words [G, 4, N] uint32, scale
        bytes [G, N], sum of squared errors and of squared values per group at scale 1 [G, N] f32,
        saturated count, whether a group needs the float path (inf/NaN, or a scale near or below
        E8M0's range).

        Word w of a group holds rows 8w..8w+7, row r's code at bits 4r: as little-endian bytes,
        the group's 16 packed bytes (element 2b low nibble, 2b+1 high). Words, not bytes,
        because the caller transposes them: a quarter of the elements (~1 ms where the bytes
        of a [2880, 2880] part took ~3.5)."""
        b = bits.astype(jnp.uint32)
        mag = (b & mask).astype(jnp.int32)
        amax = mag.max(axis=1)                                           # [G, N]
        e, m = amax >> mant, amax & ((1 << mant) - 1)
        k = e - 129 + scale_step(scale_rule, m, mant)                   # log2 of the scale
        zero = amax == 0
        k = jnp.where(zero, 0, k)
        bad = ((amax >= (0xFF << mant)) | (~zero & (amax < (8 << mant)))).any()
        scale = jnp.where(zero, zero_byte, k + 127).astype(jnp.uint8)
        idx = jnp.maximum(mag - (k << mant)[:, None, :], 0)             # q = |w| / 2**k as float bits
        c = codes(idx, ties_up, mant, quarter_sticky)
        code = (c.astype(jnp.uint32) | ((b >> (width - 1)) << 3))
        g, _, n = code.shape
        shifts = (4 * jnp.arange(8, dtype=jnp.uint32))[None, None, :, None]
        words = (code.reshape(g, 4, 8, n) << shifts).sum(axis=2, dtype=jnp.uint32)   # disjoint bits: sum = or
        q = jax.lax.bitcast_convert_type((idx << (32 - width)).astype(jnp.uint32), jnp.float32)
        d = q - _value(c)
        # under the round-up rule q <= 6 always (amax / 2**ceil(log2(amax / 6))): nothing saturates
        sat = jnp.int32(0) if scale_rule == "round-up" else (idx > sat_bits).sum(dtype=jnp.int32)
        return words, scale, _sum32(d * d), _sum32(q * q), sat, bad

    return jax.jit(encode)


@functools.lru_cache(maxsize=None)
def _cpu():
    import jax
    return jax.local_devices(backend="cpu")[0]          # this process's (under jax.distributed too)


# scale byte s -> the square of its scale, 4**(s - 127): what a group's error sums at scale 1 are worth
_SCALE_SQUARED = np.ldexp(1.0, 2 * (np.arange(256) - 127))


def encode_columns(bits: np.ndarray, rule, quarter_sticky: bool = False):
    """uint16 bf16 or uint32 fp32 bits [G, 32, N] (groups down the columns), quantized by `rule`
    (a codec.ScaleRule; `quarter_sticky` as for `codes`) -> (packed words [G*4, N] uint32,
    see `_kernel`; scales [G, N] u8; report {err2, ref2, saturated, clamped_groups}); None when
    a group needs the float path. Runs on the CPU whatever JAX's default device."""
    import jax
    kernel = _kernel(rule.scale, rule.ties_up, rule.zero_byte, bits.dtype.itemsize * 8, quarter_sticky)
    words, scale, e2, r2, sat, bad = kernel(jax.device_put(bits, _cpu()))
    if bool(bad):
        return None
    scales = np.asarray(scale)
    flat = scales.reshape(-1)
    report = {key: float(np.bincount(flat, weights=np.asarray(s).reshape(-1), minlength=256) @ _SCALE_SQUARED)
              for key, s in (("err2", e2), ("ref2", r2))}
    report |= {"saturated": int(sat), "clamped_groups": 0}
    return np.asarray(words).reshape(-1, bits.shape[-1]), scales, report

"""MXFP4 codec: bit-exact against transformers' dequantizer, the docs/formats.md §3 example, errors, quantize."""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_convert.errors import CorruptTensorError
from gptoss_convert.mxfp4 import FP4_VALUES, codec, dequantize, dequantize_transposed, quantize

BF16 = ml_dtypes.bfloat16
DTYPES = {"bf16": (BF16, "bfloat16"), "fp16": (np.float16, "float16"), "fp32": (np.float32, "float32")}


def bits(a: np.ndarray) -> np.ndarray:
    """Bit patterns, so that -0.0 != +0.0 and inf/NaN compare by their encoding."""
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def hf_dequantize(blocks: np.ndarray, scales: np.ndarray, torch_dtype: str) -> np.ndarray:
    """transformers' dequantizer, back in our stored orientation [E, R, G*32] (it returns [E, G*32, R])."""
    out = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                     dtype=getattr(torch, torch_dtype))
    np_dtype = {"bfloat16": BF16, "float16": np.float16, "float32": np.float32}[torch_dtype]
    raw = out.transpose(1, 2).contiguous().view(torch.int16 if np_dtype != np.float32 else torch.int32)
    return raw.numpy().view(np_dtype)


def exhaustive_grid() -> tuple[np.ndarray, np.ndarray]:
    """Every block byte under every scale byte but 255: blocks [255, 1, 16, 16], scales [255, 1, 16]."""
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (255, 1, 16, 16))
    scales = np.broadcast_to(np.arange(255, dtype=np.uint8).reshape(255, 1, 1), (255, 1, 16))
    return np.ascontiguousarray(blocks), np.ascontiguousarray(scales)


def random_pair(rng, shape, lo=0, hi=254):
    blocks = rng.integers(0, 256, size=(*shape, 16), dtype=np.uint8)
    scales = rng.integers(lo, hi + 1, size=shape, dtype=np.uint8)
    return blocks, scales


# -- dequantize: docs/formats.md §3 and the oracle -------------------------------------------

def test_spec_worked_example():
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, :2] = [0x1A, 0x7F]
    out = dequantize(blocks, np.array([0x80], np.uint8), "float32")
    assert out.shape == (32,)
    np.testing.assert_array_equal(out[:4], [-2.0, 1.0, -12.0, 12.0])
    np.testing.assert_array_equal(out[4:], 0.0)
    assert out.dtype == np.float32


def test_nibble_order_is_low_then_high_not_gguf_split():
    low = np.arange(16, dtype=np.uint8).reshape(1, 16)                  # byte b = code b in the low nibble
    one = np.array([127], np.uint8)
    out = dequantize(low, one, "float32")
    np.testing.assert_array_equal(out[0::2], FP4_VALUES)                 # element 2b   <- low nibble of byte b
    np.testing.assert_array_equal(bits(out[1::2]), 0)                    # element 2b+1 <- high nibble (+0)
    out = dequantize(low << 4, one, "float32")
    np.testing.assert_array_equal(out[1::2], FP4_VALUES)
    np.testing.assert_array_equal(bits(out[0::2]), 0)


@pytest.mark.parametrize("name", ["bf16", "fp32", "fp16"])
def test_exhaustive_grid_bit_exact_vs_transformers(name):
    np_dtype, torch_dtype = DTYPES[name]
    blocks, scales = exhaustive_grid()
    ours = dequantize(blocks, scales, name)
    assert ours.dtype == np_dtype and ours.shape == (255, 1, 512)
    np.testing.assert_array_equal(bits(ours), bits(hf_dequantize(blocks, scales, torch_dtype)))


@pytest.mark.parametrize("name", ["bf16", "fp32"])
def test_exhaustive_grid_exact_values(name):
    """Independent of any oracle: every finite value is FP4 * 2**(s-127) exactly, sign of zero kept."""
    blocks, scales = exhaustive_grid()
    ours = dequantize(blocks, scales, name).astype(np.float64).reshape(255, 256, 2)
    byte = np.arange(256)
    nib = np.stack([byte & 15, byte >> 4], axis=-1)                                 # [256, 2]
    want = FP4_VALUES[nib].astype(np.float64)[None] * np.ldexp(1.0, np.arange(255) - 127)[:, None, None]
    finite = np.abs(want) < 2.0 ** 128                              # beyond: inf, as in every oracle
    np.testing.assert_array_equal(ours[finite], want[finite])
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(np.broadcast_to(want, ours.shape)))
    assert np.isinf(ours[~finite]).all()
    assert (~finite).sum() == 2 * 16 * (4 + 8)      # scale 253: +-4, +-6; scale 254: +-2..+-6


@pytest.mark.parametrize("name", ["bf16", "fp32", "fp16"])
def test_random_bit_exact_vs_transformers(name):
    rng = np.random.default_rng(7)
    blocks, scales = random_pair(rng, (3, 40, 6), lo=100, hi=150)   # real checkpoints' scale range
    np_dtype, torch_dtype = DTYPES[name]
    np.testing.assert_array_equal(bits(dequantize(blocks, scales, name)),
                                  bits(hf_dequantize(blocks, scales, torch_dtype)))


def test_negative_zero_is_kept():
    blocks = np.zeros((2, 16), np.uint8)
    blocks[0, 0] = 0x08                           # element 0: code 8 (-0), element 1: code 0 (+0)
    blocks[1, 3] = 0x88                           # elements 6 and 7 of group 1: -0, -0
    scales = np.array([3, 200], np.uint8)
    out16 = bits(dequantize(blocks, scales, "bf16"))
    assert out16[0] == 0x8000 and out16[1] == 0x0000
    assert out16[32 + 6] == out16[32 + 7] == 0x8000
    assert bits(dequantize(blocks, scales, "fp32"))[0] == 0x80000000
    assert bits(dequantize(blocks, scales, "fp16"))[0] == 0x8000


def test_subnormal_smallest_values_exact():
    blocks = np.full((1, 16), 0x91, np.uint8)     # low 1 (+0.5), high 9 (-0.5)
    out = dequantize(blocks, np.array([0], np.uint8), "bf16")
    assert float(out[0]) == 2.0 ** -128 and float(out[1]) == -(2.0 ** -128)
    assert bits(out)[0] == 0x0020                  # bf16 subnormal: 2**-128 = 2**-133 * 32


def test_fp16_follows_numpy_cast_semantics():
    blocks, scales = exhaustive_grid()
    with np.errstate(over="ignore"):
        want = dequantize(blocks, scales, "fp32").astype(np.float16)
    got = dequantize(blocks, scales, "fp16")
    np.testing.assert_array_equal(bits(got), bits(want))
    assert np.isinf(got[200]).any() and (got[0] == 0).all()             # overflow -> inf, underflow -> 0


def test_float64_is_float32_widened():
    blocks, scales = exhaustive_grid()
    np.testing.assert_array_equal(bits(dequantize(blocks, scales, np.float64)),
                                  bits(dequantize(blocks, scales, "fp32").astype(np.float64)))


@pytest.mark.parametrize("spelling", ["bfloat16", "bf16", BF16, np.dtype(BF16)])
def test_dtype_spellings(spelling):
    blocks, scales = random_pair(np.random.default_rng(0), (2, 3))
    assert dequantize(blocks, scales, spelling).dtype == np.dtype(BF16)


# -- dequantize: threads, chunks, out=, transposed ---------------------------------------------

def test_default_steps_on_two_threads_match_transformers():
    """At the real step size: a tensor of several CHUNK_GROUPS-sized steps (the last one ragged),
    split over 2 threads, bit for bit as transformers decodes it."""
    groups = 2 * codec.CHUNK_GROUPS + 1234
    blocks, scales = random_pair(np.random.default_rng(5), (1, groups // 10, 10), lo=100, hi=150)
    assert scales.size > 2 * codec.CHUNK_GROUPS
    ours = dequantize(blocks, scales, "bf16", workers=2)
    np.testing.assert_array_equal(bits(ours), bits(hf_dequantize(blocks, scales, "bfloat16")))


@pytest.mark.parametrize("workers", [2, 3, 8, None])
def test_multithreaded_equals_single_threaded(monkeypatch, workers):
    monkeypatch.setattr(codec, "CHUNK_GROUPS", 7)          # many ragged chunks on a small tensor
    blocks, scales = random_pair(np.random.default_rng(3), (3, 37, 5))
    one = dequantize(blocks, scales, "bf16", workers=1)
    np.testing.assert_array_equal(bits(dequantize(blocks, scales, "bf16", workers=workers)), bits(one))
    oracle = dequantize(blocks.reshape(-1, 16), scales.reshape(-1), "fp32").reshape(3, 37, 160)
    np.testing.assert_array_equal(bits(one.astype(np.float32)), bits(oracle))


@given(n=st.integers(0, 200), workers=st.integers(1, 9), grain=st.integers(1, 17))
def test_parallel_covers_every_index_once(n, workers, grain):
    seen = []
    codec._parallel(lambda a, b: seen.append((a, b)), n, workers, grain)
    covered = sorted(i for a, b in seen for i in range(a, b))
    assert covered == list(range(n))
    assert all(a % grain == 0 for a, _ in seen)


def test_out_is_filled_and_returned():
    blocks, scales = random_pair(np.random.default_rng(4), (2, 9, 3))
    out = np.full((2, 9, 96), 7, BF16)
    got = dequantize(blocks, scales, "bf16", out=out)
    assert got is out
    np.testing.assert_array_equal(bits(out), bits(dequantize(blocks, scales, "bf16")))


@pytest.mark.parametrize("name", ["bf16", "fp32", "fp16"])
@pytest.mark.parametrize("shape", [(3, 50, 7), (2, 3, 33, 2), (1, 1), (4, 1, 3)])
def test_transposed_equals_swapaxes(monkeypatch, name, shape):
    monkeypatch.setattr(codec, "TILE_BYTES", 1)             # 16-row tiles: ragged last tile
    blocks, scales = random_pair(np.random.default_rng(5), shape)
    want = np.ascontiguousarray(np.swapaxes(dequantize(blocks, scales, name), -1, -2))
    for workers in (1, 3):
        got = dequantize_transposed(blocks, scales, name, workers=workers)
        assert got.shape == want.shape and got.flags.c_contiguous
        np.testing.assert_array_equal(bits(got), bits(want))


def test_transposed_matches_transformers_orientation():
    blocks, scales = random_pair(np.random.default_rng(6), (2, 24, 3))
    hf = np.ascontiguousarray(np.swapaxes(hf_dequantize(blocks, scales, "bfloat16"), -1, -2))  # [E, in, out]
    np.testing.assert_array_equal(bits(dequantize_transposed(blocks, scales)), bits(hf))


def test_non_contiguous_and_empty_inputs():
    blocks, scales = random_pair(np.random.default_rng(8), (6, 4, 3))
    want = dequantize(np.ascontiguousarray(blocks[::2]), np.ascontiguousarray(scales[::2]))
    assert want.shape == (3, 4, 96)
    np.testing.assert_array_equal(bits(dequantize(blocks[::2], scales[::2])), bits(want))
    np.testing.assert_array_equal(bits(dequantize_transposed(blocks[::2], scales[::2])),
                                  bits(np.ascontiguousarray(np.swapaxes(want, -1, -2))))
    assert dequantize(blocks[:, :0], scales[:, :0]).shape == (6, 0, 96)
    assert dequantize_transposed(blocks[:, :0], scales[:, :0]).shape == (6, 96, 0)


# -- dequantize: errors ----------------------------------------------------------------------

@pytest.mark.parametrize("fn", [dequantize, dequantize_transposed])
def test_scale_255_names_tensor_and_first_index(fn):
    blocks, scales = random_pair(np.random.default_rng(9), (2, 3, 4))
    scales[1, 2, 3] = scales[1, 2, 1] = 255
    with pytest.raises(CorruptTensorError, match=r"layers\.7\.mlp\.experts\.down_proj.*255.*\(1, 2, 1\)"):
        fn(blocks, scales, name="model.layers.7.mlp.experts.down_proj")


def test_scale_255_raises_before_writing_out():
    blocks, scales = random_pair(np.random.default_rng(9), (2, 3))
    scales[0, 0] = 255
    out = np.zeros((2, 96), np.float32)
    with pytest.raises(CorruptTensorError, match=r"\(0, 0\)"):
        dequantize(blocks, scales, "fp32", out=out)
    assert not out.any()


@pytest.mark.parametrize("blocks, scales, msg", [
    (np.zeros((2, 16), np.int8), np.zeros(2, np.uint8), "must be uint8"),
    (np.zeros((2, 16), np.uint8), np.zeros(2, np.float32), "must be uint8"),
    (np.zeros((2, 15), np.uint8), np.zeros(2, np.uint8), "do not pair"),
    (np.zeros((2, 16), np.uint8), np.zeros(3, np.uint8), "do not pair"),
    (np.zeros(16, np.uint8), np.zeros((), np.uint8), "do not pair"),
])
def test_bad_inputs_name_the_tensor(blocks, scales, msg):
    with pytest.raises(CorruptTensorError, match=f"w\\.x: .*{msg}"):
        dequantize(blocks, scales, name="w.x")


def test_transposed_needs_a_row_axis():
    with pytest.raises(CorruptTensorError, match="no row axis"):
        dequantize_transposed(np.zeros((2, 16), np.uint8), np.zeros(2, np.uint8))


@pytest.mark.parametrize("dtype", ["int8", np.int32, "float8"])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        dequantize(np.zeros((1, 16), np.uint8), np.zeros(1, np.uint8), dtype)


@pytest.mark.parametrize("out, msg", [
    (np.zeros((1, 32), BF16), "shape"),
    (np.zeros(32, np.float32), "dtype"),
    (np.zeros(64, BF16)[::2], "C-contiguous"),
    ([0.0] * 32, "numpy array"),
])
def test_bad_out(out, msg):
    with pytest.raises(ValueError, match=f"out: .*{msg}"):
        dequantize(np.zeros((1, 16), np.uint8), np.zeros(1, np.uint8), out=out)


@pytest.mark.parametrize("workers", [0, -1, 1.5])
def test_bad_workers(workers):
    with pytest.raises(ValueError, match="workers"):
        dequantize(np.zeros((1, 16), np.uint8), np.zeros(1, np.uint8), workers=workers)


# -- quantize ----------------------------------------------------------------------------------

def reference_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over the 8 magnitude codes per element, in exact arithmetic (Fractions)."""
    groups = w.astype(np.float64).reshape(-1, 32)
    codes, scale_bytes = [], []
    for g in groups:
        amax = max(abs(float(x)) for x in g)
        exp = 0 if amax == 0 else min(127, max(-127, math.frexp(amax)[1] - 1 - 2))
        scale = Fraction(2) ** exp
        row = []
        for x in g:
            mag = abs(Fraction(float(x))) / scale
            dist = [abs(mag - Fraction(float(v))) for v in FP4_VALUES[:8]]
            best = min(dist)
            ties = [c for c in range(8) if dist[c] == best]
            code = next((c for c in ties if c % 2 == 0), ties[0])
            row.append(code | (8 if np.signbit(x) else 0))
        codes.append(row)
        scale_bytes.append(exp + 127)
    codes = np.array(codes, np.uint8)
    blocks = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return (blocks.reshape(*w.shape[:-1], w.shape[-1] // 32, 16),
            np.array(scale_bytes, np.uint8).reshape(*w.shape[:-1], -1))


# Grid values and midpoints under random powers of two: ties and exact hits, not just noise.
_special = st.builds(lambda v, s, e: float(np.float32(s * v * 2.0 ** e)),
                     st.sampled_from(sorted(set(np.abs(FP4_VALUES).tolist())
                                            | {0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0})),
                     st.sampled_from([1.0, -1.0]), st.integers(-130, 120))
_elements = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False), _special,
                      st.floats(-8, 8, width=32))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64])), elements=_elements))
def test_quantize_matches_brute_force(w):
    blocks, scales = quantize(w)
    ref_blocks, ref_scales = reference_quantize(w)
    np.testing.assert_array_equal(scales, ref_scales)
    np.testing.assert_array_equal(blocks, ref_blocks)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 32 - 1))
def test_quantize_round_trip_on_grid_is_exact(seed):
    blocks, scales = random_pair(np.random.default_rng(seed), (4, 3), lo=0, hi=252)   # no inf values
    w = dequantize(blocks, scales, "fp32")                                            # on the grid
    np.testing.assert_array_equal(bits(dequantize(*quantize(w), "fp32")), bits(w))
    np.testing.assert_array_equal(bits(dequantize(*quantize(w.astype(BF16)), "bf16")), bits(w.astype(BF16)))


def test_quantize_keeps_codes_when_group_reaches_six():
    blocks, scales = random_pair(np.random.default_rng(11), (5, 4), lo=1, hi=252)
    blocks[..., 0] = (blocks[..., 0] & 0xF0) | 0x07                 # every group holds a +6
    got_blocks, got_scales = quantize(dequantize(blocks, scales, "fp32"))
    np.testing.assert_array_equal(got_scales, scales)
    np.testing.assert_array_equal(got_blocks, blocks)


def test_quantize_rules_by_hand():
    w = np.zeros((4, 32), np.float32)
    w[1, :] = -0.0
    w[2, :4] = [7.9, 5.0, 0.75, -0.25]     # amax 7.9: exponent 0; 7.9 saturates to 6; ties go to even code
    w[3, :2] = [1e-40, -3e-39]             # tiny: exponent clamped at -127
    blocks, scales = quantize(w)
    assert scales.tolist() == [[127], [127], [127], [0]]
    assert (blocks[0] == 0).all() and (blocks[1] == 0x88).all()
    assert blocks[2, 0, :2].tolist() == [0x7 | (0x6 << 4), 0x2 | (0x8 << 4)]   # 6, 4 | 1.0, -0
    back = dequantize(blocks, scales, "fp32")
    np.testing.assert_array_equal(back[2, :4], [6.0, 4.0, 1.0, -0.0])
    assert np.signbit(back[1]).all() and np.signbit(back[2, 3])


@pytest.mark.parametrize("w, msg", [
    (np.zeros((2, 31), np.float32), "multiple of 32"),
    (np.zeros((), np.float32), "multiple of 32"),
    (np.full((1, 32), np.nan, np.float32), "inf or NaN"),
    (np.full((1, 32), np.inf, np.float32), "inf or NaN"),
    (np.zeros((1, 32), np.complex64), "real float"),
])
def test_quantize_bad_input(w, msg):
    with pytest.raises(ValueError, match=f"weights: .*{msg}"):
        quantize(w)


@pytest.mark.parametrize("e", [-100, -2, 0, 2, 100])
def test_quantize_exponent_is_exact_just_below_a_power_of_two(e):
    """floor(log2(amax)) from frexp, not a rounded float log2 (which says e for 2**e * (1 - 2**-24))."""
    w = np.zeros((1, 32), np.float32)
    w[0, 5] = np.nextafter(np.float32(2.0 ** e), np.float32(0))
    assert quantize(w)[1].tolist() == [[127 + (e - 1) - 2]]
    w[0, 5] = np.float32(2.0 ** e)
    assert quantize(w)[1].tolist() == [[127 + e - 2]]

"""The compressed-tensors MXFP4 scale rule against compressed-tensors' own code (its MXFP4 preset's
calculate_qparams + fake_quantize, and compress_mx_scale for the stored byte), decoded by
transformers' own MXFP4 dequantizer; every quantizer path (bf16 bit path, float path, the XLA
column kernel); the per-tensor report; to-hf --mxfp4 --scale-rule compressed-tensors end to end."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_convert.mxfp4.codec import (
    SCALE_RULES, _quantize_bf16_columns, quantize, quantize_columns, quantize_report, quantize_with_report)

BF16 = np.dtype(ml_dtypes.bfloat16)
RULE = "compressed-tensors"


def ct_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors' MXFP4 of x [..., K] (groups of 32 along K), by its own code: (the
    fake-quantized values as float32, the E8M0 bytes it stores)."""
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = preset_name_to_scheme("MXFP4", ["Linear"]).weights
    assert args.group_size == 32 and args.scale_dtype == torch.uint8
    t = torch.from_numpy(np.ascontiguousarray(x).view(np.uint16)).view(torch.bfloat16) if x.dtype == BF16 \
        else torch.from_numpy(np.ascontiguousarray(x))
    g = t.reshape(*t.shape[:-1], -1, 32)
    scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
    values = fake_quantize(t, scale, zero, args).float().numpy()
    return values, compress_mx_scale(scale.float(), torch.uint8).numpy()


def hf_values(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' MXFP4 decoder (float32) of row-grouped blocks [R, G, 16], scales [R, G] -> [R, G*32]."""
    dec = convert_moe_packed_tensors(torch.from_numpy(blocks[None]), torch.from_numpy(scales[None]),
                                     dtype=torch.float32)               # [1, G*32, R]
    return dec[0].T.contiguous().numpy()


def edge_weights(dtype, rows: int = 40, seed: int = 0) -> np.ndarray:
    """[rows, 256] weights, groups of 32 along the rows, with the groups a rule can get wrong: all
    zero (and -0.0), a largest magnitude exactly at 1, 1.5 and 1.75 times a power of two and one
    bf16 step either side of 1.75 (the 0.75 threshold), saturating groups (amax in [1.5, 1.75) x
    2**e), negative maxima, tiny groups whose scale leaves E8M0's range, and elements at every
    E2M1 midpoint (ties)."""
    w = (np.random.default_rng(seed).standard_t(3, (rows, 256)) * 0.02).astype(np.float32)
    w[0, :32] = 0
    w[0, 32:64] = -0.0
    for i, amax in enumerate([1.0, 1.5, 1.75, 1.7421875, 1.7578125, 1.625, 0.75 * 2 ** -9, 1.75 * 2 ** 5]):
        row = w[1 + i // 4, (i % 4) * 64:(i % 4) * 64 + 32]
        row[:] = np.linspace(-amax, amax * 0.9, 32)
        row[7] = -amax if i % 2 else amax
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    w[4, :32] = 0
    w[4, 0] = 6.0
    w[4, 1:8], w[4, 8:15] = ties, -ties                       # scale 2**0 under floor and threshold: exact ties
    w[5, :32] = np.float32(2.0 ** -133) * np.arange(32)         # below E8M0's smallest scale: clamped
    w[5, 32:64] = np.float32(3e-39)
    return w.astype(dtype)


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bf16", "fp32"])
def test_every_value_and_byte_is_compressed_tensors_own(dtype):
    """quantize (row groups), quantize_columns (column groups: what to-hf and merge-lora call),
    decoded by transformers: every value is compressed-tensors' fake-quantized one, every scale
    byte the one its compressor stores; edge groups included and each one hit."""
    w = edge_weights(dtype)
    want, want_bytes = ct_quantize(w)
    blocks, scales = quantize(w, RULE)
    np.testing.assert_array_equal(scales, want_bytes)
    np.testing.assert_array_equal(hf_values(blocks, scales), want)
    cb, cs, _ = quantize_columns([np.ascontiguousarray(w.T)], RULE)
    assert cb.tobytes() == blocks.tobytes() and cs.tobytes() == scales.tobytes()
    # the edge groups did what they are there for
    assert scales[0, 0] == scales[5, 0] == scales[5, 1] == 0               # all zero; clamped to E8M0's floor
    assert int(scales[1, 4]) - 127 == -1 and int(scales[1, 6]) - 127 == -2  # 1.75 -> 2**-1; one step below -> 2**-2
    assert want[1, 192 + 7] == want[2, 64 + 7] == -1.5                     # -1.7421875, -1.625 saturate at 6 * 2**-2
    assert (want[4, 1:8] == [0, 1, 1, 2, 2, 4, 4]).all()                     # ties to the even code


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bf16", "fp32"])
def test_random_tensors_take_every_path_and_equal_compressed_tensors(dtype):
    """Heavy-tailed weights with no out-of-range group: the bf16 bit path and the XLA column
    kernel are taken (asserted), and agree with compressed-tensors value for value."""
    w = (np.random.default_rng(1).standard_t(2, (96, 512)) * 0.05).astype(dtype)
    want, want_bytes = ct_quantize(w)
    blocks, scales = quantize(w, RULE)
    np.testing.assert_array_equal(scales, want_bytes)
    np.testing.assert_array_equal(hf_values(blocks, scales), want)
    if dtype == BF16:
        fast = _quantize_bf16_columns([np.ascontiguousarray(w.T)], RULE)
        assert fast is not None and fast[0].tobytes() == blocks.tobytes() and fast[1].tobytes() == scales.tobytes()


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bf16", "fp32"])
def test_report_is_the_error_of_compressed_tensors_values(dtype):
    """The per-tensor report (relative RMS error, saturated values, clamped groups) of every path
    equals the figures computed from compressed-tensors' own quantization of the same weights."""
    w = edge_weights(dtype, rows=64, seed=2)
    want, want_bytes = ct_quantize(w)
    x = w.astype(np.float64)
    err2, ref2 = float(((want - x) ** 2).sum()), float((x ** 2).sum())
    limit = 6 * np.ldexp(1.0, want_bytes.astype(np.int32) - 127)
    saturated = int((np.abs(x).reshape(64, -1, 32) > limit[..., None]).sum())
    assert saturated > 0
    for _, _, rep in (quantize_with_report(w, RULE), quantize_columns([np.ascontiguousarray(w.T)], RULE)):
        assert rep["saturated"] == saturated and rep["clamped_groups"] == 2
        assert rep["err2"] == pytest.approx(err2, rel=1e-5) and rep["ref2"] == pytest.approx(ref2, rel=1e-5)
    blocks, scales = quantize(w, RULE)
    assert quantize_report(w, blocks, scales, RULE)["saturated"] == saturated


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_bf16_report_one_pass_equals_the_dequantized_report(rule):
    """The table/kernel report of bf16 weights (no out-of-range group: the fast paths) equals
    quantize_report's, which dequantizes and compares, under every rule."""
    w = (np.random.default_rng(4).standard_t(3, (96, 256)) * 0.02).astype(BF16)
    blocks, scales, fast = quantize_with_report(w, rule)
    slow = quantize_report(w, blocks, scales, rule)
    cols = quantize_columns([np.ascontiguousarray(w.T)], rule)[2]
    for rep in (fast, cols):
        assert rep["saturated"] == slow["saturated"] and rep["clamped_groups"] == slow["clamped_groups"] == 0
        for key in ("err2", "ref2"):
            assert rep[key] == pytest.approx(slow[key], rel=1e-5)
    assert (slow["saturated"] > 0) == (rule in ("ocp", RULE))


def test_to_hf_cli_writes_compressed_tensors_values(bf16_dir, tmp_path):
    """to-hf --mxfp4 --scale-rule compressed-tensors (the CLI): every expert tensor, decoded by
    transformers, is compressed-tensors' quantization of the BF16 source's [E, out, in] rows, and
    conversion.json records the rule and a per-tensor report."""
    import subprocess
    import sys

    from conftest import run_env
    from gptoss_convert.converters.to_orbax import to_orbax
    from test_merge_lora import stored
    orbax = to_orbax(bf16_dir, tmp_path / "orbax", scanned=False, progress=False, log=lambda *_: None)
    r = subprocess.run([sys.executable, "-m", "gptoss_convert", "to-hf", str(orbax), str(tmp_path / "hf"), "--mxfp4",
                        "--scale-rule", RULE, "--no-progress"], env=run_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got, src = stored(tmp_path / "hf"), stored(bf16_dir)
    experts = [n for n in src if n.endswith(("gate_up_proj", "down_proj"))]
    assert len(experts) == 12
    for n in experts:
        rows = np.ascontiguousarray(np.swapaxes(src[n], 1, 2))                # [E, out, in]: groups along in
        want, want_bytes = ct_quantize(rows)
        np.testing.assert_array_equal(got[n + "_scales"], want_bytes, err_msg=n)
        dec = convert_moe_packed_tensors(torch.from_numpy(got[n + "_blocks"]), torch.from_numpy(got[n + "_scales"]),
                                         dtype=torch.float32).numpy()        # [E, in, out]
        np.testing.assert_array_equal(np.swapaxes(dec, 1, 2), want, err_msg=n)
    rec = json.loads((tmp_path / "hf" / "conversion.json").read_text())
    assert rec["options"]["scale_rule"] == RULE and sorted(rec["requantization"]["tensors"]) == sorted(experts)
    assert "compressed-tensors scales" in r.stdout + r.stderr


@pytest.fixture(scope="module")
def twins(bf16_dir, tmp_path_factory):
    """A LoRA-merged tiny gpt-oss (a fine-tune: its experts are no longer MXFP4 values) as BF16 and
    as MXFP4 (compressed-tensors rule), and token lists to run."""
    from gptoss_convert.converters.merge_lora import merge_lora
    from test_merge_lora import ATTENTION, EXPERTS, QUIET, _peft_model
    root = tmp_path_factory.mktemp("twins")
    _peft_model(bf16_dir, 5, r=4, lora_alpha=8, target_modules=ATTENTION,
                target_parameters=EXPERTS).save_pretrained(root / "adapter")
    bf = merge_lora(bf16_dir, root / "adapter", root / "bf16", **QUIET)
    mx = merge_lora(bf16_dir, root / "adapter", root / "mx", mxfp4=True, scale_rule=RULE, **QUIET)
    toks = np.random.default_rng(7).integers(0, 300, (3, 11)).tolist()
    (root / "tokens.json").write_text(json.dumps(toks))
    return bf, mx, root / "tokens.json", toks


def _kl_by_transformers(bf, mx, toks) -> list[float]:
    """Mean KL(P_bf16 || Q_mxfp4) per token list, from transformers' fp32 models of both directories."""
    from transformers import GptOssForCausalLM
    models = [GptOssForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (bf, mx)]
    out = []
    with torch.no_grad():
        for t in toks:
            lp, lq = (torch.log_softmax(m(torch.tensor([t])).logits[0].double(), -1) for m in models)
            out.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_verify_gives_the_kl_of_an_mxfp4_export_against_its_bf16_twin(twins, streamed, tmp_path):
    """`verify MXFP4 --hf BF16`: the per-prompt mean KL it reports is the KL computed here from
    transformers' own fp32 models of both twins (streamed: both sides transformers', layer by
    layer, equal to 1e-5; in memory: our JAX forward on the MXFP4 side, equal to 1e-2); it is
    not zero, and the default --max-kl fails the export (exit 4 on the CLI)."""
    import subprocess
    import sys

    from conftest import run_env
    from gptoss_convert.verify.verify import verify
    bf, mx, tokens, toks = twins
    want = _kl_by_transformers(bf, mx, toks)
    rep = verify(mx, hf=bf, tokens=tokens, streamed=streamed, max_kl=1.0, atol=100, rtol=0, show_progress=False,
                 log=lambda *_: None)
    got = [r["mean_kl"] for r in rep["prompts"]]
    assert min(want) > 1e-7 and rep["pass"]
    np.testing.assert_allclose(got, want, rtol=1e-5 if streamed else 1e-2)
    assert rep["moe"] == ("transformers, layer by layer (HF checkpoint)" if streamed else "ragged_dot")
    assert all(0 < r["max_abs_diff"] and 0 <= r["top1_agreement"] <= 1 for r in rep["prompts"])
    r = subprocess.run([sys.executable, "-m", "gptoss_convert", "verify", str(mx), "--hf", str(bf), "--tokens",
                        str(tokens), "--streamed" if streamed else "--in-memory", "--no-progress"],
                       env=run_env(), capture_output=True, text=True)
    assert r.returncode == 4 and "mean KL" in r.stdout and "FAIL" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("rule", SCALE_RULES)
def test_fp32_column_kernel_equals_the_float_path(rule):
    """merge-lora's merged experts are fp32: the XLA column kernel on fp32 bits gives the float
    path's bytes (quantize_with_report on the transpose) and report, under every rule, on exact
    E2M1 midpoints and one ulp either side, values just above 0.25 (where triton's RTNE ignores
    the two lowest mantissa bits), amax at 1.5 and 1.75 times a power of two, zero groups; a group
    whose scale nears E8M0's floor goes to the float path."""
    rng = np.random.default_rng(0)
    w = (rng.standard_t(3, (3, 256, 96)) * 0.02).astype(np.float32)
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    g = w[0, :32, 0]
    g[:] = 0
    g[0], g[1:8], g[8:15], g[15:22] = 6.0, ties, np.nextafter(ties, 10), np.nextafter(ties, 0)
    g[22:28] = np.float32(0.25) + np.float32(2.0 ** -25) * np.array([1, 2, 3, 4, 8, 12])
    w[1, :32, 1] = 0
    w[1, :32, 2] = np.float32(1.5) * np.linspace(-1, 1, 32)
    w[2, :32, 5] = np.float32(1.75) * np.linspace(1, -0.5, 32)
    w[2, :32, 6] = np.nextafter(np.float32(1.75), 0) * np.linspace(-1, 0.5, 32)
    fast = _quantize_bf16_columns([w], rule)
    assert fast is not None
    slow = quantize_with_report(np.ascontiguousarray(np.swapaxes(w, -1, -2)), rule)
    assert fast[0].tobytes() == slow[0].tobytes() and fast[1].tobytes() == slow[1].tobytes()
    assert fast[2]["saturated"] == slow[2]["saturated"] and fast[2]["clamped_groups"] == slow[2]["clamped_groups"]
    for key in ("err2", "ref2"):
        assert fast[2][key] == pytest.approx(slow[2][key], rel=1e-5)
    w[1, :32, 7] = np.float32(1e-37)
    assert _quantize_bf16_columns([w], rule) is None
    got = quantize_columns([w], rule)
    want = quantize_with_report(np.ascontiguousarray(np.swapaxes(w, -1, -2)), rule)
    assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes()

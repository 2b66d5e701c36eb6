"""Block-scaled FP8 sources (Qwen3-*-FP8): the codec against transformers' own FP8 dequantization,
bit for bit; `dequantize` of a tiny FP8 Qwen3-MoE equal to what transformers loads from it; `to-orbax`
(both layouts) whose fp32 logits equal transformers' on the FP8 source; refusals naming the tensor.

The oracle is transformers' `FineGrainedFP8HfQuantizer`, which on a machine without a GPU loads a
pre-quantized checkpoint with `dequantize=True` (its `Fp8Dequantize` op: float32 product, then the
parameter's dtype). Only its check that `accelerate` is installed is bypassed (accelerate is no
dependency of this project and plays no part in the dequantization)."""

from __future__ import annotations

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from family_cases import qwen3_expected_leaves
from gptoss_convert import fp8
from gptoss_convert.backends import get_backend
from gptoss_convert.converters.dequantize import dequantize
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.errors import CorruptTensorError, InputError
from gptoss_convert.io.hf_checkpoint import HFCheckpoint
from gptoss_convert.io.orbax_reader import load_params
from gptoss_convert.io.safetensors import save_file
from gptoss_convert.testing.qwen3 import write_fp8_qwen3
from gptoss_convert.tree import flatten, unflatten

QUIET = dict(progress=False, log=lambda *_: None)
BF16 = ml_dtypes.bfloat16
# V 300, H 384, I 640, Nq*D 256, Nkv*D 128, E 5, k 2, L 2: every projection dimension distinct and
# a whole number of 128-blocks (FP8 needs it); the router [5, 384] and embeddings stay BF16.
FP8_TINY = dict(vocab_size=300, hidden_size=384, moe_intermediate_size=640, intermediate_size=1024,
                num_hidden_layers=2, num_experts=5, num_experts_per_tok=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, norm_topk_prob=True, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings=False)
BLOCKS = [(128, 128), (32, 64)]      # the published block, and a small non-square one


def transformers_dequantize(w: np.ndarray, s: np.ndarray, dtype=torch.bfloat16) -> np.ndarray:
    """transformers' own FP8 dequantization of one weight (`Fp8Dequantize._dequantize_one`)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    wt = torch.from_numpy(np.ascontiguousarray(w).view(np.uint8)).view(torch.float8_e4m3fn)
    st = torch.from_numpy(np.asarray(s, np.float32)) if s.dtype != BF16 else \
        torch.from_numpy(s.view(np.int16)).view(torch.bfloat16)
    out = Fp8Dequantize(None)._dequantize_one(wt, st, output_dtype=dtype)
    return out.view(torch.int16).numpy().view(BF16) if dtype == torch.bfloat16 else out.numpy()


# ---- the codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [np.float32, BF16], ids=["f32-scales", "bf16-scales"])
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_codec_equals_transformers_bit_for_bit(block, scale_dtype):
    """Every finite E4M3 byte, under scales spanning 2^-30..2^20 (random mantissas: products that
    round, and ties), dequantizes to transformers' bits in BF16 and in FP32."""
    rng = np.random.default_rng(0)
    rows, cols = 4 * block[0], 6 * block[1]
    bits = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x7E                                   # NaN bytes are refused (below)
    bits[0, :254] = [b for b in range(256) if b & 0x7F != 0x7F]          # every finite byte at least once
    grid = fp8.grid_shape((rows, cols), block)
    scales = (2.0 ** rng.uniform(-30, 20, grid)).astype(scale_dtype)
    w = bits.view(fp8.E4M3)
    for dtype, tdtype in ((BF16, torch.bfloat16), (np.float32, torch.float32)):
        got = fp8.dequantize(w, scales.astype(np.float32), block, dtype)
        want = transformers_dequantize(w, scales, tdtype)
        np.testing.assert_array_equal(got.view(np.uint16 if dtype == BF16 else np.uint32),
                                      want.view(np.uint16 if dtype == BF16 else np.uint32))


def test_bf16_rounding_is_nearest_even():
    """A product exactly halfway between two BF16 values rounds to the even one (as torch does)."""
    w = np.full((1, 2), 1.0, np.float32).astype(fp8.E4M3)                # 1.0 in E4M3
    s = np.array([[1 + 2 ** -8 + 2 ** -7]], np.float32)                    # tie above an odd mantissa
    got = fp8.dequantize(w, s, (1, 2), BF16)
    assert got[0, 0] == np.float32(s[0, 0]).astype(BF16) == BF16(1 + 2 ** -6)
    np.testing.assert_array_equal(got.view(np.uint16), transformers_dequantize(w, s).view(np.uint16))


def test_row_slices_equal_the_whole():
    """Rows read from any offset (not block-aligned) dequantize as the same rows of the whole."""
    rng = np.random.default_rng(1)
    w, s = fp8.quantize(rng.standard_normal((96, 64)), (32, 32))
    whole = fp8.dequantize(w, s, (32, 32))
    for a, b in [(0, 96), (5, 37), (31, 33), (64, 96), (40, 41)]:
        part = fp8.dequantize(w[a:b], s[a // 32:(b - 1) // 32 + 1], (32, 32), row0=a)
        np.testing.assert_array_equal(part.view(np.uint16), whole[a:b].view(np.uint16))


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan, 1e37], ids=["zero", "negative", "inf", "nan", "overflow"])
def test_codec_refuses_bad_scales(bad):
    w, s = fp8.quantize(np.ones((4, 4)), (2, 2))
    s[1, 0] = bad
    with pytest.raises(CorruptTensorError, match=r"tensor 'x' has 1 scale\(s\) .* at index \(1, 0\)"):
        fp8.dequantize(w, s, (2, 2), name="x")


def test_codec_refuses_nan_bytes():
    w, s = fp8.quantize(np.ones((4, 4)), (2, 2))
    w.view(np.uint8)[2, 3] = 0xFF
    with pytest.raises(CorruptTensorError, match=r"tensor 'x' holds 1 FP8 NaN byte\(s\) \(first at index \(12, 3\)\)"):
        fp8.dequantize(w, s, (2, 2), name="x", row0=10)           # rows 10..13 of the weight


def test_layout_problems():
    assert fp8.layout_problem((256, 384), (2, 3), (128, 128)) is None
    assert "not a whole number of [128, 128] blocks" in fp8.layout_problem((200, 384), (2, 3), (128, 128))
    assert "expected [2, 3]" in fp8.layout_problem((256, 384), (3, 2), (128, 128))
    assert "1-D" in fp8.layout_problem((256,), (2,), (128, 128))


# ---- a tiny FP8 Qwen3-MoE against transformers ----------------------------------------------------


@pytest.fixture(scope="module")
def qwen_bf16(tmp_path_factory):
    """A tiny Qwen3MoeForCausalLM saved by transformers (BF16), FP8-friendly shapes."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from gptoss_convert.testing.tokenizer import write_tokenizer
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**FP8_TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif "experts" in name or "gate" in name:
                p.normal_(0, 0.3)
    d = tmp_path_factory.mktemp("qwen3-fp8") / "bf16"
    model.to(torch.bfloat16).save_pretrained(d)
    write_tokenizer(d, FP8_TINY["vocab_size"])
    return d


def load_with_transformers(src, dtype):
    """transformers' Qwen3MoeForCausalLM from the FP8 directory, dequantized by its FP8 quantizer."""
    import transformers.quantizers.quantizer_finegrained_fp8 as quantizer
    from transformers import Qwen3MoeForCausalLM
    saved = quantizer.is_accelerate_available
    quantizer.is_accelerate_available = lambda: True
    try:
        return Qwen3MoeForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="eager",
                                                   experts_implementation="eager").eval()
    finally:
        quantizer.is_accelerate_available = saved


def per_expert(sd: dict[str, torch.Tensor], cfg) -> dict[str, np.ndarray]:
    """transformers-5's fused expert tensors split back into the published per-expert names."""
    out = {}
    for k, v in sd.items():
        v = v.float().numpy() if v.dtype != torch.bfloat16 else v.view(torch.int16).numpy().view(BF16)
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[:-len("gate_up_proj")]
            for e in range(cfg["num_experts"]):
                out[f"{p}{e}.gate_proj.weight"], out[f"{p}{e}.up_proj.weight"] = np.split(v[e], 2)
        elif k.endswith("mlp.experts.down_proj"):
            p = k[:-len("down_proj")]
            out |= {f"{p}{e}.down_proj.weight": v[e] for e in range(cfg["num_experts"])}
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module", params=BLOCKS, ids=lambda b: f"block{b[0]}x{b[1]}")
def fp8_dir(request, qwen_bf16, tmp_path_factory):
    return write_fp8_qwen3(qwen_bf16, tmp_path_factory.mktemp("fp8") / "src", block=request.param)


@pytest.fixture(scope="module")
def hf_fp32(fp8_dir):
    return load_with_transformers(fp8_dir, torch.float32)


def test_the_fixture_is_in_the_published_fp8_layout(fp8_dir):
    ck = HFCheckpoint(fp8_dir)
    conf = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    assert conf["quant_method"] == "fp8" and conf["fmt"] == "e4m3" and conf["activation_scheme"] == "dynamic"
    stored = {n: t.dtype for n, t in ck.stored.items()}
    assert stored["model.layers.0.mlp.experts.3.down_proj.weight"] == "F8_E4M3"
    assert stored["model.layers.0.mlp.experts.3.down_proj.weight_scale_inv"] == "F32"
    assert stored["model.layers.1.self_attn.k_proj.weight"] == "F8_E4M3"
    assert stored["model.layers.1.mlp.gate.weight"] == stored["lm_head.weight"] == "BF16"
    assert ck.tensors["model.layers.0.mlp.experts.3.down_proj.weight"].shape == (384, 640)
    assert not any(n.endswith("_scale_inv") for n in ck.tensors)


def test_dequantize_equals_transformers_every_value(fp8_dir, tmp_path):
    """`dequantize` FP8 -> BF16: every tensor equals, bit for bit, what transformers' FP8 loader
    (dequantize=True, dtype bfloat16) holds; the output has no quantization_config and loads."""
    out = dequantize(fp8_dir, tmp_path / "bf16", **QUIET)
    hf = load_with_transformers(fp8_dir, torch.bfloat16)
    want = per_expert(hf.state_dict(), FP8_TINY)
    from safetensors.numpy import load_file
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got |= {k: v.view(BF16) if v.dtype == np.uint16 else v for k, v in load_file(f).items()}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]).view(np.uint16), want[k].view(np.uint16), err_msg=k)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with torch.no_grad():
        from transformers import Qwen3MoeForCausalLM
        Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.bfloat16)(torch.tensor([[1, 2, 3]]))


@pytest.fixture(scope="module", params=[True, False], ids=["scanned", "unscanned"])
def converted(request, fp8_dir, tmp_path_factory):
    root = to_orbax(fp8_dir, tmp_path_factory.mktemp("o") / "out", scanned=request.param, dtype="fp32", **QUIET)
    return request.param, root, {k: np.asarray(v) for k, v in flatten(load_params(root / "0")).items()}


def test_to_orbax_leaves_equal_transformers_dequantized(fp8_dir, hf_fp32, converted):
    """to-orbax fp32 from the FP8 source = the MaxText tree re-derived from transformers' fp32
    dequantized weights (exact: the float32 product is the dequantized value)."""
    scanned, _, got = converted
    backend = get_backend("qwen3_moe")
    cfg = backend.config_from_dict(json.loads((fp8_dir / "config.json").read_text()))
    want = qwen3_expected_leaves(per_expert(hf_fp32.state_dict(), FP8_TINY), cfg, scanned)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("moe", ["ragged_dot", "dense"])
def test_logits_equal_transformers_on_the_fp8_source(fp8_dir, hf_fp32, converted, moe):
    """fp32 logits of the converted checkpoint (the project's JAX forward) = transformers' on the
    FP8 source: max |Δ| < 1e-4, KL < 1e-6."""
    backend = get_backend("qwen3_moe")
    cfg = backend.config_from_dict(json.loads((fp8_dir / "config.json").read_text()))
    tokens = np.random.default_rng(1).integers(0, cfg.V, (2, 19))
    with torch.no_grad():
        want = hf_fp32(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(backend.forward(unflatten(converted[2]), tokens.astype(np.int32), cfg, moe=moe))
    logp, logq = jax.nn.log_softmax(want, -1), jax.nn.log_softmax(ours, -1)
    delta, kl = float(np.abs(ours - want).max()), float(np.max(np.sum(np.exp(logp) * (logp - logq), -1)))
    block = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]["weight_block_size"]
    print(f"FP8 block {block} {'scanned' if converted[0] else 'unscanned'} {moe}: max|Δ|={delta:.3g} KL={kl:.3g}")
    assert delta < 1e-4 and kl < 1e-6


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_golden_on_the_fp8_source_then_verify_passes(fp8_dir, converted, tmp_path, monkeypatch, streamed):
    """As for a BF16 source: `golden` (transformers on the FP8 directory) then `verify` of the
    converted checkpoint, in memory or layer by layer, and of the FP8 directory itself (converted
    in memory through the reader)."""
    import transformers.quantizers.quantizer_finegrained_fp8 as quantizer

    from gptoss_convert.verify.golden import golden
    from gptoss_convert.verify.verify import verify
    monkeypatch.setattr(quantizer, "is_accelerate_available", lambda: True)     # see the module docstring
    g = golden(fp8_dir, tmp_path / "g.jsonl", log=lambda *_: None)
    strict = dict(atol=1e-4, rtol=0, max_kl=1e-6, log=lambda *_: None)
    report = verify(converted[1], golden=g, streamed=streamed, **strict)
    assert report["pass"] and len(report["prompts"]) >= 3
    if streamed and converted[0]:
        assert verify(fp8_dir, golden=g, moe="dense", **strict)["pass"]


def test_bf16_to_orbax_of_the_fp8_source_equals_that_of_its_dequantized_copy(fp8_dir, tmp_path):
    """to-orbax (bf16) straight from FP8 = to-orbax of `dequantize`'s BF16 output, leaf for leaf."""
    a = to_orbax(fp8_dir, tmp_path / "a", scanned=True, **QUIET)
    b = to_orbax(dequantize(fp8_dir, tmp_path / "deq", **QUIET), tmp_path / "b", scanned=True, **QUIET)
    la, lb = flatten(load_params(a / "0")), flatten(load_params(b / "0"))
    assert sorted(la) == sorted(lb)
    for k in la:
        np.testing.assert_array_equal(np.asarray(la[k]).view(np.uint16), np.asarray(lb[k]).view(np.uint16), err_msg=k)


# ---- refusals: one line naming the tensor ---------------------------------------------------------


def _copy(src, dst, *, config=None, tensors=None):
    """`src` copied to `dst` with config.json fields updated and shard tensors replaced."""
    shutil.copytree(src, dst)
    if config is not None:
        conf = json.loads((dst / "config.json").read_text())
        q = conf["quantization_config"] | config.pop("quantization_config", {})
        (dst / "config.json").write_text(json.dumps(conf | config | {"quantization_config": q}))
    for f in sorted(dst.glob("*.safetensors")) if tensors else []:
        ck = HFCheckpoint(dst)
        mine = {n: ck._mapped.view(t).copy() for n, t in ck.stored.items() if t.file.name == f.name}
        hit = {n: a for n, a in tensors.items() if n in mine}
        if hit:
            save_file(mine | hit, f, {"format": "pt"})
    return dst


W = "model.layers.1.mlp.experts.2.up_proj.weight"


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan], ids=["zero", "negative", "nan"])
def test_bad_scale_is_refused_naming_the_tensor(qwen_bf16, tmp_path, bad):
    src = write_fp8_qwen3(qwen_bf16, tmp_path / "src", block=(128, 128))
    s = HFCheckpoint(src)._mapped.view(HFCheckpoint(src).stored[W + "_scale_inv"]).copy()
    s[4, 1] = bad
    _copy(src, tmp_path / "bad", tensors={W + "_scale_inv": s})
    for convert in (lambda: dequantize(tmp_path / "bad", tmp_path / "o1", **QUIET),
                    lambda: to_orbax(tmp_path / "bad", tmp_path / "o2", scanned=False, **QUIET)):
        with pytest.raises(CorruptTensorError, match=rf"tensor '{W}' has 1 scale\(s\) that are not finite positive .* "
                                                     r"at index \(4, 1\)"):
            convert()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("config, needle", [
    ({"quantization_config": {"weight_block_size": None}}, "weight_block_size=None is not supported"),
    ({"quantization_config": {"weight_block_size": [128]}}, "weight_block_size=[128] is not supported"),
    ({"quantization_config": {"fmt": "e5m2"}}, "fmt='e5m2' is not supported (only e4m3)"),
    ({"quantization_config": {"activation_scheme": "static"}}, "activation_scheme='static' is not supported"),
    ({"quantization_config": {"weight_block_size": [96, 128]}},
     "'model.layers.0.self_attn.q_proj.weight' shape [256, 384] is not a whole number of [96, 128] blocks"),
    ({"quantization_config": {"weight_block_size": [64, 128]}}, "does not match shape"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method 'gptq' is not supported"),
], ids=["no-block", "1d-block", "e5m2", "static", "ragged", "grid", "gptq"])
def test_bad_fp8_config_is_refused(qwen_bf16, tmp_path, config, needle):
    src = _copy(write_fp8_qwen3(qwen_bf16, tmp_path / "src"), tmp_path / "bad", config=config)
    with pytest.raises(InputError, match=None) as e:
        to_orbax(src, tmp_path / "out", scanned=True, **QUIET)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unpaired_fp8_tensors_are_refused(qwen_bf16, tmp_path):
    """An F8 weight without its scale grid (and the reverse) is named; a config without FP8 quantization too."""
    src = write_fp8_qwen3(qwen_bf16, tmp_path / "src")
    conf = json.loads((src / "config.json").read_text())
    del conf["quantization_config"]
    bad = _copy(src, tmp_path / "noq")
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CorruptTensorError, match=rf"'{W}' is F8_E4M3 but config.json has no quantization_config"):
        HFCheckpoint(bad)
    ck = HFCheckpoint(src)
    f = ck.stored[W].file
    mine = {n: ck._mapped.view(t).copy() for n, t in ck.stored.items() if t.file == f and n != W + "_scale_inv"}
    bad = _copy(src, tmp_path / "nos")
    save_file(mine, bad / f.name, {"format": "pt"})
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"][W + "_scale_inv"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptTensorError, match=rf"'{W}' is F8_E4M3 but has no '{W}_scale_inv' scale grid"):
        HFCheckpoint(bad)


def test_gpt_oss_refuses_fp8(tmp_path):
    """FP8 is read for Qwen3-MoE; a gpt-oss config claiming FP8 is refused by its config policy."""
    from gptoss_convert.backends.gpt_oss.config import config_from_dict
    from gptoss_convert.errors import ConfigError
    from gptoss_convert.testing.published import published_config
    raw = published_config("gpt-oss-20b") | {"quantization_config": {"quant_method": "fp8"}}
    with pytest.raises(ConfigError, match="quant_method='fp8' is not supported"):
        config_from_dict(raw)


def test_qwen3_config_policy_reads_fp8(qwen_bf16):
    """Qwen3-MoE's config accepts Qwen's FP8 quantization_config (also under --strict-config);
    strict refuses an unknown key in it, which might change what the weights mean."""
    from gptoss_convert.backends.qwen3_moe.config import config_from_dict
    from gptoss_convert.errors import ConfigError
    from gptoss_convert.testing.qwen3 import fp8_quantization_config
    raw = json.loads((qwen3_bf16_config := qwen_bf16 / "config.json").read_text())
    fp8_raw = raw | {"quantization_config": fp8_quantization_config() | {"modules_to_not_convert": ["lm_head"]}}
    assert config_from_dict(fp8_raw, strict=True) == config_from_dict(raw)
    odd = raw | {"quantization_config": fp8_quantization_config() | {"scale_fmt": "ue8m0"}}
    assert config_from_dict(odd).unknown_fields == ()
    with pytest.raises(ConfigError, match=r"unknown quantization_config fields \['scale_fmt'\]"):
        config_from_dict(odd, str(qwen3_bf16_config), strict=True)


def test_cli_dequantize_and_check(qwen_bf16, tmp_path):
    """The shell: `dequantize` of an FP8 source says what it did, and `check` confirms the output."""
    import subprocess
    import sys

    from conftest import run_env
    src = write_fp8_qwen3(qwen_bf16, tmp_path / "src")
    run = lambda *a: subprocess.run([sys.executable, "-m", "gptoss_convert", *a], capture_output=True,  # noqa: E731
                                    text=True, env=run_env(), timeout=600)
    r = run("dequantize", str(src), str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert "38 MXFP4/FP8 tensors dequantized to BF16" in r.stdout
    r = run("check", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr

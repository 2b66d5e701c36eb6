"""The JAX forward against HF transformers (fp32 eager oracle) on a tiny random gpt-oss model:
bf16 compute, padding and packing, RoPE/YaRN, the sliding window. fp32 logits = HF's for every MoE
strategy and layout is tests/test_families.py's (the same oracle for every family)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gptoss_convert.backends.gpt_oss import model as M
from gptoss_convert.backends.gpt_oss import params as P
from gptoss_convert.testing import tiny_config
from hf_reference import hf_to_maxtext, torch_state_dict_numpy

T = 19          # > sliding window (5): the window mask and RoPE far from 0 both matter
LAYOUTS = {"unscanned": False, "scanned": True}


def load_hf(model_dir):
    """HF oracle: fp32 weights via from_pretrained(dtype=...) (never .to(bfloat16), docs/forward.md §4);
    eager attention (the implementation that applies the sinks in plain torch) and eager experts."""
    return transformers.GptOssForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()


def hf_logits(model, tokens, attention_mask=None):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(tokens), attention_mask=mask).logits.numpy()


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(ref, ours) -> dict[str, float]:
    """max |Δlogit|, max per-token KL(ref‖ours) (in float64), top-1 agreement."""
    lp, lq = log_softmax64(ref), log_softmax64(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"max_abs": float(np.abs(np.asarray(ours, np.float64) - ref).max()), "kl": float(kl.max()),
            "top1": float((np.argmax(ours, -1) == np.argmax(ref, -1)).mean())}


def to_tree(flat, dtype=np.float32):
    return P.unflatten({k: jnp.asarray(v.astype(dtype)) for k, v in flat.items()})


@pytest.fixture(scope="module")
def hf_model(bf16_dir):
    return load_hf(bf16_dir)


@pytest.fixture(scope="module")
def state(hf_model):
    return torch_state_dict_numpy(hf_model)


@pytest.fixture(scope="module")
def trees(state, tiny_cfg):
    return {name: to_tree(hf_to_maxtext(state, tiny_cfg, scanned)) for name, scanned in LAYOUTS.items()}


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return np.random.default_rng(1).integers(0, tiny_cfg.V, (2, T))


@pytest.fixture(scope="module")
def reference(hf_model, tokens):
    return hf_logits(hf_model, tokens)


def test_tree_matches_abstract_params(state, tiny_cfg):
    for scanned in (False, True):
        flat = hf_to_maxtext(state, tiny_cfg, scanned)
        assert {k: v.shape for k, v in flat.items()} == P.flat_shapes(tiny_cfg, scanned)


@pytest.mark.parametrize("strategy, layout", [("ragged_dot", "unscanned"), ("dense", "scanned")])
def test_bf16_compute_close_to_hf(trees, tokens, reference, tiny_cfg, strategy, layout):
    tree = jax.tree.map(lambda a: a.astype(jnp.bfloat16), trees[layout])   # bf16 store, as on disk
    out = M.forward(tree, jnp.asarray(tokens), tiny_cfg, moe=strategy, dtype=jnp.bfloat16)
    assert out.dtype == jnp.float32
    a = agreement(reference, np.asarray(out))
    # Measured ≈ 0.06 / 1.6e-4 / 97 % (38 tokens); bounds leave room, yet catch any math error.
    assert a["max_abs"] < 0.3 and a["kl"] < 2e-3 and a["top1"] >= 0.9, a


def test_bf16_stored_params_fp32_compute_exact(trees, tokens, reference, tiny_cfg):
    """The test checkpoint's weights are bf16 numbers, so a bf16-stored tree loses nothing."""
    tree = jax.tree.map(lambda a: a.astype(jnp.bfloat16), trees["scanned"])
    a = agreement(reference, np.asarray(M.forward(tree, jnp.asarray(tokens), tiny_cfg)))
    assert a["max_abs"] < 1e-4 and a["kl"] < 1e-6 and a["top1"] == 1.0, a


@pytest.mark.slow
def test_streamed_layers_equal_forward(trees, tokens, tiny_cfg):
    """embed -> decoder_layer(one unscanned layer at a time) -> unembed == forward."""
    params, cfg = trees["unscanned"], tiny_cfg
    toks = jnp.asarray(tokens)
    ctx = jax.jit(M.make_context, static_argnums=(0, 1, 2))(cfg, *toks.shape)
    x = jax.jit(M.embed)(params, toks)
    layer = jax.jit(M.decoder_layer, static_argnames=("cfg", "sliding", "moe", "dtype"))
    for i in range(cfg.L):
        x = layer(params["decoder"][f"layers_{i}"], x, cfg, cfg.is_sliding(i), ctx)
    streamed = jax.jit(M.unembed, static_argnums=2)(params, x, cfg)
    np.testing.assert_allclose(streamed, M.forward(params, toks, cfg), atol=1e-5, rtol=0)


# ---- padding, packing ------------------------------------------------------------------------

LENGTHS = (T, 11, 7)


@pytest.fixture(scope="module")
def singles(trees, tiny_cfg):
    """Per-sequence logits (batch of one, no padding) for sequences of LENGTHS."""
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, tiny_cfg.V, n) for n in LENGTHS]
    return seqs, [np.asarray(M.forward(trees["scanned"], jnp.asarray(s[None]), tiny_cfg))[0] for s in seqs]


def _padded(seqs, left: bool):
    toks = np.zeros((len(seqs), T), np.int64)
    mask = np.zeros((len(seqs), T), np.int32)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        toks[b, sl], mask[b, sl] = s, 1
    return toks, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_attention_mask(trees, singles, tiny_cfg, side):
    seqs, refs = singles
    toks, mask = _padded(seqs, left=side == "left")
    out = np.asarray(M.forward(trees["scanned"], jnp.asarray(toks), tiny_cfg, attention_mask=jnp.asarray(mask)))
    for b, ref in enumerate(refs):
        np.testing.assert_allclose(out[b][mask[b] == 1], ref, atol=1e-5, rtol=0)


def test_padded_batch_segment_ids_packed(trees, singles, tiny_cfg):
    """Two sequences packed in one row plus padding (segment 0), the third alone in row 2."""
    seqs, refs = singles
    a, b, c = seqs
    toks = np.zeros((2, T), np.int64)
    seg = np.zeros((2, T), np.int32)
    toks[0, :len(b)], seg[0, :len(b)] = b, 1
    toks[0, len(b):len(b) + len(c)], seg[0, len(b):len(b) + len(c)] = c, 2
    toks[1, :len(a)], seg[1, :len(a)] = a, 7
    out = np.asarray(M.forward(trees["scanned"], jnp.asarray(toks), tiny_cfg, segment_ids=jnp.asarray(seg)))
    np.testing.assert_allclose(out[0, :len(b)], refs[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[0, len(b):len(b) + len(c)], refs[2], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[1, :len(a)], refs[0], atol=1e-5, rtol=0)


def test_right_padded_batch_matches_hf(hf_model, trees, singles, tiny_cfg):
    seqs, _ = singles
    toks, mask = _padded(seqs, left=False)
    ref = hf_logits(hf_model, toks, mask)
    out = np.asarray(M.forward(trees["scanned"], jnp.asarray(toks), tiny_cfg, attention_mask=jnp.asarray(mask)))
    valid = mask == 1
    a = agreement(ref[valid], out[valid])
    assert a["max_abs"] < 1e-4 and a["kl"] < 1e-6 and a["top1"] == 1.0, a


# ---- RoPE ------------------------------------------------------------------------------------


def _hf_rotary(cfg):
    conf = transformers.GptOssConfig(**cfg.to_hf_dict())
    return transformers.models.gpt_oss.modeling_gpt_oss.GptOssRotaryEmbedding(conf)


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("dims", ["tiny", "20b"])
def test_rope_inv_freq_and_mscale_match_hf(truncate, dims):
    kw = {} if dims == "tiny" else dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                                        num_key_value_heads=8, head_dim=64)
    cfg = tiny_config(**kw)
    cfg = dataclasses.replace(cfg, rope_scaling=dataclasses.replace(cfg.rope_scaling, truncate=truncate))
    hf = _hf_rotary(cfg)
    np.testing.assert_allclose(M.rope_inv_freq(cfg), hf.inv_freq.numpy(), rtol=1e-6, atol=0)
    assert M.rope_mscale(cfg) == pytest.approx(hf.attention_scaling, rel=1e-12)
    assert M.rope_mscale(cfg) == pytest.approx(1.346574, abs=1e-6)


@pytest.mark.slow
def test_rope_truncate_flag_matters(bf16_dir, tmp_path, hf_model, trees, tiny_cfg):
    """truncate=true rounds YaRN's correction range: different inv_freq, different logits, and
    both settings match HF given the same flag (vllm#28244 / transformers#42189 pitfall)."""
    cfg_t = dataclasses.replace(tiny_cfg, rope_scaling=dataclasses.replace(tiny_cfg.rope_scaling, truncate=True))
    assert np.abs(M.rope_inv_freq(cfg_t) - M.rope_inv_freq(tiny_cfg)).max() > 1e-4
    src = tmp_path / "truncate"
    shutil.copytree(bf16_dir, src)
    conf = json.loads((src / "config.json").read_text())
    conf["rope_scaling"]["truncate"] = True           # the published (transformers 4.55) spelling
    (src / "config.json").write_text(json.dumps(conf))
    toks = np.random.default_rng(3).integers(0, tiny_cfg.V, (1, 48))
    ref_t, ref_f = hf_logits(load_hf(src), toks), hf_logits(hf_model, toks)
    assert np.abs(ref_f - ref_t).max() > 1e-3     # the flag changes the model's output...
    ours_t = np.asarray(M.forward(trees["scanned"], jnp.asarray(toks), cfg_t))
    a = agreement(ref_t, ours_t)                  # ...and we follow it (truncate=false: test_fp32_matches_hf)
    assert a["max_abs"] < 1e-4 and a["kl"] < 1e-6 and a["top1"] == 1.0, a
    assert np.abs(ref_f - ours_t).max() > 1e-3


def test_sliding_window_mask(tiny_cfg):
    ctx = M.make_context(tiny_cfg, 1, 9)
    W = tiny_cfg.sliding_window
    i, j = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
    np.testing.assert_array_equal(ctx.full_mask[0], j <= i)
    np.testing.assert_array_equal(ctx.sliding_mask[0], (j <= i) & (j > i - W))


def test_unknown_strategy_is_refused(trees, tokens, tiny_cfg):
    with pytest.raises(ValueError, match="strategy"):
        M.forward(trees["scanned"], jnp.asarray(tokens), tiny_cfg, moe="gshard")

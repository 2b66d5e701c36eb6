"""The gpt-oss forward one layer at a time, reading only the routed experts (for verify --streamed).

A few prompts touch only some experts per layer, so each layer's dense weights are read, the
router runs, and then only the selected experts are read (one `[e]` / `[e, slot]` slice each,
through `reader`, verify's leaf reader) and applied one by one. The embedding is read for the
prompt's tokens only and the LM head in column blocks. Peak memory: one layer's dense weights + one
expert + one LM-head block, whatever the model size. Same math as `model.forward` (it reuses
its pieces); the result matches the in-memory forward to float rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_convert.backends.common.streamed import HIGHEST, embedded, head_logits, routed_experts
from gptoss_convert.backends.gpt_oss import model
from gptoss_convert.backends.gpt_oss.moe import route, swiglu
from gptoss_convert.backends.gpt_oss.params import EXPERT_LEAVES


@functools.partial(jax.jit, static_argnames=("cfg", "sliding"))
def _attention_half(p, x, ctx, cfg, sliding):
    """x + attention(pre-norm(x)); then the post-norm input of the MoE block."""
    h = model.rms_norm(x, p["pre_self_attention_layer_norm"]["scale"], cfg.rms_norm_eps)
    x = x + model.attention(p["GptOssAttention"], h, cfg, ctx, sliding=sliding)
    h2 = model.rms_norm(x, p["post_self_attention_layer_norm"]["scale"], cfg.rms_norm_eps)
    return x, h2


@functools.partial(jax.jit, static_argnames=("cfg",))
def _expert(h, w0, b0, w1, b1, wo, bo, cfg):
    """One expert on rows h [n, H]: swiglu(h·W0 + b0, h·W1 + b1)·Wo + bo."""
    g = jnp.dot(h, w0, precision=HIGHEST) + b0
    u = jnp.dot(h, w1, precision=HIGHEST) + b1
    return jnp.dot(swiglu(g, u, cfg), wo, precision=HIGHEST) + bo


def _moe(reader, layer: int, h: np.ndarray, gate: dict, valid: np.ndarray, cfg) -> np.ndarray:
    """The MoE block for rows h [N, H], reading only the experts that real tokens selected."""
    weights, experts = (np.asarray(a) for a in route(jnp.asarray(h), gate, cfg.num_experts_per_tok))
    return routed_experts(reader, layer, h, weights, experts, valid, EXPERT_LEAVES, lambda rows, w: _expert(
        rows, w["wi_0"], w["wi_0_bias"], w["wi_1"], w["wi_1_bias"], w["wo"], w["wo_bias"], cfg))


def streamed_logits(reader, cfg, tokens: np.ndarray, mask: np.ndarray, *, vocab_block: int = 16384) -> list[np.ndarray]:
    """fp32 logits of right-padded `tokens` [B, T] (`mask` 1 = real token): one [len_b, V] array
    per row, for the real tokens only (a 201k vocabulary makes padded [B, T, V] logits big).
    `reader` reads the checkpoint's leaves (verify.streamed.LeafReader)."""
    B, T = tokens.shape
    x = embedded(reader, tokens)
    ctx = model.make_context(cfg, B, T, attention_mask=jnp.asarray(mask))
    valid = np.asarray(mask, bool).reshape(-1)
    for i in range(cfg.L):
        p = reader.dense_layer(i)
        x, h2 = _attention_half(jax.tree.map(jnp.asarray, p), x, ctx, cfg, cfg.is_sliding(i))
        out = _moe(reader, i, np.asarray(h2).reshape(-1, cfg.H), p["GptOssMlp"]["gate"], valid, cfg)
        x = x + jnp.asarray(out.reshape(B, T, cfg.H))
    return head_logits(reader, x, mask, cfg, vocab_block)

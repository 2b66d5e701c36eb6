"""The Qwen3-MoE forward one layer at a time, reading only the routed experts (verify --streamed).

As gpt-oss's: each layer's dense leaves are read, the router runs, then only the experts real
tokens selected are read (one `[e]` / `[e, slot]` slice each) and applied one by one; the
embedding is read for the prompt's tokens only and the LM head in column blocks (the shared
`common.streamed` reads: same leaves, same math). Same math as `model.forward` (it reuses
its pieces).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_convert.backends.common.streamed import HIGHEST, embedded, head_logits, routed_experts
from gptoss_convert.backends.qwen3_moe import model
from gptoss_convert.backends.qwen3_moe.moe import route
from gptoss_convert.backends.qwen3_moe.params import EXPERT_LEAVES


@functools.partial(jax.jit, static_argnames=("cfg",))
def _attention_half(p, x, ctx, cfg):
    """x + attention(pre-norm(x)); then the post-norm input of the MoE block."""
    h = model.rms_norm(x, p["pre_self_attention_layer_norm"]["scale"], cfg.rms_norm_eps)
    x = x + model.attention(p["self_attention"], h, cfg, ctx)
    return x, model.rms_norm(x, p["post_self_attention_layer_norm"]["scale"], cfg.rms_norm_eps)


@jax.jit
def _expert(h, w0, w1, wo):
    """One expert on rows h [n, H]: (silu(h·W0) * h·W1)·Wo."""
    return jnp.dot(jax.nn.silu(jnp.dot(h, w0, precision=HIGHEST)) * jnp.dot(h, w1, precision=HIGHEST), wo,
                   precision=HIGHEST)


def _moe(reader, layer: int, h: np.ndarray, gate_kernel, valid: np.ndarray, cfg) -> np.ndarray:
    """The MoE block for rows h [N, H], reading only the experts that real tokens selected."""
    weights, experts = (np.asarray(a) for a in route(jnp.asarray(h), gate_kernel, cfg))
    return routed_experts(reader, layer, h, weights, experts, valid, EXPERT_LEAVES,
                          lambda rows, w: _expert(rows, w["wi_0"], w["wi_1"], w["wo"]))


def streamed_logits(reader, cfg, tokens: np.ndarray, mask: np.ndarray, *, vocab_block: int = 16384) -> list[np.ndarray]:
    """fp32 logits of right-padded `tokens` [B, T] (`mask` 1 = real token): one [len_b, V] array
    per row, for the real tokens only. `reader` reads the checkpoint (verify.streamed.LeafReader)."""
    B, T = tokens.shape
    x = embedded(reader, tokens)                                                              # [B, T, H]
    ctx = model.make_context(cfg, B, T, attention_mask=jnp.asarray(mask))
    valid = np.asarray(mask, bool).reshape(-1)
    for i in range(cfg.L):
        p = reader.dense_layer(i)
        x, h2 = _attention_half(jax.tree.map(jnp.asarray, p), x, ctx, cfg)
        out = _moe(reader, i, np.asarray(h2).reshape(-1, cfg.H), p["moe_block"]["gate"]["kernel"], valid, cfg)
        x = x + jnp.asarray(out.reshape(B, T, cfg.H))
    return head_logits(reader, x, mask, cfg, vocab_block)

"""Minimal JAX gpt-oss forward over the MaxText parameter tree (docs/maxtext.md §1 tree, docs/forward.md §1 math).

Pure functions over nested dicts with leaves named as `params.flat_shapes`; both layouts are
accepted (`decoder/layers` present -> scanned). Nothing here imports conversion code. The pieces
(`make_context`, `embed`, `decoder_layer`, `unembed`) are public so a streamed forward can load
one layer at a time and call `decoder_layer` on its unscanned params.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from gptoss_convert.backends.common import sharding
from gptoss_convert.backends.common.layers import (  # noqa: F401  (re-exported: the model's API)
    apply_rope, causal_visibility, embed, is_scanned, precision, rms_norm, run_layers, segment_positions,
    unembed)
from gptoss_convert.backends.common.layers import cast as _cast
from gptoss_convert.backends.gpt_oss.config import GptOssConfig
from gptoss_convert.backends.gpt_oss.moe import moe as moe_block
from gptoss_convert.backends.gpt_oss.params import GLOBAL_LEAVES, LAYER_LEAVES, layout_for

Params = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# RoPE (YaRN) and masks


def rope_inv_freq(cfg: GptOssConfig) -> np.ndarray:
    """YaRN inverse frequencies [D/2] float32, computed as HF transformers does (fp32 arithmetic).

    truncate=False (gpt-oss) keeps the correction range low/high unrounded; truncate=True rounds
    them floor/ceil. Both are clamped to [0, D-1] as in HF.
    """
    rs, D, theta = cfg.rope_scaling, cfg.D, cfg.rope_theta

    def correction_dim(rotations: float) -> float:
        return D * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001   # HF's guard against a zero-width ramp
    pos_freqs = theta ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D))        # [D/2]
    ramp = np.clip((np.arange(D // 2, dtype=np.float32) - low) / (high - low), 0, 1)   # 0 = extrapolate
    inv_freq = (1 / pos_freqs) * (1 - ramp) + (1 / (rs.factor * pos_freqs)) * ramp
    return inv_freq.astype(np.float32)


def rope_mscale(cfg: GptOssConfig) -> float:
    """YaRN attention factor 0.1·ln(factor) + 1, folded into cos/sin so it scales q and k."""
    f = cfg.rope_scaling.factor
    return 0.1 * math.log(f) + 1.0 if f > 1 else 1.0


def rope_tables(positions, cfg: GptOssConfig, dtype=jnp.float32):
    """cos, sin [..., D/2] for integer `positions` [...], mscale included, cast to `dtype`."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    m = rope_mscale(cfg)
    return (jnp.cos(angles) * m).astype(dtype), (jnp.sin(angles) * m).astype(dtype)


class Context(NamedTuple):
    """Per-batch inputs shared by every layer: rotary tables and the two attention masks."""

    cos: jax.Array           # [B, T, D/2]
    sin: jax.Array           # [B, T, D/2]
    full_mask: jax.Array     # [B, T, S] bool, True = key visible
    sliding_mask: jax.Array  # [B, T, S] bool

    def mask(self, sliding: bool):
        return self.sliding_mask if sliding else self.full_mask


def make_context(cfg: GptOssConfig, batch: int, length: int, *, segment_ids=None, attention_mask=None,
                 positions=None, dtype=jnp.float32) -> Context:
    """Rotary tables and masks for a [batch, length] block of tokens.

    attention_mask [B, T]: 1/True = real token (left or right padding). segment_ids [B, T]:
    tokens see only their own segment; 0 = padding (MaxText convention). Default positions:
    within-segment index, else count of real tokens before (left padding starts at 0), else
    0..T-1. The sliding window is on token index (equal to position distance within a sequence).
    """
    visible, positions = causal_visibility(batch, length, segment_ids=segment_ids, attention_mask=attention_mask,
                                           positions=positions)
    i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    sliding = visible & (j > i - cfg.sliding_window)
    cos, sin = rope_tables(positions, cfg, dtype)
    return Context(cos, sin, visible, sliding)


# ---------------------------------------------------------------------------------------------
# Layers


def sdpa_with_sinks(q, k, v, sinks, mask):
    """Dot-product attention with one sink logit per head; q [B,T,Nq,D], k/v [B,S,Nkv,D] -> [B,T,Nq,D].

    GQA: query head n uses kv head n // (Nq/Nkv). The sink is an extra softmax column that is
    dropped afterwards, so rows sum to < 1; a row with no visible key is all zeros (no NaN).
    """
    B, T, Nq, D = q.shape
    Nkv = k.shape[2]
    G = Nq // Nkv
    qg = (q * D ** -0.5).reshape(B, T, Nkv, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=precision(q.dtype),
                   preferred_element_type=jnp.float32)                       # [B, Nkv, G, T, S]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(Nkv, G, 1, 1), (B, Nkv, G, T, 1))
    p = jax.nn.softmax(jnp.concatenate([s, sink], axis=-1), axis=-1)[..., :-1]
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, precision=precision(v.dtype))
    return o.reshape(B, T, Nq, D)


def project_qkv(attn_params: Params, h, cos, sin):
    """q [B, T, Nq, D], k, v [B, T, Nkv, D] from normed h [B, T, H]; RoPE applied to q and k."""
    p, prec = attn_params, precision(h.dtype)

    def proj(name):   # [B, T, N, D]
        return jnp.einsum("bth,hnd->btnd", h, p[name]["kernel"], precision=prec) + p[name]["bias"]

    return apply_rope(proj("query"), cos, sin), apply_rope(proj("key"), cos, sin), proj("value")


def project_out(attn_params: Params, o):
    """Attention output o [B, T, Nq, D] -> [B, T, H] through the out projection."""
    p = attn_params["out"]
    return jnp.einsum("btnd,ndh->bth", o, p["kernel"], precision=precision(o.dtype)) + p["bias"]


def attention(attn_params: Params, h, cfg: GptOssConfig, ctx: Context, *, sliding: bool):
    """GptOssAttention on normed h [B, T, H] -> [B, T, H] (params already in h.dtype)."""
    q, k, v = project_qkv(attn_params, h, ctx.cos, ctx.sin)
    return project_out(attn_params, sdpa_with_sinks(q, k, v, attn_params["sinks"], ctx.mask(sliding)))


def decoder_layer(layer_params: Params, x, cfg: GptOssConfig, sliding: bool, ctx: Context, *,
                  moe: str = "ragged_dot", dtype=jnp.float32):
    """One decoder layer on the residual x [B, T, H]; `layer_params` is one `layers_{i}` subtree
    (unscanned shapes, any float dtype: cast here to `dtype`). `sliding` = cfg.is_sliding(i)."""
    p = _cast(layer_params, dtype)
    eps = cfg.rms_norm_eps
    h = rms_norm(x, p["pre_self_attention_layer_norm"]["scale"], eps)
    x = x + attention(p["GptOssAttention"], h, cfg, ctx, sliding=sliding)
    h = rms_norm(x, p["post_self_attention_layer_norm"]["scale"], eps)
    return x + moe_block(h, p["GptOssMlp"], cfg, strategy=moe)


@functools.partial(jax.jit, static_argnames=("cfg", "moe", "dtype"))
def forward(params: Params, tokens, cfg: GptOssConfig, *, moe: str = "ragged_dot", dtype=jnp.float32,
            segment_ids=None, attention_mask=None, positions=None):
    """Logits [B, T, V] (fp32) for tokens [B, T]; compute in `dtype` (float32 or bfloat16).

    `params` is the MaxText tree (the part under `params/params/`), scanned or unscanned.
    Padding: pass `attention_mask` [B, T] (1 = real) or `segment_ids` [B, T] (0 = padding);
    logits at padded positions are meaningless.
    """
    B, T = tokens.shape
    ctx = make_context(cfg, B, T, segment_ids=segment_ids, attention_mask=attention_mask,
                       positions=positions, dtype=dtype)

    def layer(lp, x, i):   # scanned: i is the position in the (sliding, full) period
        return decoder_layer(lp, x, cfg, cfg.is_sliding(i), ctx, moe=moe, dtype=dtype)

    return unembed(params,
                   run_layers(params, embed(params, tokens, dtype), layout_for(cfg, is_scanned(params)), layer), cfg)


# ---------------------------------------------------------------------------------------------
# Sharding: the mesh axes come from params.py's leaf tables


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for the gpt-oss leaf at `path` with global `shape` (common.sharding's rule
    over params.py's tables: an axis the mesh lacks or that does not divide is replicated)."""
    return sharding.partition_spec(path, shape, mesh, GLOBAL_LEAVES, LAYER_LEAVES)


def param_shardings(abstract_tree: Params, mesh: Mesh) -> Params:
    """Same-structure tree of NamedSharding for a gpt-oss parameter tree (arrays or ShapeDtypeStructs)."""
    return sharding.param_shardings(abstract_tree, mesh, GLOBAL_LEAVES, LAYER_LEAVES)

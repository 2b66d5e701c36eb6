"""Minimal JAX Qwen3-MoE forward over the MaxText parameter tree (params.py's leaves).

Pure functions over nested dicts; both layouts are accepted (`decoder/layers` holding the leaves
directly -> scanned, one stack of all layers at axis 1). Per layer: RMSNorm, attention with an
RMSNorm on each query and key head before the standard RoPE (no biases, no sinks, no sliding
window), RMSNorm, the routed MoE block. Nothing here imports conversion code.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from gptoss_convert.backends.common import sharding
# The pieces the families share as they are: norms, rotation, masks, packing, embedding, the untied head.
from gptoss_convert.backends.common.layers import (  # noqa: F401  (re-exported: the model's API)
    apply_rope, causal_visibility, embed, is_scanned, precision, rms_norm, run_layers, unembed)
from gptoss_convert.backends.qwen3_moe.config import Qwen3MoeConfig
from gptoss_convert.backends.qwen3_moe.moe import moe as moe_block
from gptoss_convert.backends.qwen3_moe.params import GLOBAL_LEAVES, LAYER_LEAVES, layout_for

Params = dict[str, Any]


def rope_tables(positions, cfg: Qwen3MoeConfig, dtype=jnp.float32):
    """cos, sin [..., D/2] of the default (unscaled) RoPE, inv_freq = theta^(-2i/D) in fp32 as HF."""
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.D, 2, dtype=np.float32) / np.float32(cfg.D)))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq.astype(np.float32))
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


class Context(NamedTuple):
    """Per-batch inputs shared by every layer: rotary tables and the causal (+ padding) mask."""

    cos: jax.Array      # [B, T, D/2]
    sin: jax.Array      # [B, T, D/2]
    mask: jax.Array     # [B, T, S] bool, True = key visible


def make_context(cfg: Qwen3MoeConfig, batch: int, length: int, *, segment_ids=None, attention_mask=None,
                 positions=None, dtype=jnp.float32) -> Context:
    """Rotary tables and the mask for a [batch, length] block; padding and positions as gpt-oss's
    `make_context` (attention_mask 1 = real token; segment_ids 0 = padding)."""
    visible, positions = causal_visibility(batch, length, segment_ids=segment_ids, attention_mask=attention_mask,
                                           positions=positions)
    cos, sin = rope_tables(positions, cfg, dtype)
    return Context(cos, sin, visible)


def sdpa(q, k, v, mask):
    """Causal GQA attention: q [B,T,Nq,D], k/v [B,S,Nkv,D] -> [B,T,Nq,D]; query head n uses kv
    head n // (Nq/Nkv). A row with no visible key (padding) gives zeros, not NaN."""
    B, T, Nq, D = q.shape
    Nkv = k.shape[2]
    qg = (q * D ** -0.5).reshape(B, T, Nkv, Nq // Nkv, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=precision(q.dtype),
                   preferred_element_type=jnp.float32)                       # [B, Nkv, G, T, S]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True, initial=-1e30))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, precision=precision(v.dtype))
    return o.reshape(B, T, Nq, D)


def project_qkv(attn: Params, h, cos, sin, eps: float):
    """q [B,T,Nq,D], k, v [B,T,Nkv,D] from normed h [B,T,H]: q and k RMS-normed per head, then RoPE."""
    prec = precision(h.dtype)

    def proj(name):
        return jnp.einsum("bth,hnd->btnd", h, attn[name]["kernel"], precision=prec)

    q = rms_norm(proj("query"), attn["query_norm"]["scale"], eps)
    k = rms_norm(proj("key"), attn["key_norm"]["scale"], eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), proj("value")


def attention(attn: Params, h, cfg: Qwen3MoeConfig, ctx: Context):
    """Qwen3 attention on normed h [B, T, H] -> [B, T, H]."""
    q, k, v = project_qkv(attn, h, ctx.cos, ctx.sin, cfg.rms_norm_eps)
    o = sdpa(q, k, v, ctx.mask)
    return jnp.einsum("btnd,ndh->bth", o, attn["out"]["kernel"], precision=precision(o.dtype))


def decoder_layer(layer_params: Params, x, cfg: Qwen3MoeConfig, ctx: Context, *, moe: str = "ragged_dot",
                  dtype=jnp.float32):
    """One decoder layer on the residual x [B, T, H]; `layer_params` has unscanned shapes, any
    float dtype (cast here to `dtype`)."""
    p = jax.tree.map(lambda a: a.astype(dtype), layer_params)
    h = rms_norm(x, p["pre_self_attention_layer_norm"]["scale"], cfg.rms_norm_eps)
    x = x + attention(p["self_attention"], h, cfg, ctx)
    h = rms_norm(x, p["post_self_attention_layer_norm"]["scale"], cfg.rms_norm_eps)
    return x + moe_block(h, p["moe_block"], cfg, strategy=moe)


@functools.partial(jax.jit, static_argnames=("cfg", "moe", "dtype"))
def forward(params: Params, tokens, cfg: Qwen3MoeConfig, *, moe: str = "ragged_dot", dtype=jnp.float32,
            segment_ids=None, attention_mask=None, positions=None):
    """Logits [B, T, V] (fp32) for tokens [B, T]; compute in `dtype` (float32 or bfloat16).

    `params` is the MaxText tree (the part under `params/params/`), scanned or unscanned; padding
    as in `make_context`.
    """
    B, T = tokens.shape
    ctx = make_context(cfg, B, T, segment_ids=segment_ids, attention_mask=attention_mask,
                       positions=positions, dtype=dtype)

    def layer(lp, x, i):
        return decoder_layer(lp, x, cfg, ctx, moe=moe, dtype=dtype)

    return unembed(params,
                   run_layers(params, embed(params, tokens, dtype), layout_for(cfg, is_scanned(params)), layer), cfg)


# ---------------------------------------------------------------------------------------------
# Sharding: the mesh axes come from params.py's leaf tables (the rule is common.sharding's)


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for the Qwen3-MoE leaf at `path` with global `shape` (an axis the mesh lacks
    or that does not divide the dimension is replicated; None on a scanned stack axis)."""
    return sharding.partition_spec(path, shape, mesh, GLOBAL_LEAVES, LAYER_LEAVES)


def param_shardings(abstract_tree: Params, mesh: Mesh) -> Params:
    """Same-structure tree of NamedSharding for a Qwen3-MoE parameter tree (arrays or ShapeDtypeStructs)."""
    return sharding.param_shardings(abstract_tree, mesh, GLOBAL_LEAVES, LAYER_LEAVES)

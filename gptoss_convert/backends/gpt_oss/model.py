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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_convert.backends.gpt_oss.config import GptOssConfig
from gptoss_convert.backends.gpt_oss.moe import moe as moe_block
from gptoss_convert.backends.gpt_oss.params import GLOBAL_LEAVES, LAYER_LEAVES, layout_for
from gptoss_convert.mapping.leaves import leaf_axes

Params = dict[str, Any]


def _precision(dtype) -> jax.lax.Precision | None:
    # fp32 compute means fp32 matmuls on every backend (TPU/GPU defaults would use bf16 passes).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def is_scanned(params: Params) -> bool:
    """True for MaxText's scanned layout (`decoder/layers/layers_{0,1}` stacked at axis 1)."""
    return "layers" in params["decoder"]


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


def apply_rope(x, cos, sin):
    """Split-half rotation of x [B, T, N, D] by cos/sin [B, T, D/2]: [x1·c − x2·s, x2·c + x1·s]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class Context(NamedTuple):
    """Per-batch inputs shared by every layer: rotary tables and the two attention masks."""

    cos: jax.Array           # [B, T, D/2]
    sin: jax.Array           # [B, T, D/2]
    full_mask: jax.Array     # [B, T, S] bool, True = key visible
    sliding_mask: jax.Array  # [B, T, S] bool

    def mask(self, sliding: bool):
        return self.sliding_mask if sliding else self.full_mask


def segment_positions(segment_ids):
    """Position of each token inside its segment (packed sequences restart at 0)."""
    T = segment_ids.shape[-1]
    idx = jnp.arange(T, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool),
                              segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


def make_context(cfg: GptOssConfig, batch: int, length: int, *, segment_ids=None, attention_mask=None,
                 positions=None, dtype=jnp.float32) -> Context:
    """Rotary tables and masks for a [batch, length] block of tokens.

    attention_mask [B, T]: 1/True = real token (left or right padding). segment_ids [B, T]:
    tokens see only their own segment; 0 = padding (MaxText convention). Default positions:
    within-segment index, else count of real tokens before (left padding starts at 0), else
    0..T-1. The sliding window is on token index (equal to position distance within a sequence).
    """
    B, T = batch, length
    i = jnp.arange(T)[:, None]
    j = jnp.arange(T)[None, :]
    visible = jnp.broadcast_to(j <= i, (B, T, T))
    if attention_mask is not None:
        valid = attention_mask.astype(bool)
        visible = visible & valid[:, None, :]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        visible = visible & same & (segment_ids[:, None, :] != 0)
    if positions is None:
        if segment_ids is not None:
            positions = segment_positions(segment_ids)
        elif attention_mask is not None:
            positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
        else:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    sliding = visible & (j > i - cfg.sliding_window)
    cos, sin = rope_tables(positions, cfg, dtype)
    return Context(cos, sin, visible, sliding)


# ---------------------------------------------------------------------------------------------
# Layers


def rms_norm(x, scale, eps: float):
    """x·rsqrt(mean(x²) + eps)·scale, computed in fp32, returned in x.dtype (as HF does)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(x.dtype)


def sdpa_with_sinks(q, k, v, sinks, mask):
    """Dot-product attention with one sink logit per head; q [B,T,Nq,D], k/v [B,S,Nkv,D] -> [B,T,Nq,D].

    GQA: query head n uses kv head n // (Nq/Nkv). The sink is an extra softmax column that is
    dropped afterwards, so rows sum to < 1; a row with no visible key is all zeros (no NaN).
    """
    B, T, Nq, D = q.shape
    Nkv = k.shape[2]
    G = Nq // Nkv
    qg = (q * D ** -0.5).reshape(B, T, Nkv, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=_precision(q.dtype),
                   preferred_element_type=jnp.float32)                       # [B, Nkv, G, T, S]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(Nkv, G, 1, 1), (B, Nkv, G, T, 1))
    p = jax.nn.softmax(jnp.concatenate([s, sink], axis=-1), axis=-1)[..., :-1]
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, precision=_precision(v.dtype))
    return o.reshape(B, T, Nq, D)


def project_qkv(attn_params: Params, h, cos, sin):
    """q [B, T, Nq, D], k, v [B, T, Nkv, D] from normed h [B, T, H]; RoPE applied to q and k."""
    p, prec = attn_params, _precision(h.dtype)

    def proj(name):   # [B, T, N, D]
        return jnp.einsum("bth,hnd->btnd", h, p[name]["kernel"], precision=prec) + p[name]["bias"]

    return apply_rope(proj("query"), cos, sin), apply_rope(proj("key"), cos, sin), proj("value")


def project_out(attn_params: Params, o):
    """Attention output o [B, T, Nq, D] -> [B, T, H] through the out projection."""
    p = attn_params["out"]
    return jnp.einsum("btnd,ndh->bth", o, p["kernel"], precision=_precision(o.dtype)) + p["bias"]


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


def embed(params: Params, tokens, dtype=jnp.float32):
    """tokens [B, T] -> x₀ [B, T, H] (no embedding scaling)."""
    return params["token_embedder"]["embedding"][tokens].astype(dtype)


def unembed(params: Params, x, cfg: GptOssConfig):
    """Final RMSNorm and the untied LM head: x [B, T, H] -> fp32 logits [B, T, V]."""
    h = rms_norm(x, params["decoder"]["decoder_norm"]["scale"], cfg.rms_norm_eps)
    w = params["decoder"]["logits_dense"]["kernel"].astype(x.dtype)
    return jnp.einsum("bth,hv->btv", h, w, precision=_precision(x.dtype), preferred_element_type=jnp.float32)


def _layers_unscanned(params, x, cfg, ctx, moe, dtype):
    for i in range(cfg.L):
        x = decoder_layer(params["decoder"][f"layers_{i}"], x, cfg, cfg.is_sliding(i), ctx, moe=moe, dtype=dtype)
    return x


def _layers_scanned(params, x, cfg, ctx, moe, dtype):
    """lax.scan over stack slots; each step runs layers_0 (sliding) then layers_1 (full), i.e. one
    period of the layout.

    Each step slices its slot out of the stack axis (no transposed copy of the stacked weights).
    """
    stacks = params["decoder"]["layers"]
    layout = layout_for(cfg, True)

    def step(x, slot):
        for j in range(layout.period):
            lp = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, slot, layout.axis, keepdims=False),
                              stacks[f"layers_{j}"])
            x = decoder_layer(lp, x, cfg, cfg.is_sliding(j), ctx, moe=moe, dtype=dtype)
        return x, None

    x, _ = jax.lax.scan(step, x, jnp.arange(layout.stack_size))
    return x


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
    x = embed(params, tokens, dtype)
    run = _layers_scanned if is_scanned(params) else _layers_unscanned
    return unembed(params, run(params, x, cfg, ctx, moe, dtype), cfg)


# ---------------------------------------------------------------------------------------------
# Sharding: the mesh axes come from params.py's leaf tables


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for the leaf at `path` (a `flat_shapes` path) with global `shape`.

    A mesh axis is used only if the mesh has it and it divides that dimension; otherwise the
    dimension is replicated (e.g. 5 experts on a 4-way expert axis). Scanned leaves get None on
    the stack axis.
    """
    axes = leaf_axes(path, GLOBAL_LEAVES, LAYER_LEAVES)
    if axes is None:
        raise ValueError(f"{path}: no sharding rule for this leaf (not a gpt-oss MaxText parameter path)")
    if len(axes) != len(shape):
        raise ValueError(f"{path}: shape {shape} does not match the sharding rule {tuple(axes)}")
    sizes = dict(mesh.shape)   # works for Mesh and AbstractMesh
    return PartitionSpec(*(a if a in sizes and dim % sizes[a] == 0 else None for a, dim in zip(axes, shape)))


def param_shardings(abstract_tree: Params, mesh: Mesh) -> Params:
    """Same-structure tree of NamedSharding for a parameter tree (arrays or ShapeDtypeStructs)."""
    def walk(node, prefix):
        if isinstance(node, dict):
            return {k: walk(v, f"{prefix}/{k}" if prefix else k) for k, v in node.items()}
        return NamedSharding(mesh, partition_spec(prefix, tuple(node.shape), mesh))
    return walk(abstract_tree, "")

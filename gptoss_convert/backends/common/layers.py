"""Family-independent layers over the MaxText parameter tree: the pieces both families' forwards
use unchanged (docs/forward.md §1). Pure functions; compute in the input's dtype."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def precision(dtype) -> jax.lax.Precision | None:
    """fp32 compute means fp32 matmuls on every backend (TPU/GPU defaults would use bf16 passes)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def cast(tree, dtype):
    """Every leaf of `tree` as `dtype`."""
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def is_scanned(params: Params) -> bool:
    """True for MaxText's scanned layout (the layer stacks under `decoder/layers`)."""
    return "layers" in params["decoder"]


def rms_norm(x, scale, eps: float):
    """x·rsqrt(mean(x²) + eps)·scale, computed in fp32, returned in x.dtype (as HF does)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(x.dtype)


def apply_rope(x, cos, sin):
    """Split-half rotation of x [B, T, N, D] by cos/sin [B, T, D/2]: [x1·c − x2·s, x2·c + x1·s]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def segment_positions(segment_ids):
    """Position of each token inside its segment (packed sequences restart at 0)."""
    T = segment_ids.shape[-1]
    idx = jnp.arange(T, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[..., :1], bool),
                              segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


def causal_visibility(batch: int, length: int, *, segment_ids=None, attention_mask=None, positions=None):
    """(visible [B, T, T] bool, positions [B, T]) for a [batch, length] block of tokens.

    attention_mask [B, T]: 1/True = real token (left or right padding). segment_ids [B, T]:
    tokens see only their own segment; 0 = padding (MaxText convention). Default positions:
    within-segment index, else count of real tokens before (left padding starts at 0), else
    0..T-1.
    """
    B, T = batch, length
    i = jnp.arange(T)[:, None]
    j = jnp.arange(T)[None, :]
    visible = jnp.broadcast_to(j <= i, (B, T, T))
    if attention_mask is not None:
        visible = visible & attention_mask.astype(bool)[:, None, :]
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
    return visible, positions


def key_mask(q_pos, k_pos, window: int | None = None):
    """[B, T, S] bool from q_pos [B, T], k_pos [B, S]: a key is visible iff it is stored (pos ≥ 0)
    and not after the query; with a sliding `window` also within it (q − W < k). A padding
    query (pos −1) sees nothing, which the attention turns into zeros."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    visible = (k >= 0) & (k <= q)
    return visible & (k > q - window) if window is not None else visible


def embed(params: Params, tokens, dtype=jnp.float32):
    """tokens [B, T] -> x₀ [B, T, H] (no embedding scaling)."""
    return params["token_embedder"]["embedding"][tokens].astype(dtype)


def unembed(params: Params, x, cfg):
    """Final RMSNorm and the untied LM head: x [B, T, H] -> fp32 logits [B, T, V]."""
    h = rms_norm(x, params["decoder"]["decoder_norm"]["scale"], cfg.rms_norm_eps)
    w = params["decoder"]["logits_dense"]["kernel"].astype(x.dtype)
    return jnp.einsum("bth,hv->btv", h, w, precision=precision(x.dtype), preferred_element_type=jnp.float32)


def layer_slice(stack: Params, slot, axis: int, *, dynamic: bool = True) -> Params:
    """One stack slot of a scanned subtree (unscanned shapes), without copying the stack."""
    if dynamic:
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, slot, axis, keepdims=False), stack)
    return jax.tree.map(lambda a: jax.lax.index_in_dim(a, slot, axis, keepdims=False), stack)


def _stack(params: Params, layout) -> Callable[[int], Params]:
    def at(position: int) -> Params:
        node = params
        for part in layout.stack_prefix(position).strip("/").split("/"):
            node = node[part]
        return node
    return at


def layer_params(params: Params, layout, i: int) -> Params:
    """Layer i's subtree with unscanned shapes, from either layout (`layout`: mapping.layout.Layout)."""
    if not is_scanned(params):
        return params["decoder"][f"layers_{i}"]
    return layer_slice(_stack(params, layout)(i % layout.period), i // layout.period, layout.axis, dynamic=False)


def run_layers(params: Params, x, layout, apply: Callable[[Params, Any, int], Any]):
    """x through every decoder layer: `apply(layer_params, x, i)` -> x. Unscanned: i is the layer
    index. Scanned: one lax.scan over the stack slots, each step running the period's layers in
    order (i = position in the period, which fixes the layer's kind), slicing each slot out of the
    stack axis (no transposed copy of the stacked weights)."""
    if not is_scanned(params):
        for i in range(layout.num_layers):
            x = apply(params["decoder"][f"layers_{i}"], x, i)
        return x
    stack = _stack(params, layout)

    def step(x, slot):
        for j in range(layout.period):
            x = apply(layer_slice(stack(j), slot, layout.axis), x, j)
        return x, None

    return jax.lax.scan(step, x, jnp.arange(layout.stack_size))[0]

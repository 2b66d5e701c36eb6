"""Qwen3-MoE mixture-of-experts block: softmax router, top-k, optional renormalisation, SiLU experts.

The three dropless strategies and the dispatch over them are the shared ones
(backends/common/moe.py), unchanged; no biases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_convert.backends.common.layers import precision
from gptoss_convert.backends.common.moe import check_strategy, dispatch, validate_moe_inputs
from gptoss_convert.backends.qwen3_moe.params import LAYER_LEAVES


def route(h, gate_kernel, cfg):
    """Softmax over all E router logits (fp32), the top k, renormalised when cfg.norm_topk_prob
    (as HF's Qwen3MoeTopKRouter). h [N, H] -> (weights [N, k] float32, experts [N, k] int32)."""
    logits = jnp.einsum("nh,he->ne", h, gate_kernel, precision=precision(h.dtype),
                        preferred_element_type=jnp.float32)
    top, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top, experts.astype(jnp.int32)


def silu_glu(g, u):
    """Qwen3's expert activation: silu(gate) · up."""
    return jax.nn.silu(g) * u


def moe(h, layer_mlp_params: Mapping[str, Any], cfg, *, strategy: str = "ragged_dot"):
    """The Qwen3-MoE block on `h` [..., H] (computed in h.dtype, combined in fp32) -> [..., H];
    `layer_mlp_params` is one layer's `moe_block` subtree (unscanned shapes)."""
    check_strategy(strategy)
    validate_moe_inputs(h, layer_mlp_params, cfg, LAYER_LEAVES, "moe_block/")
    p = jax.tree.map(lambda a: a.astype(h.dtype), dict(layer_mlp_params))
    x = h.reshape(-1, cfg.H)                                             # [N, H]
    weights, experts = route(x, p["gate"]["kernel"], cfg)
    return dispatch(x, p, weights, experts, cfg.E, silu_glu, strategy).astype(h.dtype).reshape(h.shape)

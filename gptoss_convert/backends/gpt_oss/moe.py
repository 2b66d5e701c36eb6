"""gpt-oss mixture-of-experts block: biased top-k router, clamped SwiGLU experts with biases.

The three dropless strategies ("megablox", "ragged_dot", "dense") and the dispatch over them are
the shared ones (backends/common/moe.py). `layer_mlp_params` is one layer's `GptOssMlp` subtree
(unscanned shapes, docs/maxtext.md §1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_convert.backends.common.layers import precision
from gptoss_convert.backends.common.moe import (  # noqa: F401  (re-exported: the family's MoE API)
    STRATEGIES, MoeArgumentError, check_strategy, dispatch, grouped_matmul, validate_grouped_matmul_args,
    validate_moe_inputs as _validate)
from gptoss_convert.backends.gpt_oss.params import LAYER_LEAVES


def validate_moe_inputs(h, layer_mlp_params: Mapping[str, Any], cfg) -> None:
    """Check `h` and one layer's `GptOssMlp` params against `cfg`; every problem in one error."""
    _validate(h, layer_mlp_params, cfg, LAYER_LEAVES, "GptOssMlp/")


def route(h, gate_params, k: int):
    """Top-k routing: logits = h·Wr + br [N, E]; weights = softmax over the selected k only.

    Returns (weights [N, k] float32, experts [N, k] int32).
    """
    logits = jnp.einsum("nh,he->ne", h, gate_params["kernel"], precision=precision(h.dtype),
                        preferred_element_type=jnp.float32) + gate_params["bias"].astype(jnp.float32)
    top, experts = jax.lax.top_k(logits, k)
    return jax.nn.softmax(top, axis=-1), experts.astype(jnp.int32)


def swiglu(g, u, cfg):
    """gpt-oss clamped SwiGLU: g = min(g, limit), u = clip(u, ±limit), g·σ(α·g)·(u + 1)."""
    g = jnp.minimum(g, cfg.swiglu_limit)
    u = jnp.clip(u, -cfg.swiglu_limit, cfg.swiglu_limit)
    return g * jax.nn.sigmoid(cfg.swiglu_alpha * g) * (u + 1)


def moe(h, layer_mlp_params: Mapping[str, Any], cfg, *, strategy: str = "ragged_dot",
        capacity_factor: float = -1.0):
    """The gpt-oss MoE block on `h` [..., H] (computed in h.dtype, combined in fp32) -> [..., H].

    `capacity_factor` exists for parity with MaxText; only -1 (dropless) is supported.
    """
    check_strategy(strategy, capacity_factor)
    validate_moe_inputs(h, layer_mlp_params, cfg)
    dtype = h.dtype
    p = jax.tree.map(lambda a: a.astype(dtype), dict(layer_mlp_params))
    x = h.reshape(-1, cfg.H)                                     # [N, H]
    weights, experts = route(x, p["gate"], cfg.num_experts_per_tok)
    out = dispatch(x, p, weights, experts, cfg.E, lambda g, u: swiglu(g, u, cfg), strategy)
    return out.astype(dtype).reshape(h.shape)

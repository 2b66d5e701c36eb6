"""Qwen3-MoE mixture-of-experts block: softmax router, top-k, optional renormalisation, SiLU experts.

The three dropless strategies are gpt-oss's, unchanged: "megablox" and "ragged_dot" run the
experts through `gpt_oss.moe.grouped_matmul` over tokens sorted by expert; "dense" runs every
expert on every token with zero combine weights for the experts a token did not select.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_convert.backends.gpt_oss.moe import STRATEGIES, MoeArgumentError, grouped_matmul
from gptoss_convert.backends.qwen3_moe.params import LAYER_LEAVES


def precision(dtype) -> jax.lax.Precision | None:
    """fp32 compute means fp32 matmuls on every backend (TPU/GPU defaults would use bf16 passes)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def route(h, gate_kernel, cfg):
    """Softmax over all E router logits (fp32), the top k, renormalised when cfg.norm_topk_prob
    (as HF's Qwen3MoeTopKRouter). h [N, H] -> (weights [N, k] float32, experts [N, k] int32)."""
    logits = jnp.einsum("nh,he->ne", h, gate_kernel, precision=precision(h.dtype),
                        preferred_element_type=jnp.float32)
    top, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top, experts.astype(jnp.int32)


def _sorted_experts(h, p, weights, experts, cfg, strategy):
    """Dropless grouped path: sort the N·k (token, expert) pairs by expert, grouped matmuls, unsort."""
    N, k = experts.shape
    flat = experts.reshape(-1)                                           # [N*k]
    order = jnp.argsort(flat, stable=True)                               # sorted row -> (token, k) slot
    sizes = jnp.bincount(flat, length=cfg.E).astype(jnp.int32)           # [E], zeros allowed
    xs = h[order // k]                                                   # [N*k, H], grouped by expert
    g = grouped_matmul(xs, p["wi_0"], sizes, strategy=strategy)         # [N*k, I]
    u = grouped_matmul(xs, p["wi_1"], sizes, strategy=strategy)
    y = grouped_matmul(jax.nn.silu(g) * u, p["wo"], sizes, strategy=strategy)   # [N*k, H]
    y = y[jnp.argsort(order)].reshape(N, k, cfg.H)
    return jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), weights)


def _dense_experts(h, p, weights, experts, cfg):
    """Every expert on every token; non-selected experts get combine weight 0."""
    N, prec = h.shape[0], precision(h.dtype)
    combine = jnp.zeros((N, cfg.E), jnp.float32).at[jnp.arange(N)[:, None], experts].set(weights)  # [N, E]
    g = jnp.einsum("nh,ehi->nei", h, p["wi_0"], precision=prec)                                  # [N, E, I]
    u = jnp.einsum("nh,ehi->nei", h, p["wi_1"], precision=prec)
    y = jnp.einsum("nei,eih->neh", jax.nn.silu(g) * u, p["wo"], precision=prec)                   # [N, E, H]
    return jnp.einsum("neh,ne->nh", y.astype(jnp.float32), combine)


def _validate(h, p: Mapping[str, Any], cfg) -> None:
    """Check `h` and one layer's `moe_block` params against `cfg`; every problem in one error."""
    problems = [] if h.shape[-1] == cfg.H else [f"h: expected last dimension H={cfg.H}, got shape {tuple(h.shape)}"]
    for rel, leaf in LAYER_LEAVES.items():
        if rel.startswith("moe_block/"):
            name = rel.removeprefix("moe_block/")
            node = p.get(name.split("/")[0])
            node = node.get("kernel") if name.endswith("/kernel") and isinstance(node, Mapping) else node
            if node is None or tuple(node.shape) != leaf.shape(cfg):
                got = "missing" if node is None else f"got shape {tuple(node.shape)}"
                problems.append(f"layer_mlp_params[{name!r}]: expected shape {leaf.shape(cfg)}, {got}")
    if problems:
        raise MoeArgumentError("; ".join(problems))


def moe(h, layer_mlp_params: Mapping[str, Any], cfg, *, strategy: str = "ragged_dot"):
    """The Qwen3-MoE block on `h` [..., H] (computed in h.dtype, combined in fp32) -> [..., H];
    `layer_mlp_params` is one layer's `moe_block` subtree (unscanned shapes)."""
    if strategy not in STRATEGIES:
        raise MoeArgumentError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    _validate(h, layer_mlp_params, cfg)
    p = jax.tree.map(lambda a: a.astype(h.dtype), dict(layer_mlp_params))
    x = h.reshape(-1, cfg.H)                                             # [N, H]
    weights, experts = route(x, p["gate"]["kernel"], cfg)
    if strategy == "dense":
        out = _dense_experts(x, p, weights, experts, cfg)
    else:
        out = _sorted_experts(x, p, weights, experts, cfg, strategy)
    return out.astype(h.dtype).reshape(h.shape)

"""gpt-oss mixture-of-experts block: top-k routing and three dropless expert strategies.

`moe(h, layer_mlp_params, cfg, strategy=...)` with strategy one of
- "megablox":   Pallas grouped matmul (`jax.experimental.pallas.ops.tpu.megablox.gmm`); native on
                TPU, Pallas interpret mode elsewhere (correct but slow; a warning is logged once).
- "ragged_dot": `jax.lax.ragged_dot` over tokens sorted by expert (CPU/GPU/TPU).
- "dense":      every expert on every token, combined with routing weights that are zero for
                experts a token did not select (a simple reference; O(E) compute).
All are dropless: a token always reaches its k experts. `layer_mlp_params` is one layer's
`GptOssMlp` subtree (unscanned shapes, docs/maxtext.md §1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_convert.backends.gpt_oss.params import LAYER_LEAVES
from gptoss_convert.errors import ConvertError

log = logging.getLogger(__name__)

STRATEGIES = ("megablox", "ragged_dot", "dense")
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_interpret_warned = False


class MoeArgumentError(ConvertError, ValueError):
    """An argument of the MoE block or of a grouped matmul is unusable; the message names it."""


def _precision(dtype) -> jax.lax.Precision | None:
    # fp32 compute means fp32 matmuls on every backend (TPU/GPU defaults would use bf16 passes).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The `GptOssMlp` leaves of params.py's table, relative to that subtree."""
    return {rel.removeprefix("GptOssMlp/"): leaf.shape(cfg) for rel, leaf in LAYER_LEAVES.items()
            if rel.startswith("GptOssMlp/")}


def validate_moe_inputs(h, layer_mlp_params: Mapping[str, Any], cfg) -> None:
    """Check `h` and one layer's `GptOssMlp` params against `cfg`; every problem in one error."""
    problems = []
    if h.ndim < 1 or h.shape[-1] != cfg.H:
        problems.append(f"h: expected last dimension H={cfg.H}, got shape {tuple(h.shape)}")
    if jnp.dtype(h.dtype) not in _FLOATS:
        problems.append(f"h: expected float32 or bfloat16, got {jnp.dtype(h.dtype)}")
    for rel, shape in _expected_shapes(cfg).items():
        node: Any = layer_mlp_params
        for part in rel.split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
        name = "layer_mlp_params[" + "][".join(repr(p) for p in rel.split("/")) + "]"
        if node is None:
            problems.append(f"{name}: missing")
        elif tuple(node.shape) != shape:
            problems.append(f"{name}: expected shape {shape}, got {tuple(node.shape)}")
        elif not jnp.issubdtype(node.dtype, jnp.floating):
            problems.append(f"{name}: expected a floating dtype, got {node.dtype}")
    if problems:
        raise MoeArgumentError("; ".join(problems))


def validate_grouped_matmul_args(lhs, rhs, group_sizes) -> None:
    """megablox-style checks: ranks, contracting dims, dtypes, group count and (if known) sum."""
    problems = []
    if lhs.ndim != 2:
        problems.append(f"lhs: expected a 2-D [m, k] array, got shape {tuple(lhs.shape)}")
    if rhs.ndim != 3:
        problems.append(f"rhs: expected a 3-D [groups, k, n] array, got shape {tuple(rhs.shape)}")
    if lhs.ndim == 2 and rhs.ndim == 3 and lhs.shape[1] != rhs.shape[1]:
        problems.append(f"lhs/rhs: contracting dimensions differ: lhs {tuple(lhs.shape)} vs rhs {tuple(rhs.shape)}")
    for name, arr in (("lhs", lhs), ("rhs", rhs)):
        if jnp.dtype(arr.dtype) not in _FLOATS:
            problems.append(f"{name}: expected float32 or bfloat16, got {jnp.dtype(arr.dtype)}")
    if group_sizes.ndim != 1 or jnp.dtype(group_sizes.dtype) != jnp.int32:
        problems.append(f"group_sizes: expected a 1-D int32 array, got {jnp.dtype(group_sizes.dtype)} "
                        f"shape {tuple(group_sizes.shape)}")
    elif rhs.ndim == 3 and group_sizes.shape[0] != rhs.shape[0]:
        problems.append(f"group_sizes: expected {rhs.shape[0]} groups (rhs.shape[0]), got {group_sizes.shape[0]}")
    elif not isinstance(group_sizes, jax.core.Tracer) and lhs.ndim == 2:
        sizes = np.asarray(group_sizes)
        if (sizes < 0).any():
            problems.append(f"group_sizes: negative sizes {sizes.tolist()}")
        elif int(sizes.sum()) != lhs.shape[0]:
            problems.append(f"group_sizes: sum is {int(sizes.sum())} but lhs has {lhs.shape[0]} rows")
    if problems:
        raise MoeArgumentError("; ".join(problems))


def _warn_interpret_once() -> None:
    global _interpret_warned
    if not _interpret_warned:
        _interpret_warned = True
        log.warning("megablox: backend %r is not TPU; running the Pallas gmm kernel in interpret mode "
                    "(correct but slow). Use strategy='ragged_dot' off TPU.", jax.default_backend())


def _megablox_gmm(lhs, rhs, group_sizes, out_dtype):
    """Pallas gmm; pads m to a tile multiple (gmm requires m % tm == 0) and drops the pad rows."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    interpret = jax.default_backend() != "tpu"
    if interpret:
        _warn_interpret_once()
    m, k = lhs.shape
    n = rhs.shape[2]
    tm = min(128, -(-m // 16) * 16) if m else 16
    m_pad = -(-m // tm) * tm if m else tm
    lhs_p = jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
    # Interpret mode runs one loop step per grid cell: whole k and n per tile keeps that short.
    # On TPU, k/n tiles of 128 (gmm masks a ragged last tile; full dims below 128 are allowed).
    tiling = (tm, k, n) if interpret else (tm, min(k, 128), min(n, 128))
    out = gmm(lhs_p, rhs, group_sizes, preferred_element_type=jnp.float32, tiling=tiling,
              interpret=interpret)
    return out[:m].astype(out_dtype)   # rows past sum(group_sizes) are never written by gmm


def grouped_matmul(lhs, rhs, group_sizes, *, strategy: str = "ragged_dot"):
    """out[rows of group g] = lhs[rows of group g] @ rhs[g]; lhs [m, k], rhs [G, k, n] -> [m, n].

    Rows are grouped contiguously in group order; `group_sizes` [G] int32 must sum to m.
    """
    validate_grouped_matmul_args(lhs, rhs, group_sizes)
    out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    if strategy == "megablox":
        return _megablox_gmm(lhs, rhs, group_sizes, out_dtype)
    if strategy == "ragged_dot":
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=_precision(out_dtype),
                                 preferred_element_type=jnp.float32)
        return out.astype(out_dtype)
    raise MoeArgumentError(f"strategy: grouped_matmul supports 'megablox' and 'ragged_dot', got {strategy!r}")


def route(h, gate_params, k: int):
    """Top-k routing: logits = h·Wr + br [N, E]; weights = softmax over the selected k only.

    Returns (weights [N, k] float32, experts [N, k] int32).
    """
    logits = jnp.einsum("nh,he->ne", h, gate_params["kernel"], precision=_precision(h.dtype),
                        preferred_element_type=jnp.float32) + gate_params["bias"].astype(jnp.float32)
    top, experts = jax.lax.top_k(logits, k)
    return jax.nn.softmax(top, axis=-1), experts.astype(jnp.int32)


def swiglu(g, u, cfg):
    """gpt-oss clamped SwiGLU: g = min(g, limit), u = clip(u, ±limit), g·σ(α·g)·(u + 1)."""
    g = jnp.minimum(g, cfg.swiglu_limit)
    u = jnp.clip(u, -cfg.swiglu_limit, cfg.swiglu_limit)
    return g * jax.nn.sigmoid(cfg.swiglu_alpha * g) * (u + 1)


def _sorted_experts(h, p, weights, experts, cfg, strategy):
    """Dropless grouped path: sort the N·k (token, expert) pairs by expert, grouped matmuls, unsort."""
    N, k = experts.shape
    flat = experts.reshape(-1)                                   # [N*k]
    order = jnp.argsort(flat, stable=True)                       # sorted slot -> (token, k) slot
    group_sizes = jnp.bincount(flat, length=cfg.E).astype(jnp.int32)   # [E], zeros allowed
    xs = h[order // k]                                           # [N*k, H], rows grouped by expert
    es = flat[order]                                             # [N*k] expert of each row
    g = grouped_matmul(xs, p["wi_0"], group_sizes, strategy=strategy) + p["wi_0_bias"][es]   # [N*k, I]
    u = grouped_matmul(xs, p["wi_1"], group_sizes, strategy=strategy) + p["wi_1_bias"][es]
    y = grouped_matmul(swiglu(g, u, cfg), p["wo"], group_sizes, strategy=strategy) + p["wo_bias"][es]  # [N*k, H]
    y = y[jnp.argsort(order)].reshape(N, k, cfg.H)               # back to (token, k) order
    return jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), weights)


def _dense_experts(h, p, weights, experts, cfg):
    """Every expert on every token; non-selected experts get combine weight 0."""
    N = h.shape[0]
    prec = _precision(h.dtype)
    combine = jnp.zeros((N, cfg.E), jnp.float32).at[jnp.arange(N)[:, None], experts].set(weights)  # [N, E]
    g = jnp.einsum("nh,ehi->nei", h, p["wi_0"], precision=prec) + p["wi_0_bias"]   # [N, E, I]
    u = jnp.einsum("nh,ehi->nei", h, p["wi_1"], precision=prec) + p["wi_1_bias"]
    y = jnp.einsum("nei,eih->neh", swiglu(g, u, cfg), p["wo"], precision=prec) + p["wo_bias"]  # [N, E, H]
    return jnp.einsum("neh,ne->nh", y.astype(jnp.float32), combine)


def moe(h, layer_mlp_params: Mapping[str, Any], cfg, *, strategy: str = "ragged_dot",
        capacity_factor: float = -1.0):
    """The gpt-oss MoE block on `h` [..., H] (computed in h.dtype, combined in fp32) -> [..., H].

    `capacity_factor` exists for parity with MaxText; only -1 (dropless) is supported.
    """
    if capacity_factor != -1:
        raise MoeArgumentError(f"capacity_factor={capacity_factor!r}: token dropping is not supported; "
                               "use capacity_factor=-1")
    if strategy not in STRATEGIES:
        raise MoeArgumentError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    validate_moe_inputs(h, layer_mlp_params, cfg)
    dtype = h.dtype
    p = jax.tree.map(lambda a: a.astype(dtype), dict(layer_mlp_params))
    x = h.reshape(-1, cfg.H)                                     # [N, H]
    weights, experts = route(x, p["gate"], cfg.num_experts_per_tok)
    if strategy == "dense":
        out = _dense_experts(x, p, weights, experts, cfg)
    else:
        out = _sorted_experts(x, p, weights, experts, cfg, strategy)
    return out.astype(dtype).reshape(h.shape)

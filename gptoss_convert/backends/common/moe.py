"""The routed-expert MoE dispatch every family shares: three dropless strategies over a family's
router and expert activation.

`dispatch(x, p, weights, experts, num_experts, activation, strategy=...)` with strategy one of
- "megablox":   Pallas grouped matmul (`jax.experimental.pallas.ops.tpu.megablox.gmm`); native on
                TPU, Pallas interpret mode elsewhere (correct but slow; a warning is logged once).
- "ragged_dot": `jax.lax.ragged_dot` over tokens sorted by expert (CPU/GPU/TPU).
- "dense":      every expert on every token, combined with routing weights that are zero for
                experts a token did not select (a simple reference; O(E) compute).
All are dropless: a token always reaches its k experts. `p` holds one layer's expert leaves
`wi_0`, `wi_1` [E, H, I], `wo` [E, I, H] and, where the family has them, `wi_0_bias`,
`wi_1_bias` [E, I] and `wo_bias` [E, H].
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_convert.backends.common.layers import precision
from gptoss_convert.errors import ConvertError

log = logging.getLogger(__name__)

STRATEGIES = ("megablox", "ragged_dot", "dense")
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_interpret_warned = False


class MoeArgumentError(ConvertError, ValueError):
    """An argument of the MoE block or of a grouped matmul is unusable; the message names it."""


def validate_moe_inputs(h, layer_mlp_params: Mapping[str, Any], cfg, leaves: Mapping[str, Any], prefix: str) -> None:
    """Check `h` and one layer's MoE params (the `prefix` subtree: the `leaves` under it) against
    `cfg`; every problem in one error."""
    problems = []
    if h.ndim < 1 or h.shape[-1] != cfg.H:
        problems.append(f"h: expected last dimension H={cfg.H}, got shape {tuple(h.shape)}")
    if jnp.dtype(h.dtype) not in _FLOATS:
        problems.append(f"h: expected float32 or bfloat16, got {jnp.dtype(h.dtype)}")
    for rel, leaf in leaves.items():
        if not rel.startswith(prefix):
            continue
        shape, parts = leaf.shape(cfg), rel.removeprefix(prefix).split("/")
        node: Any = layer_mlp_params
        for part in parts:
            node = node.get(part) if isinstance(node, Mapping) else None
        name = "layer_mlp_params[" + "][".join(repr(p) for p in parts) + "]"
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
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=precision(out_dtype),
                                 preferred_element_type=jnp.float32)
        return out.astype(out_dtype)
    raise MoeArgumentError(f"strategy: grouped_matmul supports 'megablox' and 'ragged_dot', got {strategy!r}")


def _biased(y, p, name: str, index=None):
    """y + p[name] (gathered at `index`) when the family has that bias, else y unchanged."""
    if name not in p:
        return y
    return y + (p[name] if index is None else p[name][index])


def _sorted_experts(h, p, weights, experts, num_experts, activation, strategy):
    """Dropless grouped path: sort the N·k (token, expert) pairs by expert, grouped matmuls, unsort."""
    N, k = experts.shape
    flat = experts.reshape(-1)                                   # [N*k]
    order = jnp.argsort(flat, stable=True)                       # sorted slot -> (token, k) slot
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)   # [E], zeros allowed
    xs = h[order // k]                                           # [N*k, H], rows grouped by expert
    es = flat[order]                                             # [N*k] expert of each row

    def mm(x, w):
        return grouped_matmul(x, w, group_sizes, strategy=strategy)

    g = _biased(mm(xs, p["wi_0"]), p, "wi_0_bias", es)          # [N*k, I]
    u = _biased(mm(xs, p["wi_1"]), p, "wi_1_bias", es)
    y = _biased(mm(activation(g, u), p["wo"]), p, "wo_bias", es)   # [N*k, H]
    y = y[jnp.argsort(order)].reshape(N, k, h.shape[-1])         # back to (token, k) order
    return jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), weights)


def _dense_experts(h, p, weights, experts, num_experts, activation):
    """Every expert on every token; non-selected experts get combine weight 0."""
    N, prec = h.shape[0], precision(h.dtype)
    combine = jnp.zeros((N, num_experts), jnp.float32).at[jnp.arange(N)[:, None], experts].set(weights)  # [N, E]
    g = _biased(jnp.einsum("nh,ehi->nei", h, p["wi_0"], precision=prec), p, "wi_0_bias")   # [N, E, I]
    u = _biased(jnp.einsum("nh,ehi->nei", h, p["wi_1"], precision=prec), p, "wi_1_bias")
    y = _biased(jnp.einsum("nei,eih->neh", activation(g, u), p["wo"], precision=prec), p, "wo_bias")  # [N, E, H]
    return jnp.einsum("neh,ne->nh", y.astype(jnp.float32), combine)


def check_strategy(strategy: str, capacity_factor: float = -1.0) -> None:
    """Refuse an unknown strategy, and token dropping (only dropless, capacity_factor -1, exists)."""
    if capacity_factor != -1:
        raise MoeArgumentError(f"capacity_factor={capacity_factor!r}: token dropping is not supported; "
                               "use capacity_factor=-1")
    if strategy not in STRATEGIES:
        raise MoeArgumentError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")


def dispatch(x, p: Mapping[str, Any], weights, experts, num_experts: int,
             activation: Callable[[Any, Any], Any], strategy: str):
    """The routed experts on rows x [N, H] (routing weights/experts [N, k] from the family's
    router; `activation(g, u)` its gated activation) -> fp32 [N, H], combined by `weights`."""
    if strategy == "dense":
        return _dense_experts(x, p, weights, experts, num_experts, activation)
    return _sorted_experts(x, p, weights, experts, num_experts, activation, strategy)

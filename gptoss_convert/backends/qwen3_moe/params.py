"""The MaxText qwen3-30b-a3b / qwen3-235b-a22b parameter tree: the single source of truth for shapes.

Leaf names are those of MaxText's `Qwen3MoeDecoderLayer` (src/MaxText/layers/qwen3.py:
`pre_self_attention_layer_norm`, `self_attention` with `query_norm`/`key_norm`,
`post_self_attention_layer_norm`, `moe_block`) and of its checkpoint converter
(utils/ckpt_conversion/strategies/qwen.py). Every layer is alike, so the scanned layout is one stack
`decoder/layers/` (period 1) at MaxText's param_scan_axis 1. Paths are relative to `params/params/`.
"""

from __future__ import annotations

from typing import Any

from gptoss_convert.backends.qwen3_moe.config import Qwen3MoeConfig
from gptoss_convert.mapping.layout import Layout
from gptoss_convert.mapping.leaves import Leaf, tree_shapes
from gptoss_convert.tree import unflatten

# Per-layer leaves, keyed by path inside a layer (unscanned shapes). Mesh axes as gpt-oss's:
# "expert" on experts, "tensor" on heads / expert width I / vocab, "fsdp" on the hidden size H.
LAYER_LEAVES: dict[str, Leaf] = {
    "pre_self_attention_layer_norm/scale": Leaf(("H",), (None,)),
    "post_self_attention_layer_norm/scale": Leaf(("H",), (None,)),
    "self_attention/query/kernel": Leaf(("H", "Nq", "D"), ("fsdp", "tensor", None)),
    "self_attention/key/kernel": Leaf(("H", "Nkv", "D"), ("fsdp", "tensor", None)),
    "self_attention/value/kernel": Leaf(("H", "Nkv", "D"), ("fsdp", "tensor", None)),
    "self_attention/out/kernel": Leaf(("Nq", "D", "H"), ("tensor", None, "fsdp")),
    "self_attention/query_norm/scale": Leaf(("D",), (None,)),               # RMSNorm over each head
    "self_attention/key_norm/scale": Leaf(("D",), (None,)),
    "moe_block/gate/kernel": Leaf(("H", "E"), ("fsdp", None)),              # the router, no bias
    "moe_block/wi_0": Leaf(("E", "H", "I"), ("expert", "fsdp", "tensor")),  # gate_proj of each expert
    "moe_block/wi_1": Leaf(("E", "H", "I"), ("expert", "fsdp", "tensor")),  # up_proj
    "moe_block/wo": Leaf(("E", "I", "H"), ("expert", "tensor", "fsdp")),    # down_proj
}
GLOBAL_LEAVES: dict[str, Leaf] = {
    "token_embedder/embedding": Leaf(("V", "H"), ("tensor", "fsdp")),
    "decoder/decoder_norm/scale": Leaf(("H",), (None,)),
    "decoder/logits_dense/kernel": Leaf(("H", "V"), ("fsdp", "tensor")),    # untied LM head
}
EXPERT_LEAVES = tuple(rel for rel, leaf in LAYER_LEAVES.items() if leaf.expert)


def layout_for(cfg: Qwen3MoeConfig, scanned: bool) -> Layout:
    """All layers alike: scanning stacks them all at `decoder/layers/` (period 1)."""
    return Layout(scanned=scanned, num_layers=cfg.L, period=1)


def flat_shapes(cfg: Qwen3MoeConfig, scanned: bool) -> dict[str, tuple[int, ...]]:
    """Every leaf of the tree as {'a/b/c': shape}, in a stable order."""
    return tree_shapes(cfg, GLOBAL_LEAVES, LAYER_LEAVES, layout_for(cfg, scanned))


def abstract_params(cfg: Qwen3MoeConfig, scanned: bool, dtype: Any = "bfloat16") -> dict[str, Any]:
    """The parameter tree as nested dicts of `jax.ShapeDtypeStruct` (nothing allocated)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    return unflatten({p: jax.ShapeDtypeStruct(s, dt) for p, s in flat_shapes(cfg, scanned).items()})

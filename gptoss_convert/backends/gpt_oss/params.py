"""The MaxText gpt-oss parameter tree (docs/maxtext.md §1): the single source of truth for shapes.

Used by the forward, random init, conversion targets, Orbax restore targets, the sharding, the
expert list of a streamed forward and shape tests.
Paths are relative to `params/params/` in a MaxText checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gptoss_convert.backends.gpt_oss.config import GptOssConfig
from gptoss_convert.mapping.layout import Layout
from gptoss_convert.mapping.leaves import Leaf, tree_shapes
from gptoss_convert.tree import flatten, unflatten  # noqa: F401  (re-exported)

# Per-layer leaves, keyed by path inside `layers_{i}` (unscanned shapes). Mesh axes: "expert" on
# experts, "tensor" on heads / expert width I / vocab, "fsdp" on the hidden size H.
LAYER_LEAVES: dict[str, Leaf] = {
    "pre_self_attention_layer_norm/scale": Leaf(("H",), (None,)),
    "post_self_attention_layer_norm/scale": Leaf(("H",), (None,)),
    "GptOssAttention/query/kernel": Leaf(("H", "Nq", "D"), ("fsdp", "tensor", None)),
    "GptOssAttention/query/bias": Leaf(("Nq", "D"), ("tensor", None)),
    "GptOssAttention/key/kernel": Leaf(("H", "Nkv", "D"), ("fsdp", "tensor", None)),
    "GptOssAttention/key/bias": Leaf(("Nkv", "D"), ("tensor", None)),
    "GptOssAttention/value/kernel": Leaf(("H", "Nkv", "D"), ("fsdp", "tensor", None)),
    "GptOssAttention/value/bias": Leaf(("Nkv", "D"), ("tensor", None)),
    "GptOssAttention/out/kernel": Leaf(("Nq", "D", "H"), ("tensor", None, "fsdp")),
    "GptOssAttention/out/bias": Leaf(("H",), (None,)),
    "GptOssAttention/sinks": Leaf(("Nq",), ("tensor",)),                    # one per query head
    "GptOssMlp/gate/kernel": Leaf(("H", "E"), ("fsdp", None)),             # the router
    "GptOssMlp/gate/bias": Leaf(("E",), (None,)),
    "GptOssMlp/wi_0": Leaf(("E", "H", "I"), ("expert", "fsdp", "tensor")),
    "GptOssMlp/wi_1": Leaf(("E", "H", "I"), ("expert", "fsdp", "tensor")),
    "GptOssMlp/wi_0_bias": Leaf(("E", "I"), ("expert", "tensor")),
    "GptOssMlp/wi_1_bias": Leaf(("E", "I"), ("expert", "tensor")),
    "GptOssMlp/wo": Leaf(("E", "I", "H"), ("expert", "tensor", "fsdp")),
    "GptOssMlp/wo_bias": Leaf(("E", "H"), ("expert", None)),
}
GLOBAL_LEAVES: dict[str, Leaf] = {
    "token_embedder/embedding": Leaf(("V", "H"), ("tensor", "fsdp")),
    "decoder/decoder_norm/scale": Leaf(("H",), (None,)),
    "decoder/logits_dense/kernel": Leaf(("H", "V"), ("fsdp", "tensor")),    # untied LM head
}
EXPERT_LEAVES = tuple(rel for rel, leaf in LAYER_LEAVES.items() if leaf.expert)


def layer_shapes(cfg: GptOssConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer leaves (unscanned shapes), keyed by path inside `layers_{i}`."""
    return {rel: leaf.shape(cfg) for rel, leaf in LAYER_LEAVES.items()}


def global_shapes(cfg: GptOssConfig) -> dict[str, tuple[int, ...]]:
    return {path: leaf.shape(cfg) for path, leaf in GLOBAL_LEAVES.items()}


def layout_for(cfg: GptOssConfig, scanned: bool) -> Layout:
    """gpt-oss alternates (sliding, full): scanning groups layers by that period of 2."""
    return Layout(scanned=scanned, num_layers=cfg.L, period=2)


def flat_shapes(cfg: GptOssConfig, scanned: bool) -> dict[str, tuple[int, ...]]:
    """Every leaf of the tree as {'a/b/c': shape}, in a stable order."""
    return tree_shapes(cfg, GLOBAL_LEAVES, LAYER_LEAVES, layout_for(cfg, scanned))


def abstract_params(cfg: GptOssConfig, scanned: bool, dtype: Any = "bfloat16") -> dict[str, Any]:
    """The parameter tree as nested dicts of `jax.ShapeDtypeStruct` (nothing allocated)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    return unflatten({p: jax.ShapeDtypeStruct(s, dt) for p, s in flat_shapes(cfg, scanned).items()})


def random_params(cfg: GptOssConfig, scanned: bool, seed: int = 0, dtype: Any = np.float32,
                  std: float = 0.02) -> dict[str, Any]:
    """A random parameter tree of the right shapes (benchmarks, examples): norm scales near 1,
    everything else N(0, std), except the embedding at N(0, 1) so activations have unit scale."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in flat_shapes(cfg, scanned).items():
        if path.endswith("norm/scale"):
            a = 1.0 + 0.05 * rng.standard_normal(shape, np.float32)
        else:
            a = (1.0 if path == "token_embedder/embedding" else std) * rng.standard_normal(shape, np.float32)
        flat[path] = a.astype(dtype)
    return unflatten(flat)

"""The MaxText gpt-oss parameter tree (docs/maxtext.md §1): the single source of truth for shapes.

Used by the forward, random init, conversion targets, Orbax restore targets and shape tests.
Paths are relative to `params/params/` in a MaxText checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gptoss_convert.backends.gpt_oss.config import GptOssConfig
from gptoss_convert.backends.layout import Layout
from gptoss_convert.tree import flatten, unflatten  # noqa: F401  (re-exported)


def layer_shapes(cfg: GptOssConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer leaves (unscanned shapes), keyed by path inside `layers_{i}`."""
    H, I, E, Nq, Nkv, D = cfg.H, cfg.I, cfg.E, cfg.Nq, cfg.Nkv, cfg.D
    return {
        "pre_self_attention_layer_norm/scale": (H,),
        "post_self_attention_layer_norm/scale": (H,),
        "GptOssAttention/query/kernel": (H, Nq, D),
        "GptOssAttention/query/bias": (Nq, D),
        "GptOssAttention/key/kernel": (H, Nkv, D),
        "GptOssAttention/key/bias": (Nkv, D),
        "GptOssAttention/value/kernel": (H, Nkv, D),
        "GptOssAttention/value/bias": (Nkv, D),
        "GptOssAttention/out/kernel": (Nq, D, H),
        "GptOssAttention/out/bias": (H,),
        "GptOssAttention/sinks": (Nq,),
        "GptOssMlp/gate/kernel": (H, E),
        "GptOssMlp/gate/bias": (E,),
        "GptOssMlp/wi_0": (E, H, I),
        "GptOssMlp/wi_1": (E, H, I),
        "GptOssMlp/wi_0_bias": (E, I),
        "GptOssMlp/wi_1_bias": (E, I),
        "GptOssMlp/wo": (E, I, H),
        "GptOssMlp/wo_bias": (E, H),
    }


def global_shapes(cfg: GptOssConfig) -> dict[str, tuple[int, ...]]:
    return {
        "token_embedder/embedding": (cfg.V, cfg.H),
        "decoder/decoder_norm/scale": (cfg.H,),
        "decoder/logits_dense/kernel": (cfg.H, cfg.V),
    }


def layout_for(cfg: GptOssConfig, scanned: bool) -> Layout:
    """gpt-oss alternates (sliding, full): scanning groups layers by that period of 2."""
    return Layout(scanned=scanned, num_layers=cfg.L, period=2)


def flat_shapes(cfg: GptOssConfig, scanned: bool) -> dict[str, tuple[int, ...]]:
    """Every leaf of the tree as {'a/b/c': shape}, in a stable order."""
    layout = layout_for(cfg, scanned)
    out = dict(global_shapes(cfg))
    layers = range(layout.period) if scanned else range(cfg.L)
    for i in layers:
        for rel, shape in layer_shapes(cfg).items():
            p = layout.place(i, rel, shape)
            out[p.path] = p.shape
    return dict(sorted(out.items()))


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

"""Model families, registered by their HF `model_type`."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any, Callable

from gptoss_convert.errors import InputError


@dataclasses.dataclass(frozen=True)
class Backend:
    """Everything the converters, verify (in memory and streamed), generate and the CLI need
    from a model family, so that none of them imports a family's modules."""

    model_type: str
    config_type: type                                # what config_from_dict returns
    config_from_dict: Callable[..., Any]             # HF config.json -> typed config (the family's function)
    layout_for: Callable[[Any, bool], Any]           # (cfg, scanned) -> mapping.layout.Layout
    flat_shapes: Callable[[Any, bool], dict]         # (cfg, scanned) -> {leaf path: shape}: the parameter tree
    layer_leaves: Mapping[str, Any]                  # path inside layers_{i} -> mapping.leaves.Leaf
    global_leaves: Mapping[str, Any]                 # path of each leaf outside the layers -> Leaf
    rules: Callable[[Any], list]                     # cfg -> mapping table (mapping.rules.Rule)
    forward: Callable[..., Any]                      # (params, tokens, cfg, *, moe, attention_mask) -> logits
    streamed_logits: Callable[..., Any]              # (reader, cfg, tokens, mask, *, vocab_block) -> [logits]
    generate: Callable[..., Any]                     # (params, cfg, prompt_ids, **options) -> (ids, stats)

    @property
    def expert_leaves(self) -> tuple[str, ...]:
        """Per-layer leaves with one slice per routed expert on axis 0."""
        return tuple(rel for rel, leaf in self.layer_leaves.items() if leaf.expert)

    def abstract_params(self, cfg: Any, scanned: bool, dtype: Any = "bfloat16") -> dict[str, Any]:
        """The parameter tree as nested dicts of `jax.ShapeDtypeStruct` (nothing allocated): the
        target of a (sharded) Orbax restore."""
        import jax
        import jax.numpy as jnp

        from gptoss_convert.tree import unflatten
        dt = jnp.dtype(dtype)
        return unflatten({p: jax.ShapeDtypeStruct(s, dt) for p, s in self.flat_shapes(cfg, scanned).items()})

    def partition_spec(self, path: str, shape: tuple[int, ...], mesh: Any) -> Any:
        """PartitionSpec of the leaf at `path` (either layout) on `mesh`, from the leaf tables'
        mesh axes (backends/common/sharding.py: an axis the mesh lacks or that does not divide
        the dimension is replicated)."""
        from gptoss_convert.backends.common import sharding
        return sharding.partition_spec(path, shape, mesh, self.global_leaves, self.layer_leaves)

    def param_shardings(self, tree: dict[str, Any], mesh: Any) -> dict[str, Any]:
        """Same-structure tree of NamedSharding for a parameter tree (arrays or ShapeDtypeStructs):
        pass it to io.orbax_reader.load_params(sharding=...) to restore each device's slice."""
        from gptoss_convert.backends.common import sharding
        return sharding.param_shardings(tree, mesh, self.global_leaves, self.layer_leaves)


def lazy(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, imported at the first call: a backend's JAX code is not loaded by commands
    (dequantize, to-orbax) that only need its tables."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{module}.{name}, imported on first use."
    return call


# model_type -> module exposing BACKEND. One line per family.
_BACKENDS = {
    "gpt_oss": "gptoss_convert.backends.gpt_oss",
    "qwen3_moe": "gptoss_convert.backends.qwen3_moe",
}


# model_types of published relatives that cannot be converted, and why (one line each).
_REFUSED = {
    "gpt_oss_puzzle": ("nvidia/gpt-oss-puzzle-88B's layers differ from one another (per-layer block_configs: 64 or 128 "
                       "experts, attention windows 128/8192/full, FP8 KV-cache scales), so they cannot be stacked into "
                       "one scanned MaxText layer; serve it with vLLM or transformers, or convert "
                       "openai/gpt-oss-20b/120b "
                       "(or their gpt-oss-safeguard variants) instead"),
}


def known_model_types() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(model_type: str) -> Backend:
    """The backend for `model_type`; unknown types fail at once and list the known ones, known
    relatives that cannot be converted say why and what would work."""
    if model_type in _REFUSED:
        raise InputError(f"model_type {model_type!r} is not supported: {_REFUSED[model_type]}")
    if model_type not in _BACKENDS:
        raise InputError(f"model_type {model_type!r} is not supported; known model types: "
                         f"{', '.join(known_model_types())} (gpt-oss and its variants, Qwen3-MoE in BF16 or FP8)")
    return importlib.import_module(_BACKENDS[model_type]).BACKEND


def backend_for(cfg: Any) -> Backend:
    """The backend whose config type `cfg` is (for callers handed a config, not a config.json)."""
    for model_type in known_model_types():
        backend = get_backend(model_type)
        if isinstance(cfg, backend.config_type):
            return backend
    raise InputError(f"{type(cfg).__name__} is the config of no registered model family; "
                     f"known model types: {', '.join(known_model_types())}")

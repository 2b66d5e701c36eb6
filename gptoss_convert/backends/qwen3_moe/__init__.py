"""The Qwen3-MoE family (Qwen/Qwen3-30B-A3B, Qwen3-235B-A22B; BF16 releases)."""

from gptoss_convert.backends import Backend, lazy
from gptoss_convert.backends.qwen3_moe import config, mapping, params

_PKG = "gptoss_convert.backends.qwen3_moe"


BACKEND = Backend(
    model_type="qwen3_moe",
    config_type=config.Qwen3MoeConfig,
    config_from_dict=config.config_from_dict,
    layout_for=params.layout_for,
    flat_shapes=params.flat_shapes,
    layer_leaves=params.LAYER_LEAVES,
    global_leaves=params.GLOBAL_LEAVES,
    rules=mapping.rules,
    forward=lazy(f"{_PKG}.model", "forward"),
    streamed_logits=lazy(f"{_PKG}.streamed", "streamed_logits"),
    generate=lazy(f"{_PKG}.generate", "generate_with_stats"),
)

"""The gpt-oss family (openai/gpt-oss-20b, -120b)."""

from gptoss_convert.backends import Backend, lazy
from gptoss_convert.backends.gpt_oss import config, mapping, params

_PKG = "gptoss_convert.backends.gpt_oss"

BACKEND = Backend(
    model_type="gpt_oss",
    config_type=config.GptOssConfig,
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

"""The gpt-oss family (openai/gpt-oss-20b, -120b)."""

from gptoss_convert.backends import Backend
from gptoss_convert.backends.gpt_oss import config, mapping, params

BACKEND = Backend(
    model_type="gpt_oss",
    config_from_dict=config.config_from_dict,
    flat_shapes=params.flat_shapes,
    layout_for=params.layout_for,
    rules=mapping.rules,
)

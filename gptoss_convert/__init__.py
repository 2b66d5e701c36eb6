"""gptoss-convert: gpt-oss checkpoints (MXFP4 safetensors) to HF BF16 and MaxText Orbax, verified.

Every CLI command is a function here; imports are lazy so `import gptoss_convert` is cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "dequantize": "gptoss_convert.converters.dequantize",
    "to_orbax": "gptoss_convert.converters.to_orbax",
    "to_hf": "gptoss_convert.converters.to_hf",
    "merge_lora": "gptoss_convert.converters.merge_lora",
    "check": "gptoss_convert.converters.check",
    "golden": "gptoss_convert.verify.golden",
    "verify_checkpoint": "gptoss_convert.verify.verify:verify",   # `verify` is the subpackage
    "generate_from_checkpoint": "gptoss_convert.generate",
    "demo": "gptoss_convert.demo",
}


def __getattr__(name: str):
    if name in _API:
        import importlib
        module, _, attr = _API[name].partition(":")
        return getattr(importlib.import_module(module), attr or name)
    raise AttributeError(f"module 'gptoss_convert' has no attribute {name!r}")


__all__ = ["__version__", *_API]

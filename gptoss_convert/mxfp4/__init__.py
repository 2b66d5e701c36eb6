"""MXFP4 (OCP microscaling FP4, E2M1 values + E8M0 scale per 32) codec, pure numpy."""

__all__ = ["FP4_VALUES", "dequantize", "dequantize_transposed", "quantize"]


def __getattr__(name: str):
    """The codec's functions, imported on first use (mxfp4.rules needs no numpy: the CLI reads it)."""
    if name in __all__:
        from gptoss_convert.mxfp4 import codec
        return getattr(codec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

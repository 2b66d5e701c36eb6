"""MXFP4 (OCP microscaling FP4, E2M1 values + E8M0 scale per 32) codec, pure numpy."""

from gptoss_convert.mxfp4.codec import FP4_VALUES, dequantize, dequantize_transposed, quantize

__all__ = ["FP4_VALUES", "dequantize", "dequantize_transposed", "quantize"]

"""Block-scaled FP8 (E4M3 + a float scale per [b0, b1] block) codec, pure numpy, knows no model names."""

from gptoss_convert.fp8.codec import E4M3, check_scales, dequantize, grid_shape, layout_problem, quantize

__all__ = ["E4M3", "check_scales", "dequantize", "grid_shape", "layout_problem", "quantize"]

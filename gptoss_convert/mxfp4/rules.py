"""The MXFP4 scale rules by name: how each quantizer picks a group's shared exponent and rounds
its elements (pure Python, so the CLI can list them without loading numpy)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ScaleRule:
    """How one MXFP4 quantizer picks a group's shared exponent and rounds its elements.

    scale: "floor" (OCP MX: floor(log2 amax) - 2), "round-up" (triton_kernels: ceil(log2(amax /
    6)), nothing saturates) or "threshold" (compressed-tensors: floor(log2 amax) - 2, plus one
    when amax's mantissa is >= 1.75, i.e. amax rounded to a power of two at 0.75 of the way up).
    ties_up: an element exactly between two E2M1 values rounds up (else to the even code).
    zero_byte: the scale byte an all-zero group gets.
    """

    scale: str
    ties_up: bool
    zero_byte: int


RULES = {
    "triton": ScaleRule("round-up", ties_up=True, zero_byte=0),
    "triton-rtne": ScaleRule("round-up", ties_up=False, zero_byte=0),
    "ocp": ScaleRule("floor", ties_up=False, zero_byte=127),
    # compressed-tensors 0.20.1 (vllm-project/compressed-tensors, what llm-compressor's MXFP4 scheme
    # writes): quantization/utils/mxfp_utils.py generate_mx_scales + round_to_power_2 for the scale,
    # quant_args.py round_to_quantized_type_args (clamp to +-6) + utils/fp4_utils.py cast_to_fp4
    # (nearest, ties to the even code) for the elements; the byte is clamped to [0, 255], so an
    # all-zero (or too small) group gets byte 0.
    "compressed-tensors": ScaleRule("threshold", ties_up=False, zero_byte=0),
}
SCALE_RULES = tuple(RULES)

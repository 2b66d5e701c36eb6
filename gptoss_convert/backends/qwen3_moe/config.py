"""Qwen3-MoE config.json -> Qwen3MoeConfig: math fields checked, inert ones accepted (the gpt-oss policy)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gptoss_convert.backends import policy
from gptoss_convert.backends.policy import COMMON_INERT
from gptoss_convert.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig:
    """The model hyper-parameters the converter and the JAX forward use."""

    vocab_size: int
    hidden_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_experts: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    # config.json fields accepted as inert without being known (warned about, recorded); not model math.
    unknown_fields: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    # Short names used by the leaf table and shape comments: H, I, E, k, Nq, Nkv, D, L, V.
    @property
    def H(self) -> int: return self.hidden_size
    @property
    def I(self) -> int: return self.moe_intermediate_size  # noqa: E743
    @property
    def E(self) -> int: return self.num_experts
    @property
    def L(self) -> int: return self.num_hidden_layers
    @property
    def V(self) -> int: return self.vocab_size
    @property
    def Nq(self) -> int: return self.num_attention_heads
    @property
    def Nkv(self) -> int: return self.num_key_value_heads
    @property
    def D(self) -> int: return self.head_dim

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json fields (transformers-4 spelling, as the published repos) describing this model."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unknown_fields"}
        d.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], rope_scaling=None, **_FIXED)
        return d


# The policy (as gpt-oss's): fields that define the math are read through the table below, type-
# and range-checked; a value the mapping or forward does not implement is refused (_FIXED, rope
# type, quantization). Known inert fields are accepted silently, unknown ones with one warning
# (recorded in conversion.json), and `strict=True` refuses unknown ones.
# name -> (type, required, upper bound); bounds keep a typo from allocating terabytes.
_FIELDS: dict[str, tuple[type, bool, int]] = {
    "vocab_size": (int, True, 1 << 22), "hidden_size": (int, True, 1 << 16),
    "moe_intermediate_size": (int, True, 1 << 17), "num_hidden_layers": (int, True, 1024),
    "num_experts": (int, True, 4096), "num_attention_heads": (int, True, 1024),
    "num_key_value_heads": (int, True, 1024), "head_dim": (int, False, 4096),
    "num_experts_per_tok": (int, False, 4096), "max_position_embeddings": (int, False, 1 << 31),
    "norm_topk_prob": (bool, False, 1), "rms_norm_eps": (float, False, 1), "rope_theta": (float, False, 1 << 40),
}
# Only these values are implemented: every layer an MoE layer with SiLU experts, no attention
# bias, no sliding window, an untied LM head.
_FIXED = {"tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu", "decoder_sparse_step": 1,
          "mlp_only_layers": [], "use_sliding_window": False}
_MATH = set(_FIELDS) | set(_FIXED) | {"model_type", "num_local_experts", "rope_scaling", "rope_parameters",
                                      "quantization_config"}
# Accepted and ignored: bookkeeping, training-only, generation-only or HF-runtime fields, and the
# fields that only matter for what _FIXED refuses (intermediate_size sizes the dense MLP of
# mlp_only_layers; sliding_window and max_window_layers apply only with use_sliding_window).
_INERT = COMMON_INERT | {"intermediate_size", "sliding_window", "max_window_layers"}
# One quantity, two spellings (transformers 4 and 5): both may be present, but must agree.
_SYNONYMS = [("num_experts", "num_local_experts"), ("torch_dtype", "dtype")]


def _value(key: str, value: Any, typ: type, bound: int, problems: list[str]):
    """`value` as `typ` if it is one and in range, else None with the problem recorded."""
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= bound
    else:   # positive finite float: a negative eps or theta would silently change the math
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and 0 < value <= bound)
    if not ok:
        want = {bool: "true or false", int: f"an integer in 1..{bound}", float: f"a positive number up to {bound}"}[typ]
        problems.append(f"{key} must be {want}, got {value!r}")
        return None
    return typ(value)


def _rope_theta(raw: dict, problems: list[str]) -> Any:
    """rope_theta from the transformers-4 spelling (`rope_theta`, `rope_scaling` null) or the
    transformers-5 one (`rope_parameters`); only the default (unscaled) rope is implemented."""
    params, scaling = raw.get("rope_parameters") or {}, raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        problems.append("rope_parameters/rope_scaling must be objects or null")
        return None
    for where, d in (("rope_scaling", scaling), ("rope_parameters", params)):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default" or set(d) - {"rope_type", "type", "rope_theta"}:
            problems.append(f"{where}={d!r} is not supported (only the default rope, no scaling, is implemented)")
    thetas = {k: v for k, v in (("rope_theta", raw.get("rope_theta")),
                                ("rope_parameters.rope_theta", params.get("rope_theta"))) if v is not None}
    if len(set(thetas.values())) > 1:
        problems.append(f"{' and '.join(f'{k}={v!r}' for k, v in thetas.items())} disagree; "
                        "remove one spelling or make them equal")
    return next(iter(thetas.values()), None)


def unknown_fields(raw: dict) -> list[str]:
    """Top-level fields of `raw` that this tool neither reads nor knows to be inert."""
    return policy.unknown_fields(raw, _MATH | _INERT)


# Quantized sources read: Qwen's block-scaled FP8 twins (Qwen3-30B-A3B-FP8, ...), dequantized on
# read by io/hf_checkpoint.py, which also checks weight_block_size, fmt and activation_scheme.
_QUANT_METHODS = ("fp8",)
_FP8_KEYS = {"quant_method", "fmt", "weight_block_size", "activation_scheme", "modules_to_not_convert"}


def _quantization(q: Any, strict: bool, problems: list[str]) -> None:
    """Only block-scaled FP8 is read; under `strict`, a key of its config this tool does not know
    is refused (it might change what the weights mean)."""
    method = q.get("quant_method") if isinstance(q, dict) else q
    if method not in _QUANT_METHODS:
        problems.append(f"quantization_config.quant_method={method!r} is not supported (supported: "
                        f"{', '.join(_QUANT_METHODS)}; or convert the BF16 release)")
    elif strict and (extra := sorted(set(q) - _FP8_KEYS)):
        problems.append(f"unknown quantization_config fields {extra} (--strict-config refuses them)")


def _policy(raw: dict, strict: bool, problems: list[str]) -> None:
    """The shared checks (backends/policy.py), and quantization: only FP8 is read."""
    policy.check_policy(raw, model_type="qwen3_moe", family="Qwen3-MoE", fixed=_FIXED, synonyms=_SYNONYMS,
                        known=_MATH | _INERT, strict=strict, problems=problems)
    if raw.get("quantization_config") is not None:
        _quantization(raw["quantization_config"], strict, problems)


def config_from_dict(raw: dict, source: str = "config.json", *, strict: bool = False) -> Qwen3MoeConfig:
    """Translate an HF Qwen3-MoE config dict; every problem found is reported in one ConfigError.

    Unknown fields are accepted (listed in the result's `unknown_fields`) unless `strict`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    problems: list[str] = []
    _policy(raw, strict, problems)
    raw = dict(raw, num_experts=raw.get("num_experts", raw.get("num_local_experts")),
               rope_theta=_rope_theta(raw, problems))
    kw: dict[str, Any] = {}
    for k, (typ, required, bound) in _FIELDS.items():
        if raw.get(k) is not None:
            kw[k] = _value(k, raw[k], typ, bound, problems)
        elif required:
            problems.append(f"missing required field {k}" + (" (or num_local_experts)" if k == "num_experts" else ""))
    if not problems:
        kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
        _check_shapes(kw, problems)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return Qwen3MoeConfig(unknown_fields=tuple(unknown_fields(raw)), **kw)


def _check_shapes(kw: dict, problems: list[str]) -> None:
    if kw["num_attention_heads"] % kw["num_key_value_heads"]:
        problems.append("num_attention_heads must be a multiple of num_key_value_heads")
    if not 1 <= kw.get("num_experts_per_tok", 8) <= kw["num_experts"]:
        problems.append("num_experts_per_tok must be between 1 and num_experts")
    if kw["head_dim"] % 2:
        problems.append("head_dim must be even (RoPE rotates halves)")

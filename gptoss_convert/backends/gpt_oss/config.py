"""gpt-oss config.json -> GptOssConfig: math fields checked, inert ones accepted (docs/formats.md §2)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gptoss_convert.backends import policy
from gptoss_convert.backends.policy import COMMON_INERT
from gptoss_convert.errors import ConfigError

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters. `truncate=False` means low/high are NOT rounded (gpt-oss)."""

    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    """The model hyper-parameters the converter and the JAX forward use."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_local_experts: int
    num_experts_per_tok: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: RopeScaling = RopeScaling()
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    max_position_embeddings: int = 131072
    # config.json fields accepted as inert without being known (warned about, recorded); not model math.
    unknown_fields: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    # Short names used in shape comments: H, I, E, k, Nq, Nkv, D, L, V.
    @property
    def H(self) -> int: return self.hidden_size
    @property
    def I(self) -> int: return self.intermediate_size  # noqa: E743
    @property
    def E(self) -> int: return self.num_local_experts
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

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json fields (transformers-5 spelling) describing this model."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("rope_theta", "rope_scaling", "layer_types", "unknown_fields")}
        d["layer_types"] = list(self.layer_types)
        d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": self.rope_theta,
                                **dataclasses.asdict(self.rope_scaling)}
        d.update(model_type="gpt_oss", architectures=["GptOssForCausalLM"], attention_bias=True,
                 tie_word_embeddings=False, hidden_act="silu", experts_per_token=self.num_experts_per_tok)
        return d


# The config policy. Fields that define the math are read (_REQUIRED, _OPTIONAL, the rope fields,
# layer_types), type- and range-checked, and a value the mapping or forward does not implement is
# refused (_FIXED, rope type, layer types, quantization). Every other field is accepted: the known
# inert ones silently, unknown ones with one warning (and recorded in conversion.json), because
# published configs and their derivatives carry extras (`initial_context_length` in gpt-oss's
# own; re-saving tools add flags). `strict=True` refuses unknown fields instead.
_REQUIRED = {
    "vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
    "num_local_experts": int, "num_attention_heads": int, "num_key_value_heads": int,
}
_OPTIONAL = {
    "num_experts_per_tok": int, "head_dim": int, "sliding_window": int, "rms_norm_eps": float,
    "swiglu_limit": float, "swiglu_alpha": float, "max_position_embeddings": int,
}
# Fields whose only supported value is fixed; anything else would change the math.
_FIXED = {"tie_word_embeddings": False, "attention_bias": True, "hidden_act": "silu"}
_MATH = set(_REQUIRED) | set(_OPTIONAL) | set(_FIXED) | {
    "model_type", "layer_types", "rope_theta", "rope_scaling", "rope_parameters", "experts_per_token",
    "quantization_config"}
# Accepted and ignored beyond the fields every family ignores: OpenAI's own context length.
_INERT = COMMON_INERT | {"initial_context_length"}
# One quantity, two spellings (transformers 4.55 and 5): both may be present, but must agree.
_SYNONYMS = [("num_experts_per_tok", "experts_per_token"), ("torch_dtype", "dtype")]
_QUANT_METHODS = ("mxfp4",)
# Sizes beyond these are refused before anything is allocated (gpt-oss-120b is far below).
_MAX = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 17,
        "num_hidden_layers": 1024, "num_local_experts": 4096, "num_attention_heads": 1024,
        "num_key_value_heads": 1024, "head_dim": 4096, "num_experts_per_tok": 4096}


# Floats that only make sense positive (a negative eps or clamp limit would silently change the math).
_POSITIVE = {"rms_norm_eps", "swiglu_limit", "swiglu_alpha", "rope_theta", "factor", "beta_fast", "beta_slow"}


def _typed(key: str, value: Any, typ: type, problems: list[str]):
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{key} must be an integer, got {value!r}")
        return None
    if typ is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        problems.append(f"{key} must be a finite number, got {value!r}")
        return None
    if typ is float and key in _POSITIVE and not value > 0:
        problems.append(f"{key} must be positive, got {value!r}")
        return None
    if typ is int and not 1 <= value <= _MAX.get(key, 1 << 31):
        problems.append(f"{key}={value} is out of the supported range 1..{_MAX.get(key, 1 << 31)}")
        return None
    return typ(value)


_ROPE_KNOWN = {f.name for f in dataclasses.fields(RopeScaling)}
_ROPE_INERT = {"rope_type", "type", "rope_theta"}


def _rope_dicts(raw: dict, problems: list[str]) -> dict | None:
    """`rope_scaling` + top-level `rope_theta` (transformers 4) and `rope_parameters`
    (transformers 5) merged into one dict; a key the two spellings give different values is a problem."""
    params, scaling = raw.get("rope_parameters") or {}, raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        problems.append("rope_parameters/rope_scaling must be objects")
        return None
    old = {k: (f"rope_scaling.{k}", v) for k, v in scaling.items()}
    if raw.get("rope_theta") is not None:
        old["rope_theta"] = ("rope_theta", raw["rope_theta"])
    for k in sorted(set(params) & set(old)):
        if params[k] != old[k][1]:
            problems.append(f"{old[k][0]}={old[k][1]!r} and rope_parameters.{k}={params[k]!r} disagree; "
                            "remove one spelling or make them equal")
    return {**{k: v for k, (_, v) in old.items()}, **params}


def _rope(raw: dict, problems: list[str]) -> tuple[float, RopeScaling]:
    """YaRN parameters. A missing `truncate` means True, as transformers reads it; gpt-oss's own
    config says false explicitly. Unknown rope keys are refused: each one changes the rotation."""
    merged = _rope_dicts(raw, problems)
    if merged is None:
        return 150000.0, RopeScaling()
    rope_type = merged.get("rope_type", merged.get("type", "yarn"))
    if rope_type != "yarn":
        problems.append(f"rope type {rope_type!r} is not supported (gpt-oss uses 'yarn')")
    unknown = sorted(set(merged) - _ROPE_KNOWN - _ROPE_INERT)
    if unknown:
        problems.append(f"unsupported rope parameters {unknown} (supported: {sorted(_ROPE_KNOWN)})")
    truncate = merged.get("truncate", True)
    if not isinstance(truncate, bool):
        problems.append(f"rope parameter truncate must be true or false, got {truncate!r}")
    kw = {"truncate": truncate is not False}
    for k in ("factor", "beta_fast", "beta_slow"):
        if k in merged:
            kw[k] = _typed(k, merged[k], float, problems)
    if "original_max_position_embeddings" in merged:
        kw["original_max_position_embeddings"] = _typed("original_max_position_embeddings",
                                                        merged["original_max_position_embeddings"], int, problems)
    theta = _typed("rope_theta", merged.get("rope_theta", 150000.0), float, problems)
    if None in kw.values() or theta is None:
        return 150000.0, RopeScaling()
    return theta, RopeScaling(**kw)


def unknown_fields(raw: dict) -> list[str]:
    """Top-level fields of `raw` that this tool neither reads nor knows to be inert."""
    return policy.unknown_fields(raw, _MATH | _INERT)


def _policy(raw: dict, strict: bool, problems: list[str]) -> None:
    """The shared checks (backends/policy.py), and quantization: only MXFP4 is read."""
    policy.check_policy(raw, model_type="gpt_oss", family="gpt-oss", fixed=_FIXED, synonyms=_SYNONYMS,
                        known=_MATH | _INERT, strict=strict, problems=problems)
    q = raw.get("quantization_config")
    method = q.get("quant_method") if isinstance(q, dict) else q
    if q is not None and method not in _QUANT_METHODS:
        problems.append(f"quantization_config.quant_method={method!r} is not supported "
                        f"(supported: {', '.join(_QUANT_METHODS)})")


def config_from_dict(raw: dict, source: str = "config.json", *, strict: bool = False) -> GptOssConfig:
    """Translate an HF config dict; every problem found is reported in one ConfigError.

    Unknown fields are accepted (listed in the result's `unknown_fields`) unless `strict`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    problems: list[str] = []
    _policy(raw, strict, problems)
    kw: dict[str, Any] = {}
    for k, typ in _REQUIRED.items():
        if k not in raw:
            problems.append(f"missing required field {k}")
        else:
            kw[k] = _typed(k, raw[k], typ, problems)
    for k, typ in _OPTIONAL.items():
        if raw.get(k) is not None:
            kw[k] = _typed(k, raw[k], typ, problems)
    if "num_experts_per_tok" not in kw and raw.get("experts_per_token") is not None:
        kw["num_experts_per_tok"] = _typed("experts_per_token", raw["experts_per_token"], int, problems)
    kw["rope_theta"], kw["rope_scaling"] = _rope(raw, problems)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    kw.setdefault("num_experts_per_tok", 4)
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    L = kw["num_hidden_layers"]
    layer_types = raw.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(L)]
    _check_shapes(kw, layer_types, problems)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return GptOssConfig(layer_types=tuple(layer_types), unknown_fields=tuple(unknown_fields(raw)), **kw)


def _check_layer_types(layer_types, L: int, problems: list[str]) -> None:
    if not isinstance(layer_types, list) or len(layer_types) != L:
        problems.append(f"layer_types must list {L} entries")
        return
    bad = [(i, t) for i, t in enumerate(layer_types) if t not in (SLIDING, FULL)]
    if bad:
        i, t = bad[0]
        problems.append(f"layer_types[{i}]={t!r} is not a supported layer type (supported: {SLIDING}, {FULL})")
    elif any(t != (SLIDING if i % 2 == 0 else FULL) for i, t in enumerate(layer_types)):
        problems.append("layer_types must alternate sliding_attention, full_attention starting with sliding "
                        "(as gpt-oss does)")


def _check_shapes(kw: dict, layer_types, problems: list[str]) -> None:
    _check_layer_types(layer_types, kw["num_hidden_layers"], problems)
    if kw["num_attention_heads"] % kw["num_key_value_heads"]:
        problems.append("num_attention_heads must be a multiple of num_key_value_heads")
    if not 1 <= kw["num_experts_per_tok"] <= kw["num_local_experts"]:
        problems.append("num_experts_per_tok must be between 1 and num_local_experts")
    if kw["head_dim"] % 2:
        problems.append("head_dim must be even (RoPE rotates halves)")

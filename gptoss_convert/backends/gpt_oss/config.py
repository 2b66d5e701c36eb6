"""gpt-oss config.json -> GptOssConfig, through an explicit allowlist (docs/formats.md §2)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

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
             if f.name not in ("rope_theta", "rope_scaling", "layer_types")}
        d["layer_types"] = list(self.layer_types)
        d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": self.rope_theta,
                                **dataclasses.asdict(self.rope_scaling)}
        d.update(model_type="gpt_oss", architectures=["GptOssForCausalLM"], attention_bias=True,
                 tie_word_embeddings=False, hidden_act="silu", experts_per_token=self.num_experts_per_tok)
        return d


# Keys we read into GptOssConfig (value type), or accept because they do not change the math.
_REQUIRED = {
    "vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
    "num_local_experts": int, "num_attention_heads": int, "num_key_value_heads": int,
}
_OPTIONAL = {
    "num_experts_per_tok": int, "head_dim": int, "sliding_window": int, "rms_norm_eps": float,
    "swiglu_limit": float, "swiglu_alpha": float, "max_position_embeddings": int,
}
# Accepted and ignored: bookkeeping, training-only or generation-only fields.
_IGNORED = {
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "router_aux_loss_coef",
    "output_router_logits", "attention_dropout", "quantization_config", "rope_theta", "rope_scaling",
    "rope_parameters", "layer_types", "experts_per_token", "output_hidden_states", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "_name_or_path", "auto_map", "tie_word_embeddings", "attention_bias", "hidden_act",
}
# Fields whose only supported value is fixed; anything else would change the math.
_FIXED = {"tie_word_embeddings": False, "attention_bias": True, "hidden_act": "silu"}
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


def _rope(raw: dict, problems: list[str]) -> tuple[float, RopeScaling]:
    """YaRN parameters from `rope_scaling` + `rope_theta` (transformers 4) or `rope_parameters`
    (transformers 5). A missing `truncate` means True, as transformers reads it; gpt-oss's own
    config says false explicitly."""
    params, scaling = raw.get("rope_parameters") or {}, raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        problems.append("rope_parameters/rope_scaling must be objects")
        return 150000.0, RopeScaling()
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "yarn"))
    if rope_type != "yarn":
        problems.append(f"rope type {rope_type!r} is not supported (gpt-oss uses 'yarn')")
    unknown = sorted(set(merged) - _ROPE_KNOWN - _ROPE_INERT)
    if unknown:
        problems.append(f"unsupported rope parameters {unknown}")
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
    theta = _typed("rope_theta", merged.get("rope_theta", raw.get("rope_theta", 150000.0)), float, problems)
    if None in kw.values() or theta is None:
        return 150000.0, RopeScaling()
    return theta, RopeScaling(**kw)


def config_from_dict(raw: dict, source: str = "config.json") -> GptOssConfig:
    """Translate an HF config dict; every problem found is reported in one ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    problems: list[str] = []
    if raw.get("model_type") != "gpt_oss":
        problems.append(f"model_type is {raw.get('model_type')!r}, expected 'gpt_oss'")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL) - _IGNORED)
    if unknown:
        problems.append(f"unknown fields {unknown} (this tool refuses fields it does not understand; remove them if they are inert)")
    for k, v in _FIXED.items():
        if k in raw and raw[k] != v:
            problems.append(f"{k}={raw[k]!r} is not supported (gpt-oss has {v!r})")
    kw: dict[str, Any] = {}
    for k, typ in _REQUIRED.items():
        if k not in raw:
            problems.append(f"missing required field {k}")
        else:
            kw[k] = _typed(k, raw[k], typ, problems)
    for k, typ in _OPTIONAL.items():
        if raw.get(k) is not None:
            kw[k] = _typed(k, raw[k], typ, problems)
    if "num_experts_per_tok" not in raw and raw.get("experts_per_token") is not None:
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
    return GptOssConfig(layer_types=tuple(layer_types), **kw)


def _check_shapes(kw: dict, layer_types, problems: list[str]) -> None:
    if not isinstance(layer_types, list) or len(layer_types) != kw["num_hidden_layers"]:
        problems.append(f"layer_types must list {kw['num_hidden_layers']} entries")
    elif any(t != (SLIDING if i % 2 == 0 else FULL) for i, t in enumerate(layer_types)):
        problems.append("layer_types must alternate sliding_attention, full_attention starting with sliding (as gpt-oss does)")
    if kw["num_attention_heads"] % kw["num_key_value_heads"]:
        problems.append("num_attention_heads must be a multiple of num_key_value_heads")
    if not 1 <= kw["num_experts_per_tok"] <= kw["num_local_experts"]:
        problems.append("num_experts_per_tok must be between 1 and num_local_experts")
    if kw["head_dim"] % 2:
        problems.append("head_dim must be even (RoPE rotates halves)")


def load_config(model_dir: str | Path) -> GptOssConfig:
    """Read and translate `<model_dir>/config.json`."""
    from gptoss_convert.io.files import read_json_object
    path = Path(model_dir) / "config.json"
    return config_from_dict(read_json_object(path, "a gpt-oss checkpoint directory must contain config.json"), str(path))

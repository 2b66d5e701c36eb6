"""The config policy every model family follows (docs/formats.md §2): the fields that define the
math are read and checked by the family; a value it does not implement is refused naming field
and value; known inert fields are accepted silently; unknown fields are accepted and named (the
converters warn and record them) unless `strict`; two spellings of one quantity must agree."""

from __future__ import annotations

# Bookkeeping, training-only, generation-only and runtime fields that transformers writes for any
# model: they never change the math.
COMMON_INERT = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "use_cache", "router_aux_loss_coef", "output_router_logits",
    "attention_dropout", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path", "auto_map",
    "tokenizer_class", "torchscript", "use_return_dict",
})


def unknown_fields(raw: dict, known: set[str] | frozenset[str]) -> list[str]:
    """Top-level fields of `raw` that are not in `known` (read, fixed or inert), sorted."""
    return sorted(set(raw) - set(known))


def check_policy(raw: dict, *, model_type: str, family: str, fixed: dict, synonyms: list[tuple[str, str]],
                 known: set[str] | frozenset[str], strict: bool, problems: list[str]) -> None:
    """The family-independent checks: model type, fixed-value fields, agreeing spellings, and
    (when `strict`) unknown fields; each problem found is appended to `problems`."""
    if raw.get("model_type") != model_type:
        problems.append(f"model_type is {raw.get('model_type')!r}, expected {model_type!r}")
    problems += [f"{k}={raw[k]!r} is not supported ({family} has {v!r})" for k, v in fixed.items()
                 if k in raw and raw[k] != v]
    for a, b in synonyms:
        if raw.get(a) is not None and raw.get(b) is not None and raw[a] != raw[b]:
            problems.append(f"{a}={raw[a]!r} and {b}={raw[b]!r} disagree; remove one spelling or make them equal")
    if strict and (unknown := unknown_fields(raw, known)):
        problems.append(f"unknown fields {unknown} (--strict-config refuses fields this tool does not know; "
                        "drop the option to accept them as inert)")


def parse_config(raw, source: str = "config.json", *, strict: bool = False):
    """(backend, typed config) of a config.json's parsed content under this policy, whatever it
    holds: every refusal is a ConfigError naming `source`, including values of a type the
    family's allowlist did not foresee (never a bare TypeError / ValueError / OverflowError)."""
    from gptoss_convert.backends import get_backend, known_model_types
    from gptoss_convert.errors import ConfigError

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must hold a JSON object")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in known_model_types():
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; known model types: "
                          f"{', '.join(known_model_types())}")
    backend = get_backend(model_type)
    try:
        return backend, backend.config_from_dict(raw, source, strict=strict)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise ConfigError(f"{source}: a value has the wrong type or is out of range ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]})") from None

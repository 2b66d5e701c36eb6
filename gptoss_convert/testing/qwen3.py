"""The published Qwen3-MoE on-disk layout (BF16, one tensor per expert) at any config's shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gptoss_convert.testing.published import DATA


def published_qwen3(name: str = "Qwen3-30B-A3B") -> dict:
    """A fresh copy of the `config.json` Qwen/<name> publishes (package data, verbatim)."""
    return json.loads((DATA / f"{name}.config.json").read_text())


def qwen3_specs(raw: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, "BF16")} of every tensor of the published per-expert layout, layer by layer."""
    H, I, E, V = raw["hidden_size"], raw["moe_intermediate_size"], raw["num_experts"], raw["vocab_size"]
    Nq, Nkv, D = raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (Nq * D, H), p + "self_attn.k_proj.weight": (Nkv * D, H),
                   p + "self_attn.v_proj.weight": (Nkv * D, H), p + "self_attn.o_proj.weight": (H, Nq * D),
                   p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
                   p + "mlp.gate.weight": (E, H)}
        for j in range(E):
            x = f"{p}mlp.experts.{j}."
            shapes |= {x + "gate_proj.weight": (I, H), x + "up_proj.weight": (I, H), x + "down_proj.weight": (H, I)}
    shapes |= {"model.norm.weight": (H,), "lm_head.weight": (V, H)}
    return {n: (s, "BF16") for n, s in shapes.items()}


def write_sparse_qwen3(out: str | Path, raw: dict, *, shards: int) -> int:
    """Every tensor of the published layout at `raw`'s shapes as sparse shards (real headers,
    holes for data): a plan and dry run at full size without the bytes. Returns the data bytes."""
    from gptoss_convert.testing.tiny import write_sparse_shards
    specs = qwen3_specs(raw)
    write_sparse_shards(out, specs, raw, shards=shards)
    return sum(2 * math.prod(shape) for shape, _ in specs.values())


"""The published Qwen3-MoE on-disk layout (BF16, one tensor per expert) at any config's shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_convert import fp8
from gptoss_convert.io.hf_checkpoint import SIDECAR_FILES, HFCheckpoint
from gptoss_convert.testing.published import DATA


def published_qwen3(name: str = "Qwen3-30B-A3B") -> dict:
    """A fresh copy of the `config.json` Qwen/<name> publishes (package data, verbatim)."""
    return json.loads((DATA / f"{name}.config.json").read_text())


def qwen3_specs(raw: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, "BF16")} of every tensor of the published per-expert layout, layer by layer."""
    H, F, E, V = raw["hidden_size"], raw["moe_intermediate_size"], raw["num_experts"], raw["vocab_size"]
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
            shapes |= {x + "gate_proj.weight": (F, H), x + "up_proj.weight": (F, H), x + "down_proj.weight": (H, F)}
    shapes |= {"model.norm.weight": (H,), "lm_head.weight": (V, H)}
    return {n: (s, "BF16") for n, s in shapes.items()}


def write_sparse_qwen3(out: str | Path, raw: dict, *, shards: int) -> int:
    """Every tensor of the published layout at `raw`'s shapes as sparse shards (real headers,
    holes for data): a plan and dry run at full size without the bytes. Returns the data bytes."""
    from gptoss_convert.testing.tiny import write_sparse_shards
    specs = qwen3_specs(raw)
    write_sparse_shards(out, specs, raw, shards=shards)
    return sum(2 * math.prod(shape) for shape, _ in specs.values())



# The linear weights Qwen's FP8 twins (Qwen3-30B-A3B-FP8, ...) store as F8_E4M3 with a
# `weight_scale_inv` grid; embeddings, norms, the router (`mlp.gate`) and lm_head stay BF16.
FP8_LINEARS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def fp8_quantization_config(block: tuple[int, int] = (128, 128)) -> dict:
    """quantization_config as Qwen's FP8 repos publish it (with the given block size)."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def write_fp8_qwen3(bf16_dir: str | Path, out: str | Path, *, block: tuple[int, int] = (128, 128),
                    scale_dtype: str = "F32", shards: int = 2) -> Path:
    """An FP8 twin of the BF16 Qwen3-MoE checkpoint `bf16_dir` in the published FP8 layout: every
    attention and expert projection quantized to F8_E4M3 with one `weight_scale_inv` per `block`
    (amax / 448), the other tensors as they are, config.json with Qwen's quantization_config, the
    tokenizer files copied. Returns `out`."""
    from gptoss_convert.testing.tiny import _write_shards
    src, out = HFCheckpoint(bf16_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np_scale = {"F32": np.float32, "BF16": ml_dtypes.bfloat16}[scale_dtype]
    tensors = {}
    for name in src.tensors:
        w = src.read(name)
        if name.endswith(FP8_LINEARS):
            tensors[name], tensors[name + "_scale_inv"] = fp8.quantize(w.astype(np.float32), block, np_scale)
        else:
            tensors[name] = w
    _write_shards(out, tensors, shards)
    conf = dict(src.config_raw, quantization_config=fp8_quantization_config(block))
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    for f in SIDECAR_FILES:
        if (Path(bf16_dir) / f).is_file():
            (out / f).write_bytes((Path(bf16_dir) / f).read_bytes())
    return out

"""Generate small random gpt-oss checkpoints in the published layout (MXFP4 or BF16).

Every dimension is distinct so a transposed matrix cannot hide behind a square shape. Expert
weights are drawn as random MXFP4 codes, so the BF16 form of a checkpoint is exactly the
dequantized MXFP4 form and both must convert to identical outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_convert import mxfp4
from gptoss_convert.backends.gpt_oss.config import FULL, SLIDING, GptOssConfig, config_from_dict
from gptoss_convert.io.safetensors import save_file

BF16 = ml_dtypes.bfloat16
# H 64, I 96, E 5, k 3, Nq 4, D 8, Nkv 2, L 6, window 5, V 300 (docs/maxtext.md §3 orientation trap).
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
            num_local_experts=5, num_experts_per_tok=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, sliding_window=5)
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


# gpt-oss's own YaRN parameters, spelled out: a config without `truncate` reads as truncate=True
# (as transformers reads it), which is not gpt-oss's (unrounded) correction range.
GPT_OSS_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "original_max_position_embeddings": 4096, "truncate": False}


def tiny_config(**overrides) -> GptOssConfig:
    kw = {**TINY, "rope_parameters": dict(GPT_OSS_ROPE), **overrides}
    L = kw["num_hidden_layers"]
    kw.setdefault("layer_types", [SLIDING if i % 2 == 0 else FULL for i in range(L)])
    return config_from_dict({"model_type": "gpt_oss", **kw}, "tiny config")


def _mxfp4_codes(rng, shape_out_in: tuple[int, ...], scale_lo: int, scale_hi: int):
    *lead, out, inp = shape_out_in
    blocks = rng.integers(0, 256, (*lead, out, inp // 32, 16), dtype=np.uint8)
    scales = rng.integers(scale_lo, scale_hi + 1, (*lead, out, inp // 32), dtype=np.uint8)
    return blocks, scales


def hf_tensors(cfg: GptOssConfig, seed: int = 0, *, expert_scale=(119, 122)) -> dict[str, np.ndarray]:
    """Random tensors in the published layout: dense ones BF16, expert matrices as MXFP4 pairs."""
    rng = np.random.default_rng(seed)
    H, I, E, V, Nq, Nkv, D = cfg.H, cfg.I, cfg.E, cfg.V, cfg.Nq, cfg.Nkv, cfg.D

    def normal(*shape, std=0.05, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(np.float32).astype(BF16)

    t = {"model.embed_tokens.weight": normal(V, H, std=1.0), "model.norm.weight": normal(H, mean=1.0, std=0.1),
         "lm_head.weight": normal(V, H, std=0.1)}
    for i in range(cfg.L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": normal(H, mean=1.0, std=0.1),
              p + "post_attention_layernorm.weight": normal(H, mean=1.0, std=0.1),
              p + "self_attn.q_proj.weight": normal(Nq * D, H, std=0.15), p + "self_attn.q_proj.bias": normal(Nq * D),
              p + "self_attn.k_proj.weight": normal(Nkv * D, H, std=0.15), p + "self_attn.k_proj.bias": normal(Nkv * D),
              p + "self_attn.v_proj.weight": normal(Nkv * D, H, std=0.15), p + "self_attn.v_proj.bias": normal(Nkv * D),
              p + "self_attn.o_proj.weight": normal(H, Nq * D, std=0.1), p + "self_attn.o_proj.bias": normal(H),
              p + "self_attn.sinks": normal(Nq, std=1.0),
              p + "mlp.router.weight": normal(E, H, std=0.3), p + "mlp.router.bias": normal(E, std=0.1),
              p + "mlp.experts.gate_up_proj_bias": normal(E, 2 * I), p + "mlp.experts.down_proj_bias": normal(E, H)}
        gu_b, gu_s = _mxfp4_codes(rng, (E, 2 * I, H), *expert_scale)     # stored [E, out=2I, in=H]
        dn_b, dn_s = _mxfp4_codes(rng, (E, H, I), *expert_scale)         # stored [E, out=H, in=I]
        t |= {p + "mlp.experts.gate_up_proj_blocks": gu_b, p + "mlp.experts.gate_up_proj_scales": gu_s,
              p + "mlp.experts.down_proj_blocks": dn_b, p + "mlp.experts.down_proj_scales": dn_s}
    return t


def dequantized(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BF16 form of `hf_tensors` output: pairs replaced by X [E, in, out] (HF orientation)."""
    out = {}
    for name, arr in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name[:-len("_blocks")]
            deq = mxfp4.dequantize(arr, tensors[base + "_scales"], BF16, name=base)
            out[base] = np.ascontiguousarray(np.swapaxes(deq, -1, -2))
        else:
            out[name] = arr
    return out


def _write_shards(out: Path, tensors: dict[str, np.ndarray], shards: int) -> None:
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, out / "model.safetensors", {"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
        save_file(part, out / fname, {"format": "pt"})
        weight_map |= {n: fname for n in part}
        total += sum(a.nbytes for a in part.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_checkpoint(out_dir: str | Path, cfg: GptOssConfig | None = None, *, fmt: str = "mxfp4",
                     seed: int = 0, shards: int = 2, tokenizer: bool = True) -> Path:
    """Write a random gpt-oss checkpoint directory in the published layout; returns its path."""
    cfg = cfg or tiny_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(cfg, seed)
    conf = cfg.to_hf_dict() | {"eos_token_id": 2, "pad_token_id": 0, "bos_token_id": 1}
    if fmt == "mxfp4":
        conf["quantization_config"] = MXFP4_CONFIG
    elif fmt == "bf16":
        tensors = dequantized(tensors)
        conf["dtype"] = "bfloat16"
    else:
        raise ValueError(f"fmt: expected 'mxfp4' or 'bf16', got {fmt!r}")
    _write_shards(out, tensors, shards)
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0, "bos_token_id": 1}))
    if tokenizer:
        from gptoss_convert.testing.tokenizer import write_tokenizer
        write_tokenizer(out, cfg.V)
    return out

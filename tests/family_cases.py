"""Each registered model family as a test case: a tiny checkpoint in its published on-disk format,
HF transformers' model class for it (the oracle), an independent re-derivation of the MaxText
tree from the HF tensors, and its published config with a real-shape sparse-shard writer.

tests/test_families.py runs the same oracles on every case; adding a family means adding one
`FamilyCase` here (tests/test_families.py fails while a registered model type has none)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from gptoss_convert.testing import tiny_config, write_checkpoint
from gptoss_convert.testing.published import published_config
from gptoss_convert.testing.qwen3 import published_qwen3, write_sparse_qwen3
from gptoss_convert.testing.tiny import write_sparse_checkpoint
from hf_reference import hf_to_maxtext

# V 300, H 24, I 10, E 7, k 2, Nq 6, Nkv 3, D 8, L 4: all distinct (Nq*D = 48 != H, so a missed
# transpose of q/o cannot hide). Few layers and experts: megablox runs in interpret mode on CPU.
QWEN3_TINY = dict(vocab_size=300, hidden_size=24, moe_intermediate_size=10, intermediate_size=36, num_hidden_layers=4,
                  num_experts=7, num_experts_per_tok=2, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                  norm_topk_prob=True, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)


@dataclasses.dataclass(frozen=True)
class FamilyCase:
    model_type: str
    hf_class: str                                          # transformers' CausalLM class: the oracle
    write_tiny: Callable[[Path], Path]                     # tiny checkpoint in the published format, tokenizer
    expected_leaves: Callable[[dict, object, bool], dict]  # (HF tensors fp32, cfg, scanned) -> {leaf: array}
    published: Callable[[], dict]                          # the published config.json (real shapes)
    write_sparse: Callable[[Path, dict], None]             # real-shape sparse shards of that config


def safetensors_fp32(d: Path) -> dict[str, np.ndarray]:
    """The saved tensors as fp32 numpy, read by the `safetensors` package (not by our reader)."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= {k: v.float().numpy() for k, v in load_file(f).items()}
    return out


def write_tiny_qwen3(d: Path) -> Path:
    """A tiny Qwen3MoeForCausalLM saved by transformers (BF16, per-expert tensors)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from gptoss_convert.testing.tokenizer import write_tokenizer
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**QWEN3_TINY)).eval()
    with torch.no_grad():       # HF inits every norm at 1: make q/k/layer norms count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif "experts" in name or "gate" in name:
                p.normal_(0, 0.3)
    model.to(torch.bfloat16).save_pretrained(d)
    write_tokenizer(d, QWEN3_TINY["vocab_size"])        # golden and verify tokenize prompts
    return d


def qwen3_expected_leaves(sd: dict[str, np.ndarray], cfg, scanned: bool) -> dict[str, np.ndarray]:
    """Independent re-derivation of the MaxText Qwen3 tree from the HF per-expert tensors."""
    H, Nq, Nkv, D, E = cfg.H, cfg.Nq, cfg.Nkv, cfg.D, cfg.E

    def layer(i):
        p = f"model.layers.{i}."
        experts = lambda name: np.stack([sd[f"{p}mlp.experts.{j}.{name}.weight"].T for j in range(E)])  # noqa: E731
        return {
            "pre_self_attention_layer_norm/scale": sd[p + "input_layernorm.weight"],
            "post_self_attention_layer_norm/scale": sd[p + "post_attention_layernorm.weight"],
            "self_attention/query/kernel": sd[p + "self_attn.q_proj.weight"].T.reshape(H, Nq, D),
            "self_attention/key/kernel": sd[p + "self_attn.k_proj.weight"].T.reshape(H, Nkv, D),
            "self_attention/value/kernel": sd[p + "self_attn.v_proj.weight"].T.reshape(H, Nkv, D),
            "self_attention/out/kernel": sd[p + "self_attn.o_proj.weight"].T.reshape(Nq, D, H),
            "self_attention/query_norm/scale": sd[p + "self_attn.q_norm.weight"],
            "self_attention/key_norm/scale": sd[p + "self_attn.k_norm.weight"],
            "moe_block/gate/kernel": sd[p + "mlp.gate.weight"].T,         # [H, E]
            "moe_block/wi_0": experts("gate_proj"),                        # [E, H, I]
            "moe_block/wi_1": experts("up_proj"),
            "moe_block/wo": experts("down_proj"),                          # [E, I, H]
        }

    out = {"token_embedder/embedding": sd["model.embed_tokens.weight"],
           "decoder/decoder_norm/scale": sd["model.norm.weight"],
           "decoder/logits_dense/kernel": sd["lm_head.weight"].T}
    layers = [layer(i) for i in range(cfg.L)]
    for rel in layers[0]:
        if scanned:     # MaxText scans the Qwen3 decoder layer itself: one stack, layers at axis 1
            out[f"decoder/layers/{rel}"] = np.stack([lv[rel] for lv in layers], axis=1)
        else:
            out |= {f"decoder/layers_{i}/{rel}": lv[rel] for i, lv in enumerate(layers)}
    return out


CASES = {
    "gpt_oss": FamilyCase(
        "gpt_oss", "GptOssForCausalLM",
        write_tiny=lambda d: write_checkpoint(d, tiny_config(), fmt="bf16", seed=0),
        expected_leaves=hf_to_maxtext,
        published=lambda: published_config("gpt-oss-20b"),
        write_sparse=lambda d, raw: write_sparse_checkpoint(d, raw, shards=3)),
    "qwen3_moe": FamilyCase(
        "qwen3_moe", "Qwen3MoeForCausalLM",
        write_tiny=write_tiny_qwen3,
        expected_leaves=qwen3_expected_leaves,
        published=published_qwen3,
        write_sparse=lambda d, raw: write_sparse_qwen3(d, raw, shards=16)),
}

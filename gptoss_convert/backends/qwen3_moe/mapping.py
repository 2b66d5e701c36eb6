"""HF Qwen3-MoE tensor names -> MaxText parameter paths: the one table.

Per-layer rules name the HF tensor with `{i}` and the MaxText leaf relative to the layer; the
experts are stored one tensor per expert (`{j}`), each the slice j of the leaf's expert axis, so a
conversion reads and writes them one expert at a time.
"""

from __future__ import annotations

from gptoss_convert.backends.qwen3_moe.config import Qwen3MoeConfig
from gptoss_convert.mapping.rules import Rule
from gptoss_convert.mapping.transforms import SplitAxis, Transpose

T = Transpose((1, 0))


def rules(cfg: Qwen3MoeConfig) -> list[Rule]:
    Nq, Nkv, D, E = cfg.Nq, cfg.Nkv, cfg.D, cfg.E
    L, X = "model.layers.{i}.", "model.layers.{i}.mlp.experts.{j}."
    return [
        Rule("model.embed_tokens.weight", "token_embedder/embedding"),                       # [V, H]
        Rule("model.norm.weight", "decoder/decoder_norm/scale"),
        Rule("lm_head.weight", "decoder/logits_dense/kernel", (T,)),                       # [V, H] -> [H, V]; untied
        Rule(L + "input_layernorm.weight", "pre_self_attention_layer_norm/scale"),
        Rule(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale"),
        # [Nq*D, H] -> [H, Nq*D] -> [H, Nq, D]; no query pre-scaling (the model scales by D^-0.5)
        Rule(L + "self_attn.q_proj.weight", "self_attention/query/kernel", (T, SplitAxis(1, (Nq, D)))),
        Rule(L + "self_attn.k_proj.weight", "self_attention/key/kernel", (T, SplitAxis(1, (Nkv, D)))),
        Rule(L + "self_attn.v_proj.weight", "self_attention/value/kernel", (T, SplitAxis(1, (Nkv, D)))),
        # [H, Nq*D] -> [Nq*D, H] -> [Nq, D, H]
        Rule(L + "self_attn.o_proj.weight", "self_attention/out/kernel", (T, SplitAxis(0, (Nq, D)))),
        Rule(L + "self_attn.q_norm.weight", "self_attention/query_norm/scale"),              # [D], shared by heads
        Rule(L + "self_attn.k_norm.weight", "self_attention/key_norm/scale"),
        Rule(L + "mlp.gate.weight", "moe_block/gate/kernel", (T,)),                          # [E, H] -> [H, E]
        # one tensor per expert j: [I, H] -> [H, I] is slice j of [E, H, I]
        Rule(X + "gate_proj.weight", "moe_block/wi_0", (T,), experts=E),
        Rule(X + "up_proj.weight", "moe_block/wi_1", (T,), experts=E),
        Rule(X + "down_proj.weight", "moe_block/wo", (T,), experts=E),                       # [H, I] -> [I, H]
    ]

"""HF gpt-oss tensor names -> MaxText parameter paths: the one table (docs/maxtext.md §1).

Per-layer rules name the HF tensor with `{i}` and the MaxText leaf relative to `layers_{i}`;
where the leaf lands (scanned or not) is the layout step's business, not the table's.
HF names are those of the BF16 model; an MXFP4 pair `X_blocks`+`X_scales` is read as `X`.
"""

from __future__ import annotations

from gptoss_convert.backends.gpt_oss.config import GptOssConfig
from gptoss_convert.mapping.rules import Rule
from gptoss_convert.mapping.transforms import Deinterleave, SplitAxis, Transpose

T = Transpose((1, 0))


def rules(cfg: GptOssConfig) -> list[Rule]:
    Nq, Nkv, D = cfg.Nq, cfg.Nkv, cfg.D
    L = "model.layers.{i}."
    return [
        Rule("model.embed_tokens.weight", "token_embedder/embedding"),                       # [V, H]
        Rule("model.norm.weight", "decoder/decoder_norm/scale"),
        Rule("lm_head.weight", "decoder/logits_dense/kernel", (T,)),                       # [V, H] -> [H, V]; untied
        Rule(L + "input_layernorm.weight", "pre_self_attention_layer_norm/scale"),
        Rule(L + "post_attention_layernorm.weight", "post_self_attention_layer_norm/scale"),
        # [Nq*D, H] -> [H, Nq*D] -> [H, Nq, D]; no query pre-scaling (the model scales by D^-0.5)
        Rule(L + "self_attn.q_proj.weight", "GptOssAttention/query/kernel", (T, SplitAxis(1, (Nq, D)))),
        Rule(L + "self_attn.q_proj.bias", "GptOssAttention/query/bias", (SplitAxis(0, (Nq, D)),)),
        Rule(L + "self_attn.k_proj.weight", "GptOssAttention/key/kernel", (T, SplitAxis(1, (Nkv, D)))),
        Rule(L + "self_attn.k_proj.bias", "GptOssAttention/key/bias", (SplitAxis(0, (Nkv, D)),)),
        Rule(L + "self_attn.v_proj.weight", "GptOssAttention/value/kernel", (T, SplitAxis(1, (Nkv, D)))),
        Rule(L + "self_attn.v_proj.bias", "GptOssAttention/value/bias", (SplitAxis(0, (Nkv, D)),)),
        # [H, Nq*D] -> [Nq*D, H] -> [Nq, D, H]
        Rule(L + "self_attn.o_proj.weight", "GptOssAttention/out/kernel", (T, SplitAxis(0, (Nq, D)))),
        Rule(L + "self_attn.o_proj.bias", "GptOssAttention/out/bias"),
        Rule(L + "self_attn.sinks", "GptOssAttention/sinks"),                               # [Nq], one per query head
        Rule(L + "mlp.router.weight", "GptOssMlp/gate/kernel", (T,)),                       # [E, H] -> [H, E]
        Rule(L + "mlp.router.bias", "GptOssMlp/gate/bias"),
        # gate and up are INTERLEAVED on the last axis of [E, H, 2I]: gate = 0::2, up = 1::2
        Rule(L + "mlp.experts.gate_up_proj", ("GptOssMlp/wi_0", "GptOssMlp/wi_1"), (Deinterleave(2),),
             rows_per_block=1),
        Rule(L + "mlp.experts.gate_up_proj_bias", ("GptOssMlp/wi_0_bias", "GptOssMlp/wi_1_bias"), (Deinterleave(2),)),
        Rule(L + "mlp.experts.down_proj", "GptOssMlp/wo", rows_per_block=1),                 # [E, I, H] as is
        Rule(L + "mlp.experts.down_proj_bias", "GptOssMlp/wo_bias"),
    ]

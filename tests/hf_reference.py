"""Independent numpy mapping HF BF16 tensors -> MaxText flat param tree, written from docs/maxtext.md §1.

A test oracle: it deliberately shares no code with the converter, so a converter bug cannot hide
behind the same bug here. Every leaf is spelled out with explicit numpy ops.
"""

from __future__ import annotations

import numpy as np


def _layer_leaves(sd: dict[str, np.ndarray], i: int, cfg) -> dict[str, np.ndarray]:
    """One HF layer -> its MaxText leaves (unscanned shapes), keyed by path inside `layers_{i}`."""
    H, Nq, Nkv, D = cfg.H, cfg.Nq, cfg.Nkv, cfg.D
    p = f"model.layers.{i}."
    wq = sd[p + "self_attn.q_proj.weight"]             # [Nq*D, H]
    wk = sd[p + "self_attn.k_proj.weight"]             # [Nkv*D, H]
    wv = sd[p + "self_attn.v_proj.weight"]             # [Nkv*D, H]
    wo = sd[p + "self_attn.o_proj.weight"]             # [H, Nq*D]
    gate_up = sd[p + "mlp.experts.gate_up_proj"]       # [E, H, 2I], gate/up interleaved
    gate_up_b = sd[p + "mlp.experts.gate_up_proj_bias"]  # [E, 2I], interleaved
    return {
        "pre_self_attention_layer_norm/scale": sd[p + "input_layernorm.weight"],
        "post_self_attention_layer_norm/scale": sd[p + "post_attention_layernorm.weight"],
        # kernel[h, n, d] = W[n*D + d, h]
        "GptOssAttention/query/kernel": wq.T.reshape(H, Nq, D),
        "GptOssAttention/query/bias": sd[p + "self_attn.q_proj.bias"].reshape(Nq, D),
        "GptOssAttention/key/kernel": wk.T.reshape(H, Nkv, D),
        "GptOssAttention/key/bias": sd[p + "self_attn.k_proj.bias"].reshape(Nkv, D),
        "GptOssAttention/value/kernel": wv.T.reshape(H, Nkv, D),
        "GptOssAttention/value/bias": sd[p + "self_attn.v_proj.bias"].reshape(Nkv, D),
        # out[n, d, h] = Wo[h, n*D + d]
        "GptOssAttention/out/kernel": wo.T.reshape(Nq, D, H),
        "GptOssAttention/out/bias": sd[p + "self_attn.o_proj.bias"],
        "GptOssAttention/sinks": sd[p + "self_attn.sinks"],
        "GptOssMlp/gate/kernel": sd[p + "mlp.router.weight"].T,   # [H, E]
        "GptOssMlp/gate/bias": sd[p + "mlp.router.bias"],
        "GptOssMlp/wi_0": gate_up[..., 0::2],                       # [E, H, I] even = gate
        "GptOssMlp/wi_1": gate_up[..., 1::2],                       # [E, H, I] odd = up
        "GptOssMlp/wi_0_bias": gate_up_b[..., 0::2],
        "GptOssMlp/wi_1_bias": gate_up_b[..., 1::2],
        "GptOssMlp/wo": sd[p + "mlp.experts.down_proj"],            # [E, I, H], no transpose
        "GptOssMlp/wo_bias": sd[p + "mlp.experts.down_proj_bias"],  # [E, H]
    }


def hf_to_maxtext(state_dict_numpy: dict[str, np.ndarray], cfg, scanned: bool) -> dict[str, np.ndarray]:
    """HF BF16-layout tensors (numpy, any float dtype) -> {MaxText leaf path: array}.

    Scanned: HF layer i goes to `decoder/layers/layers_{i % 2}/…`, stacked at AXIS 1, slot i // 2.
    """
    sd = state_dict_numpy
    out = {
        "token_embedder/embedding": sd["model.embed_tokens.weight"],   # [V, H]
        "decoder/decoder_norm/scale": sd["model.norm.weight"],
        "decoder/logits_dense/kernel": sd["lm_head.weight"].T,         # [H, V]
    }
    layers = [_layer_leaves(sd, i, cfg) for i in range(cfg.L)]
    if not scanned:
        for i, leaves in enumerate(layers):
            out |= {f"decoder/layers_{i}/{k}": v for k, v in leaves.items()}
    else:
        for parity in (0, 1):
            group = layers[parity::2]    # HF layers parity, parity + 2, ... in slot order
            for k in group[0]:
                out[f"decoder/layers/layers_{parity}/{k}"] = np.stack([g[k] for g in group], axis=1)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def torch_state_dict_numpy(model) -> dict[str, np.ndarray]:
    """An HF torch model's parameters as float32 numpy arrays (no buffers such as inv_freq)."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.named_parameters()}

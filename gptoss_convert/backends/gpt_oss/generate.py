"""KV-cache decoding over the MaxText gpt-oss parameter tree: one prefill step, then one-token steps.

The math is model.py's (RoPE, RMSNorm, sinks attention, MoE); this module adds the caches (the
loop, sampler and cache entry are backends/common/decode.py's). Each
layer keeps a cache `KVCache(k, v, pos)` of fixed size S: the sliding layers keep only the
window (S = sliding_window), the full layers keep everything (S = max_len). A step attends over
concat(cache, new keys) with a mask built from the key positions, then keeps the LAST S entries
as the new cache. Batches are LEFT-padded (padding has position -1 and is never attended to), so
every row's newest token sits at the end of the block and the rows decode in lockstep.
Both parameter layouts are accepted; scanned leaves give up layer i's slot i // 2 on axis 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_convert.backends.common.decode import (  # noqa: F401  (re-exported: the family's generate API)
    GenerateArgumentError, GenerateStats, KVCache, decode, empty_caches, extend_cache, left_pad, sample)
from gptoss_convert.backends.common.layers import key_mask
from gptoss_convert.backends.common.layers import layer_params as common_layer_params
from gptoss_convert.backends.gpt_oss import model as M
from gptoss_convert.backends.gpt_oss.config import GptOssConfig
from gptoss_convert.backends.gpt_oss.moe import moe as moe_block
from gptoss_convert.backends.gpt_oss.params import layout_for

Params = dict[str, Any]


def cache_sizes(cfg: GptOssConfig, max_len: int) -> tuple[int, ...]:
    """Entries kept per layer: the window on sliding layers, `max_len` on full-attention layers."""
    return tuple(min(cfg.sliding_window, max_len) if cfg.is_sliding(i) else max_len for i in range(cfg.L))


def init_caches(cfg: GptOssConfig, batch: int, max_len: int, dtype=jnp.float32) -> tuple[KVCache, ...]:
    """Empty caches for every layer; `max_len` = the most tokens (padding included) a row will hold."""
    return empty_caches(cache_sizes(cfg, max_len), batch, cfg.Nkv, cfg.D, dtype)


def layer_params(params: Params, cfg: GptOssConfig, i: int) -> Params:
    """Layer i's subtree with unscanned shapes, from either layout."""
    return common_layer_params(params, layout_for(cfg, True), i)


def cached_attention(attn_params: Params, h, cache: KVCache, cos, sin, q_pos, window: int | None):
    """GptOssAttention of the T new tokens h [B, T, H] over cache + themselves -> ([B, T, H], cache)."""
    q, k, v = M.project_qkv(attn_params, h, cos, sin)
    keys, values, k_pos, cache = extend_cache(cache, k, v, q_pos)
    o = M.sdpa_with_sinks(q, keys.astype(q.dtype), values.astype(q.dtype), attn_params["sinks"],
                          key_mask(q_pos, k_pos, window))
    return M.project_out(attn_params, o), cache


def _layer(p: Params, x, cache: KVCache, cfg: GptOssConfig, sliding: bool, cos, sin, q_pos, moe: str, dtype):
    """model.decoder_layer with the attention reading and refreshing `cache`."""
    p = jax.tree.map(lambda a: a.astype(dtype), p)
    eps = cfg.rms_norm_eps
    h = M.rms_norm(x, p["pre_self_attention_layer_norm"]["scale"], eps)
    a, cache = cached_attention(p["GptOssAttention"], h, cache, cos, sin, q_pos,
                                cfg.sliding_window if sliding else None)
    x = x + a
    h = M.rms_norm(x, p["post_self_attention_layer_norm"]["scale"], eps)
    return x + moe_block(h, p["GptOssMlp"], cfg, strategy=moe), cache


@functools.partial(jax.jit, static_argnames=("cfg", "moe", "dtype"), donate_argnames=("caches",))
def step(params: Params, caches: tuple[KVCache, ...], tokens, positions, cfg: GptOssConfig, *,
         moe: str = "ragged_dot", dtype=jnp.float32):
    """Feed tokens [B, T] at positions [B, T] (−1 = left padding) -> (fp32 logits of each row's
    LAST token [B, V], new caches). Prefill = one step with the whole prompt; decode = T = 1.

    `caches` is donated (its buffers are reused): keep only the returned ones.
    """
    cos, sin = M.rope_tables(jnp.maximum(positions, 0), cfg, dtype)
    x = M.embed(params, tokens, dtype)                                         # [B, T, H]
    new = []
    for i, cache in enumerate(caches):
        x, cache = _layer(layer_params(params, cfg, i), x, cache, cfg, cfg.is_sliding(i), cos, sin,
                          positions, moe, dtype)
        new.append(cache)
    return M.unembed(params, x[:, -1:], cfg)[:, 0], tuple(new)


def generate_with_stats(params: Params, cfg: GptOssConfig, prompt_ids, *, max_new_tokens: int,
                        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, moe: str = "ragged_dot",
                        dtype=jnp.float32, eos_id: int | Sequence[int] | None = None,
                        warmup: bool = False) -> tuple[list[list[int]], GenerateStats]:
    """`generate`, also returning prefill/decode timings. warmup=True first compiles both step
    shapes on throwaway caches, so the timings measure steady-state throughput."""
    return decode(step, init_caches, params, cfg, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_p=top_p, seed=seed, moe=moe, dtype=dtype, eos_id=eos_id, warmup=warmup)


def generate(params: Params, cfg: GptOssConfig, prompt_ids, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, moe: str = "ragged_dot", dtype=jnp.float32,
             eos_id: int | Sequence[int] | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens with a KV cache; returns the new ids.

    prompt_ids: one prompt (list of ids) or a batch (list of lists, any lengths; left-padded
    internally). temperature 0 = greedy; otherwise temperature + top-p sampling with
    jax.random from `seed` (the same seed gives the same tokens). A row stops after emitting an
    id in `eos_id` (that id included). `params`: the MaxText tree, scanned or unscanned.
    """
    ids, _ = generate_with_stats(params, cfg, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, moe=moe, dtype=dtype, eos_id=eos_id)
    return ids

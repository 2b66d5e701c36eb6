"""KV-cache decoding over the MaxText Qwen3-MoE tree: the family's one-token step; the loop,
sampling and padding are the shared ones (`common.decode.decode`), unchanged.

Every layer attends over everything (no sliding window), so each keeps a cache of `max_len`
entries. A step attends over concat(cache, new keys) masked by key position (−1 = empty or left
padding) and keeps the last `max_len` entries.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_convert.backends.common.decode import GenerateStats, KVCache, decode, empty_caches, extend_cache
from gptoss_convert.backends.common.layers import key_mask
from gptoss_convert.backends.common.layers import layer_params as common_layer_params
from gptoss_convert.backends.qwen3_moe import model as M
from gptoss_convert.backends.qwen3_moe.config import Qwen3MoeConfig
from gptoss_convert.backends.qwen3_moe.moe import moe as moe_block
from gptoss_convert.backends.qwen3_moe.params import layout_for

Params = dict[str, Any]


def init_caches(cfg: Qwen3MoeConfig, batch: int, max_len: int, dtype=jnp.float32) -> tuple[KVCache, ...]:
    """Empty caches of `max_len` entries for every layer."""
    return empty_caches([max_len] * cfg.L, batch, cfg.Nkv, cfg.D, dtype)


def layer_params(params: Params, cfg: Qwen3MoeConfig, i: int) -> Params:
    """Layer i's subtree with unscanned shapes, from either layout."""
    return common_layer_params(params, layout_for(cfg, True), i)


def _layer(p: Params, x, cache: KVCache, cfg: Qwen3MoeConfig, cos, sin, q_pos, moe: str, dtype):
    """model.decoder_layer with the attention reading and refreshing `cache`."""
    p = jax.tree.map(lambda a: a.astype(dtype), p)
    h = M.rms_norm(x, p["pre_self_attention_layer_norm"]["scale"], cfg.rms_norm_eps)
    attn = p["self_attention"]
    q, k, v = M.project_qkv(attn, h, cos, sin, cfg.rms_norm_eps)
    keys, values, k_pos, cache = extend_cache(cache, k, v, q_pos)
    o = M.sdpa(q, keys.astype(q.dtype), values.astype(q.dtype), key_mask(q_pos, k_pos, None))
    x = x + jnp.einsum("btnd,ndh->bth", o, attn["out"]["kernel"], precision=M.precision(o.dtype))
    h = M.rms_norm(x, p["post_self_attention_layer_norm"]["scale"], cfg.rms_norm_eps)
    return x + moe_block(h, p["moe_block"], cfg, strategy=moe), cache


@functools.partial(jax.jit, static_argnames=("cfg", "moe", "dtype"), donate_argnames=("caches",))
def step(params: Params, caches: tuple[KVCache, ...], tokens, positions, cfg: Qwen3MoeConfig, *,
         moe: str = "ragged_dot", dtype=jnp.float32):
    """Feed tokens [B, T] at positions [B, T] (−1 = left padding) -> (fp32 logits of each row's
    LAST token [B, V], new caches). `caches` is donated: keep only the returned ones."""
    cos, sin = M.rope_tables(jnp.maximum(positions, 0), cfg, dtype)
    x = M.embed(params, tokens, dtype)                                         # [B, T, H]
    new = []
    for i, cache in enumerate(caches):
        x, cache = _layer(layer_params(params, cfg, i), x, cache, cfg, cos, sin, positions, moe, dtype)
        new.append(cache)
    return M.unembed(params, x[:, -1:], cfg)[:, 0], tuple(new)


def generate_with_stats(params: Params, cfg: Qwen3MoeConfig, prompt_ids, *, max_new_tokens: int,
                        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, moe: str = "ragged_dot",
                        dtype=jnp.float32, eos_id: int | Sequence[int] | None = None,
                        warmup: bool = False) -> tuple[list[list[int]], GenerateStats]:
    """Continue each prompt by up to `max_new_tokens` tokens (temperature 0 = greedy); returns
    (new ids per prompt, timings). Options as gpt-oss's `generate_with_stats`."""
    return decode(step, init_caches, params, cfg, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_p=top_p, seed=seed, moe=moe, dtype=dtype, eos_id=eos_id, warmup=warmup)

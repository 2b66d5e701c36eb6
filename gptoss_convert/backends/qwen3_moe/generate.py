"""KV-cache decoding over the MaxText Qwen3-MoE tree: the family's one-token step; the loop,
sampling and padding are gpt-oss's (`gpt_oss.generate.decode`), unchanged.

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

from gptoss_convert.backends.gpt_oss.generate import GenerateStats, KVCache, decode, key_mask
from gptoss_convert.backends.qwen3_moe import model as M
from gptoss_convert.backends.qwen3_moe.config import Qwen3MoeConfig
from gptoss_convert.backends.qwen3_moe.moe import moe as moe_block
from gptoss_convert.backends.qwen3_moe.params import layout_for

Params = dict[str, Any]


def init_caches(cfg: Qwen3MoeConfig, batch: int, max_len: int, dtype=jnp.float32) -> tuple[KVCache, ...]:
    """Empty caches of `max_len` entries for every layer."""
    def empty():
        shape = (batch, max_len, cfg.Nkv, cfg.D)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, max_len), -1, jnp.int32))
    return tuple(empty() for _ in range(cfg.L))


def layer_params(params: Params, cfg: Qwen3MoeConfig, i: int) -> Params:
    """Layer i's subtree with unscanned shapes, from either layout."""
    if not M.is_scanned(params):
        return params["decoder"][f"layers_{i}"]
    axis = layout_for(cfg, True).axis
    return jax.tree.map(lambda a: jax.lax.index_in_dim(a, i, axis, keepdims=False), params["decoder"]["layers"])


def _layer(p: Params, x, cache: KVCache, cfg: Qwen3MoeConfig, cos, sin, q_pos, moe: str, dtype):
    """model.decoder_layer with the attention reading and refreshing `cache`."""
    p = jax.tree.map(lambda a: a.astype(dtype), p)
    h = M.rms_norm(x, p["pre_self_attention_layer_norm"]["scale"], cfg.rms_norm_eps)
    attn = p["self_attention"]
    q, k, v = M.project_qkv(attn, h, cos, sin, cfg.rms_norm_eps)
    keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)        # [B, S+T, Nkv, D]
    values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
    k_pos = jnp.concatenate([cache.pos, q_pos], axis=1)                        # [B, S+T]
    o = M.sdpa(q, keys.astype(q.dtype), values.astype(q.dtype), key_mask(q_pos, k_pos, None))
    x = x + jnp.einsum("btnd,ndh->bth", o, attn["out"]["kernel"], precision=M.precision(o.dtype))
    S = cache.pos.shape[1]
    h = M.rms_norm(x, p["post_self_attention_layer_norm"]["scale"], cfg.rms_norm_eps)
    return x + moe_block(h, p["moe_block"], cfg, strategy=moe), KVCache(keys[:, -S:], values[:, -S:], k_pos[:, -S:])


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

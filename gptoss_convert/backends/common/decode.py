"""The KV-cache decoding loop every family shares: left-padded prefill, one-token steps, greedy or
temperature + nucleus sampling. A family supplies its one-token `step` and `init_caches`
(backends/<family>/generate.py); the loop, the cache entry, the sampler and the argument checks
are here.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_convert.backends.common.moe import STRATEGIES
from gptoss_convert.errors import ConvertError

Params = dict[str, Any]


class GenerateArgumentError(ConvertError, ValueError):
    """An argument of `generate` is unusable; the message names it."""


class KVCache(NamedTuple):
    """One layer's cache. Entries are in arrival order; a slot with pos -1 is empty."""

    k: jax.Array     # [B, S, Nkv, D]  keys, RoPE applied
    v: jax.Array     # [B, S, Nkv, D]
    pos: jax.Array   # [B, S] int32     position of each entry, -1 = empty


@functools.partial(jax.jit, static_argnames=("greedy",))
def sample(logits, key, temperature, top_p, *, greedy: bool):
    """Next token [B] from logits [B, V]: argmax when greedy, else temperature + nucleus sampling
    (the smallest set of most likely tokens whose mass reaches top_p; the top token always stays)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]                                 # descending
    p = jax.nn.softmax(ranked, axis=-1)
    keep = jnp.cumsum(p, axis=-1) - p < top_p                                  # mass before < top_p
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class GenerateStats:
    """Wall-clock timings of one `generate` call (compilation excluded with warmup=True)."""

    batch: int
    prompt_tokens: int        # real prompt tokens (padding not counted)
    prefill_s: float          # prefill step + first sample, to the host
    decode_tokens: int        # tokens fed through one-token steps (batch × steps)
    decode_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else float("nan")

    def summary(self) -> str:
        return (f"prefill {self.prompt_tokens} tok in {self.prefill_s:.3f} s ({self.prefill_tokens_per_s:.1f} tok/s); "
                f"decode {self.decode_tokens} tok in {self.decode_s:.3f} s ({self.decode_tokens_per_s:.1f} tok/s)")


def _check_args(prompts, cfg, max_new_tokens, temperature, top_p, moe, eos_id) -> tuple[list[list[int]], set[int]]:
    problems = []
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
        prompts = [prompts]
    if not (isinstance(prompts, Sequence) and prompts and all(isinstance(p, Sequence) and p for p in prompts)):
        problems.append("prompt_ids: expected a non-empty list of token ids or a list of such lists")
        prompts = []
    prompts = [[int(t) for t in p] for p in prompts]
    if any(not 0 <= t < cfg.V for p in prompts for t in p):
        problems.append(f"prompt_ids: token ids must lie in 0..{cfg.V - 1} (the model's vocabulary)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        problems.append(f"max_new_tokens: expected an integer ≥ 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        problems.append(f"temperature: expected ≥ 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p: expected 0 < top_p ≤ 1, got {top_p!r}")
    if moe not in STRATEGIES:
        problems.append(f"moe: {moe!r} unknown; choose one of {', '.join(STRATEGIES)}")
    if problems:
        raise GenerateArgumentError("; ".join(problems))
    if eos_id is None:
        return prompts, set()
    return prompts, {int(eos_id)} if isinstance(eos_id, (int, np.integer)) else {int(e) for e in eos_id}


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """tokens [B, T] (padding id 0) and positions [B, T] (−1 on padding), prompts right-aligned."""
    T = max(map(len, prompts))
    tokens = np.zeros((len(prompts), T), np.int32)
    positions = np.full((len(prompts), T), -1, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = p
        positions[b, T - len(p):] = np.arange(len(p))
    return tokens, positions


def decode(step_fn, init_fn, params: Params, cfg, prompt_ids, *, max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, moe: str = "ragged_dot", dtype=jnp.float32,
           eos_id: int | Sequence[int] | None = None, warmup: bool = False) -> tuple[list[list[int]], GenerateStats]:
    """The decoding loop of `generate_with_stats` over a family's `step_fn` (as `step`) and
    `init_fn` (as `init_caches`): left-padded prefill, then one-token steps until eos or the limit.
    Every family's `generate_with_stats` is this over its own step."""
    prompts, eos = _check_args(prompt_ids, cfg, max_new_tokens, temperature, top_p, moe, eos_id)
    B, lengths = len(prompts), np.array([len(p) for p in prompts])
    stats = GenerateStats(B, int(lengths.sum()), 0.0, 0, 0.0)
    if max_new_tokens == 0:
        return [[] for _ in prompts], stats
    tokens, positions = left_pad(prompts)
    dtype = jnp.dtype(dtype)                            # one spelling, one jit cache entry
    max_len = tokens.shape[1] + max_new_tokens - 1      # the last sampled token is never fed back
    kw = {"cfg": cfg, "moe": moe, "dtype": dtype}
    pick = functools.partial(sample, temperature=jnp.float32(temperature or 1.0), top_p=jnp.float32(top_p),
                             greedy=temperature == 0)
    key = jax.random.key(seed)
    if warmup:   # compile the prefill, the one-token step and the sampler on throwaway caches
        logits, c = step_fn(params, init_fn(cfg, B, max_len, dtype), tokens, positions, **kw)
        logits, _ = step_fn(params, c, tokens[:, -1:], positions[:, -1:], **kw)
        jax.block_until_ready(pick(logits, key))

    t0 = time.perf_counter()
    logits, caches = step_fn(params, init_fn(cfg, B, max_len, dtype), tokens, positions, **kw)
    nxt = np.asarray(pick(logits, jax.random.fold_in(key, 0)))
    t1 = time.perf_counter()
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for t in range(max_new_tokens):
        for b in np.flatnonzero(~done):
            out[b].append(int(nxt[b]))
        done |= np.isin(nxt, list(eos))
        if t == max_new_tokens - 1 or done.all():
            break
        logits, caches = step_fn(params, caches, nxt[:, None], (lengths + t)[:, None].astype(np.int32), **kw)
        nxt = np.asarray(pick(logits, jax.random.fold_in(key, t + 1)))
        stats.decode_tokens += B
    stats.prefill_s, stats.decode_s = t1 - t0, time.perf_counter() - t1
    return out, stats


def empty_caches(sizes, batch: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> tuple[KVCache, ...]:
    """One empty cache per layer, of `sizes[i]` entries each."""
    def empty(S):
        shape = (batch, S, num_kv_heads, head_dim)   # k and v separate buffers: both are donated
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, S), -1, jnp.int32))
    return tuple(empty(S) for S in sizes)


def extend_cache(cache: KVCache, k, v, q_pos):
    """(keys, values, key positions) of cache + the T new entries k, v [B, T, Nkv, D] at q_pos
    [B, T], and the cache that keeps the last S of them (S = the cache's size)."""
    keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)        # [B, S+T, Nkv, D]
    values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
    k_pos = jnp.concatenate([cache.pos, q_pos], axis=1)                        # [B, S+T]
    S = cache.pos.shape[1]
    return keys, values, k_pos, KVCache(keys[:, -S:], values[:, -S:], k_pos[:, -S:])

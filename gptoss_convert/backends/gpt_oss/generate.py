"""KV-cache decoding over the MaxText gpt-oss parameter tree: one prefill step, then one-token steps.

The math is model.py's (RoPE, RMSNorm, sinks attention, MoE); this module adds the caches. Each
layer keeps a cache `KVCache(k, v, pos)` of fixed size S: the sliding layers keep only the
window (S = sliding_window), the full layers keep everything (S = max_len). A step attends over
concat(cache, new keys) with a mask built from the key positions, then keeps the LAST S entries
as the new cache. Batches are LEFT-padded (padding has position -1 and is never attended to), so
every row's newest token sits at the end of the block and the rows decode in lockstep.
Both parameter layouts are accepted; scanned leaves give up layer i's slot i // 2 on axis 1.
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

from gptoss_convert.backends.gpt_oss import model as M
from gptoss_convert.backends.gpt_oss.config import GptOssConfig
from gptoss_convert.backends.gpt_oss.moe import STRATEGIES
from gptoss_convert.backends.gpt_oss.moe import moe as moe_block
from gptoss_convert.backends.gpt_oss.params import layout_for
from gptoss_convert.errors import ConvertError

Params = dict[str, Any]


class GenerateArgumentError(ConvertError, ValueError):
    """An argument of `generate` is unusable; the message names it."""


class KVCache(NamedTuple):
    """One layer's cache. Entries are in arrival order; a slot with pos -1 is empty."""

    k: jax.Array     # [B, S, Nkv, D]  keys, RoPE applied
    v: jax.Array     # [B, S, Nkv, D]
    pos: jax.Array   # [B, S] int32     position of each entry, -1 = empty


def cache_sizes(cfg: GptOssConfig, max_len: int) -> tuple[int, ...]:
    """Entries kept per layer: the window on sliding layers, `max_len` on full-attention layers."""
    return tuple(min(cfg.sliding_window, max_len) if cfg.is_sliding(i) else max_len for i in range(cfg.L))


def init_caches(cfg: GptOssConfig, batch: int, max_len: int, dtype=jnp.float32) -> tuple[KVCache, ...]:
    """Empty caches for every layer; `max_len` = the most tokens (padding included) a row will hold."""
    def empty(S):
        shape = (batch, S, cfg.Nkv, cfg.D)   # k and v separate buffers: both are donated
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, S), -1, jnp.int32))
    return tuple(empty(S) for S in cache_sizes(cfg, max_len))


def layer_params(params: Params, cfg: GptOssConfig, i: int) -> Params:
    """Layer i's subtree with unscanned shapes, from either layout."""
    if not M.is_scanned(params):
        return params["decoder"][f"layers_{i}"]
    layout = layout_for(cfg, True)
    stack = params["decoder"]["layers"][f"layers_{i % layout.period}"]
    return jax.tree.map(lambda a: jax.lax.index_in_dim(a, i // layout.period, layout.axis, keepdims=False), stack)


def key_mask(q_pos, k_pos, window: int | None):
    """[B, T, S] bool from q_pos [B, T], k_pos [B, S]: a key is visible iff it is stored (pos ≥ 0)
    and not after the query; on sliding layers also within the window (q − W < k). A padding
    query (pos −1) sees nothing, which sdpa_with_sinks turns into zeros."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    visible = (k >= 0) & (k <= q)
    return visible & (k > q - window) if window is not None else visible


def cached_attention(attn_params: Params, h, cache: KVCache, cos, sin, q_pos, window: int | None):
    """GptOssAttention of the T new tokens h [B, T, H] over cache + themselves -> ([B, T, H], cache)."""
    q, k, v = M.project_qkv(attn_params, h, cos, sin)
    keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)        # [B, S+T, Nkv, D]
    values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
    k_pos = jnp.concatenate([cache.pos, q_pos], axis=1)                        # [B, S+T]
    o = M.sdpa_with_sinks(q, keys.astype(q.dtype), values.astype(q.dtype), attn_params["sinks"],
                          key_mask(q_pos, k_pos, window))
    S = cache.pos.shape[1]
    return M.project_out(attn_params, o), KVCache(keys[:, -S:], values[:, -S:], k_pos[:, -S:])


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


# ---------------------------------------------------------------------------------------------
# The decoding loop


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


def generate_with_stats(params: Params, cfg: GptOssConfig, prompt_ids, *, max_new_tokens: int,
                        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, moe: str = "ragged_dot",
                        dtype=jnp.float32, eos_id: int | Sequence[int] | None = None,
                        warmup: bool = False) -> tuple[list[list[int]], GenerateStats]:
    """`generate`, also returning prefill/decode timings. warmup=True first compiles both step
    shapes on throwaway caches, so the timings measure steady-state throughput."""
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
        logits, c = step(params, init_caches(cfg, B, max_len, dtype), tokens, positions, **kw)
        logits, _ = step(params, c, tokens[:, -1:], positions[:, -1:], **kw)
        jax.block_until_ready(pick(logits, key))

    t0 = time.perf_counter()
    logits, caches = step(params, init_caches(cfg, B, max_len, dtype), tokens, positions, **kw)
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
        logits, caches = step(params, caches, nxt[:, None], (lengths + t)[:, None].astype(np.int32), **kw)
        nxt = np.asarray(pick(logits, jax.random.fold_in(key, t + 1)))
        stats.decode_tokens += B
    stats.prefill_s, stats.decode_s = t1 - t0, time.perf_counter() - t1
    return out, stats


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

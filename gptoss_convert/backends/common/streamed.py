"""The streamed forward's reads, shared by the families (verify --streamed): the embedding rows
the prompt uses, only the experts real tokens selected (one `[e]` / `[e, slot]` slice each), and
the LM head in column blocks. `reader` is verify's leaf reader (verify.streamed.LeafReader)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_convert.backends.common.layers import rms_norm

HIGHEST = jax.lax.Precision.HIGHEST


def bucket(n: int) -> int:
    """Pad row counts to powers of two so an expert kernel compiles a handful of times."""
    return 1 << max(n - 1, 0).bit_length()


def routed_experts(reader, layer: int, h: np.ndarray, weights: np.ndarray, experts: np.ndarray, valid: np.ndarray,
                   expert_leaves, apply_expert: Callable[[np.ndarray, dict[str, Any]], Any]) -> np.ndarray:
    """The MoE output for rows h [N, H] routed to `experts` [N, k] with `weights` [N, k], reading
    only the experts that real (`valid`) tokens selected; `apply_expert(rows, w)` runs one expert
    on rows with its leaves `w` ({last path part: array} of `expert_leaves`)."""
    out = np.zeros_like(h)
    for e in np.unique(experts[valid]):
        n_idx, k_idx = np.nonzero((experts == e) & valid[:, None])
        w = {rel.split("/")[-1]: reader.layer(layer, rel, int(e)) for rel in expert_leaves}
        rows = np.zeros((bucket(len(n_idx)), h.shape[1]), np.float32)
        rows[:len(n_idx)] = h[n_idx]
        y = np.asarray(apply_expert(rows, w))
        np.add.at(out, n_idx, weights[n_idx, k_idx][:, None] * y[:len(n_idx)])
    return out


def embedded(reader, tokens: np.ndarray):
    """x₀ [B, T, H] for `tokens` [B, T], reading only the embedding rows the tokens use."""
    uniq, inverse = np.unique(tokens, return_inverse=True)
    return jnp.asarray(reader.rows("token_embedder/embedding", uniq)[inverse.reshape(tokens.shape)])


def head_logits(reader, x, mask: np.ndarray, cfg, vocab_block: int) -> list[np.ndarray]:
    """Final RMSNorm of x [B, T, H] and the LM head read in column blocks, for the real tokens
    only: one fp32 [len_b, V] array per row."""
    valid = np.asarray(mask, bool).reshape(-1)
    h = np.asarray(rms_norm(x, jnp.asarray(reader.leaf("decoder/decoder_norm/scale")), cfg.rms_norm_eps))
    h = h.reshape(-1, cfg.H)[valid]                                                           # [N_real, H]
    logits = np.empty((h.shape[0], cfg.V), np.float32)
    for v0 in range(0, cfg.V, vocab_block):
        k = reader.leaf("decoder/logits_dense/kernel",
                        (slice(None), slice(v0, min(v0 + vocab_block, cfg.V))))  # [H, vb]
        logits[:, v0:v0 + k.shape[1]] = np.asarray(jnp.dot(h, k, precision=HIGHEST))
    return np.split(logits, np.cumsum(np.asarray(mask, bool).sum(1))[:-1])

"""Logit comparison metrics (docs/verification.md §2), computed in float64."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Thresholds:
    atol: float = 0.1          # upstream gpt-oss-20b recipe
    rtol: float = 0.1
    max_kl: float = 3e-4


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare(golden: np.ndarray, ours: np.ndarray, th: Thresholds = Thresholds(), *, skip_first: bool = False,
            k: int = 5, block: int = 32) -> dict:
    """Per-prompt metrics of `ours` [T, V] against `golden` [T, V]; 'pass' applies `th`.
    Computed `block` tokens at a time, so float64 temporaries stay small at a 201k vocabulary."""
    if golden.shape != ours.shape:
        raise ValueError(f"golden logits {golden.shape} and ours {ours.shape} differ in shape")
    if skip_first and golden.shape[0] > 1:
        golden, ours = golden[1:], ours[1:]
    parts = [_block(golden[i:i + block], ours[i:i + block], th, k) for i in range(0, golden.shape[0], block)]
    kl = np.concatenate([p["kl"] for p in parts])
    n = golden.shape[0] * golden.shape[1]
    m = {"tokens": int(golden.shape[0]), "max_abs_diff": max(p["max_abs"] for p in parts), "mean_kl": float(kl.mean()),
         "max_kl": float(kl.max()), "top1_agreement": float(np.mean(np.concatenate([p["top1"] for p in parts]))),
         f"top{k}_overlap": float(np.mean(np.concatenate([p["overlap"] for p in parts]))),
         "allclose_fraction": sum(p["close"] for p in parts) / n}
    m["pass"] = bool(m["allclose_fraction"] == 1.0 and m["max_kl"] <= th.max_kl)
    return m


def _block(golden: np.ndarray, ours: np.ndarray, th: Thresholds, k: int) -> dict:
    """The metrics' pieces for a block of token rows."""
    lp, lq = _log_softmax(golden), _log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)                                    # KL(P_golden || Q_ours) per token
    diff = np.abs(ours.astype(np.float64) - golden)
    close = int((diff <= th.atol + th.rtol * np.abs(golden)).sum())
    tg, to = _top(golden, k), _top(ours, k)
    overlap = np.array([len(set(a) & set(b)) / k for a, b in zip(tg, to)])
    return {"kl": kl, "max_abs": float(diff.max()), "close": close, "top1": golden.argmax(-1) == ours.argmax(-1),
            "overlap": overlap}


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """The indices of each row's k largest entries (any order)."""
    k = min(k, x.shape[-1])
    return np.argpartition(-x, k - 1, -1)[:, :k]

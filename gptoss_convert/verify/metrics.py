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
            k: int = 5) -> dict:
    """Per-prompt metrics of `ours` [T, V] against `golden` [T, V]; 'pass' applies `th`."""
    if golden.shape != ours.shape:
        raise ValueError(f"golden logits {golden.shape} and ours {ours.shape} differ in shape")
    if skip_first and golden.shape[0] > 1:
        golden, ours = golden[1:], ours[1:]
    lp, lq = _log_softmax(golden), _log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)                                    # KL(P_golden || Q_ours) per token
    diff = np.abs(ours.astype(np.float64) - golden)
    close = diff <= th.atol + th.rtol * np.abs(golden)
    top1 = (golden.argmax(-1) == ours.argmax(-1)).mean()
    tg = np.argsort(-golden, -1)[:, :k]
    to = np.argsort(-ours, -1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(tg, to)])
    m = {"tokens": int(golden.shape[0]), "max_abs_diff": float(diff.max()), "mean_kl": float(kl.mean()),
         "max_kl": float(kl.max()), "top1_agreement": float(top1), f"top{k}_overlap": float(overlap),
         "allclose_fraction": float(close.mean())}
    m["pass"] = bool(close.all() and m["max_kl"] <= th.max_kl)
    return m

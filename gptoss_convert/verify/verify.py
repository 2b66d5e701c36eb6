"""`gptoss-convert verify`: run the JAX forward on a converted checkpoint against golden logits."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from gptoss_convert.errors import InputError, VerifyFailed
from gptoss_convert.loading import checkpoint_bytes, is_scanned, load_config, load_params, locate
from gptoss_convert.tree import unflatten
from gptoss_convert.verify.metrics import Thresholds, compare

MOE_STRATEGIES = ("ragged_dot", "megablox", "dense")
STREAM_ABOVE = 2 << 30      # checkpoints larger than this are verified streamed by default


def run_batch(fn, records: list[dict]) -> list[np.ndarray]:
    """All prompts in one right-padded batch (one compilation); returns each prompt's [T, V] logits."""
    T = max(len(r["tokens"]) for r in records)
    tokens = np.zeros((len(records), T), np.int32)
    mask = np.zeros((len(records), T), np.int32)
    for b, r in enumerate(records):
        tokens[b, :len(r["tokens"])] = r["tokens"]
        mask[b, :len(r["tokens"])] = 1
    logits = fn(tokens, mask)
    if isinstance(logits, list):                  # already one [len, V] array per prompt
        return logits
    logits = np.asarray(logits)
    return [logits[b, :len(r["tokens"])] for b, r in enumerate(records)]


def _table(rows: list[dict], th: Thresholds) -> str:
    head = f"{'prompt':<24} {'tok':>5} {'max|Δ|':>10} {'mean KL':>10} {'max KL':>10} {'top1':>6} {'top5':>6}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r["prompt"].replace("\n", " ")
        p = p if len(p) <= 24 else p[:21] + "..."
        lines.append(f"{p:<24} {r['tokens']:>5} {r['max_abs_diff']:>10.3g} {r['mean_kl']:>10.3g} {r['max_kl']:>10.3g} "
                     f"{r['top1_agreement']:>6.1%} {r['top5_overlap']:>6.1%}  {'PASS' if r['pass'] else 'FAIL'}")
    lines.append(f"thresholds: atol={th.atol} rtol={th.rtol} max_kl={th.max_kl}")
    return "\n".join(lines)


def verify(ckpt: str | os.PathLike, *, golden: str | os.PathLike | None = None, hf: str | os.PathLike | None = None,
           moe: str = "ragged_dot", atol: float = 0.1, rtol: float = 0.1, max_kl: float = 3e-4,
           skip_first_token: bool = False, json_report: str | os.PathLike | None = None,
           config: str | os.PathLike | None = None, prompts: str | None = None, streamed: bool | None = None,
           log=print) -> dict:
    """Compare the JAX forward on `ckpt` with golden logits (a file, or HF run on `hf` now).

    Prints a table per prompt and returns the report; raises VerifyFailed unless every prompt
    passes (elementwise |a-g| <= atol + rtol|g| and max per-token KL <= max_kl).
    `streamed=True` runs layer by layer reading only the experts the router selects (memory: one
    layer + one expert), for checkpoints bigger than RAM; None = streamed above 2 GB.
    """
    if moe not in MOE_STRATEGIES:
        raise InputError(f"moe strategy {moe!r} unknown; choose one of {', '.join(MOE_STRATEGIES)}")
    if (golden is None) == (hf is None):
        raise InputError("give exactly one of --golden FILE or --hf HF_DIR")
    ck = locate(ckpt, config)
    backend, cfg = load_config(ck)
    records = _golden_records(golden, hf, prompts, cfg.V)
    th = Thresholds(atol, rtol, max_kl)
    if streamed is None:
        streamed = ck.kind == "orbax" and checkpoint_bytes(ck) > STREAM_ABOVE
    if streamed:
        if ck.kind != "orbax":
            raise InputError(f"{ck.path}: --streamed reads Orbax checkpoints; convert with to-orbax first")
        from gptoss_convert.verify.streamed import streamed_logits
        scanned = is_scanned(ck)
        ours = run_batch(lambda tokens, mask: streamed_logits(ck.path, cfg, scanned, tokens, mask, backend=backend),
                         records)
    else:
        params, scanned = load_params(ck)
        tree = unflatten(params)
        ours = run_batch(lambda tokens, mask: backend.forward(tree, tokens, cfg, moe=moe, attention_mask=mask), records)
    rows = [{"prompt": rec["prompt"], **compare(rec["logits"], o, th, skip_first=skip_first_token)}
            for rec, o in zip(records, ours)]
    report = {"checkpoint": str(ck.path), "kind": ck.kind, "layout": "scanned" if scanned else "unscanned",
              "moe": "streamed per-expert" if streamed else moe, "thresholds": dataclasses.asdict(th), "prompts": rows, "pass": all(r["pass"] for r in rows)}
    log(_table(rows, th))
    if json_report:
        Path(json_report).write_text(json.dumps(report, indent=1))
    if not report["pass"]:
        raise VerifyFailed(f"{ck.path}: {sum(not r['pass'] for r in rows)} of {len(rows)} prompt(s) FAIL against the golden logits")
    log(f"verify: PASS ({ck.kind}, {report['layout']}, moe={report['moe']}, {len(rows)} prompts)")
    return report


def _golden_records(golden, hf, prompts, vocab_size):
    from gptoss_convert.verify.golden import hf_logits, load_hf_model, parse_prompts, read_golden
    if golden is not None:
        return read_golden(golden, vocab_size)
    from transformers import AutoTokenizer
    from gptoss_convert.io.hf_checkpoint import resolve_source
    d = resolve_source(hf)
    tok = AutoTokenizer.from_pretrained(d)
    model = load_hf_model(d, "float32")
    recs = []
    for p in parse_prompts(prompts):
        tokens = tok(p)["input_ids"]
        recs.append({"prompt": p, "tokens": tokens, "logits": hf_logits(model, tokens)})
    return recs

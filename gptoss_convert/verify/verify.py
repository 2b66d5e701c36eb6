"""`gptoss-convert verify`: run the JAX forward on a converted checkpoint against golden logits."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from gptoss_convert.errors import InputError, VerifyFailed
from gptoss_convert.loading import checkpoint_bytes, is_scanned, load_config, load_params, locate
from gptoss_convert.tree import unflatten
from gptoss_convert.verify.golden import coverage
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
           tokens: str | os.PathLike | None = None, show_progress: bool = True, step: int | None = None,
           item: str | None = None, log=print) -> dict:
    """Compare the JAX forward on `ckpt` with golden logits (a file, or HF run on `hf` now).

    Prints a table per prompt and the expert coverage, returns the report; raises VerifyFailed
    unless every prompt passes (elementwise |a-g| <= atol + rtol|g| and max per-token KL <= max_kl).
    `streamed=True` runs both halves layer by layer: the golden (transformers' layers, hf_streamed)
    and our forward (reading only the experts the router selects); None = each half decides by
    size. `tokens`: a JSON file of token-id lists instead of prompts (with --hf). The JSON report
    path is checked writable before any work; the report gets each half's time and peak RSS.
    """
    from gptoss_convert.verify.golden import check_writable

    if moe not in MOE_STRATEGIES:
        raise InputError(f"moe strategy {moe!r} unknown; choose one of {', '.join(MOE_STRATEGIES)}")
    if (golden is None) == (hf is None):
        raise InputError("give exactly one of --golden FILE or --hf HF_DIR")
    if golden is not None and (tokens is not None or prompts is not None):
        raise InputError("--tokens and --prompts choose what --hf runs; a --golden file has its own tokens")
    if json_report:
        check_writable(json_report, "JSON report")
    ck = locate(ckpt, config, step=step, item=item)    # an Orbax run root: `step`; its params item: `item`
    backend, cfg = load_config(ck)
    phases = Phases()
    with phases("golden"):
        records, cov_golden = _golden_records(golden, hf, prompts, tokens, cfg.V, streamed, show_progress)
    th = Thresholds(atol, rtol, max_kl)
    if streamed is None:
        streamed = checkpoint_bytes(ck) > STREAM_ABOVE if ck.kind == "orbax" else _hf_too_big(ck)
    with phases("forward"):
        ours, scanned, hit = _our_logits(ck, backend, cfg, records, moe, streamed, show_progress)
    rows = _compare_all(records, ours, th, skip_first_token, show_progress)
    source = "transformers router on CKPT, streamed" if ck.kind == "hf" else "our streamed forward"
    cov = coverage(hit, cfg.E, source) if hit is not None else cov_golden
    report = {"checkpoint": str(ck.path), "kind": ck.kind, "layout": "scanned" if scanned else "unscanned",
              "moe": _moe_label(ck, streamed, moe), "thresholds": dataclasses.asdict(th), "prompts": rows,
              "coverage": cov, "golden_coverage": cov_golden, "phases": phases.done,
              "pass": all(r["pass"] for r in rows)}
    log(_table(rows, th))
    if cov is not None:
        log(cov["summary"])
    if json_report:
        Path(json_report).write_text(json.dumps(report, indent=1))
    if not report["pass"]:
        failed = sum(not r["pass"] for r in rows)
        raise VerifyFailed(f"{ck.path}: {failed} of {len(rows)} prompt(s) FAIL against the golden logits", report)
    log(f"verify: PASS ({ck.kind}, {report['layout']}, moe={report['moe']}, {len(rows)} prompts)")
    return report


def _hf_too_big(ck) -> bool:
    """Whether an HF checkpoint would not fit in memory as the fp32 model our forward loads."""
    from gptoss_convert.verify.golden import want_streamed
    return want_streamed(Path(ck.path), "float32")


def _moe_label(ck, streamed: bool, moe: str) -> str:
    if not streamed:
        return moe
    return "transformers, layer by layer (HF checkpoint)" if ck.kind == "hf" else "streamed per-expert"


def _our_logits(ck, backend, cfg, records, moe, streamed, show_progress):
    """Our forward's logits per record, the layout, and the experts read per layer (streamed; else None)."""
    from gptoss_convert.progress import progress, step
    if streamed and ck.kind == "hf":
        return _hf_streamed_logits(ck, records, show_progress)
    if streamed:
        from gptoss_convert.verify.streamed import streamed_logits
        scanned = is_scanned(ck)
        hit = [set() for _ in range(cfg.L)]
        with progress(cfg.L, "verify: our forward, layer by layer", show_progress, unit="it") as bar:
            ours = run_batch(lambda tokens, mask: streamed_logits(ck.orbax, cfg, scanned, tokens, mask, backend=backend,
                                                                  on_layer=lambda i: bar.update(1), experts_read=hit),
                             records)
        return ours, scanned, [sorted(h) for h in hit]
    with step("verify: loading the checkpoint", show_progress):
        params, scanned = load_params(ck)
        tree = unflatten(params)
    with step(f"verify: our forward ({moe}), {len(records)} prompts in one batch", show_progress):
        ours = run_batch(lambda tokens, mask: backend.forward(tree, tokens, cfg, moe=moe, attention_mask=mask), records)
    return ours, scanned, None


def _hf_streamed_logits(ck, records, show_progress):
    """An HF checkpoint too big for our in-memory forward (e.g. an MXFP4 export against its BF16
    twin, `verify OUT-MXFP4 --hf OUT-BF16`): transformers' own layers, one at a time, as the
    streamed golden runs them (verify/hf_streamed.py). Both sides are then transformers', so the
    comparison measures the checkpoints, not the forward; the experts its router read are the coverage."""
    from gptoss_convert.verify import hf_streamed
    if (ck.config_dir / "config.json").resolve() != (Path(ck.path) / "config.json").resolve():
        raise InputError(f"{ck.path}: --like/--config is for Orbax checkpoints; an HF checkpoint is run with "
                         "its own config.json")
    logits, hit = hf_streamed.streamed_logits(Path(ck.path), [r["tokens"] for r in records], "float32",
                                              show_progress=show_progress)
    return logits, False, hit


def _compare_all(records, ours, th, skip_first_token, show_progress) -> list[dict]:
    from gptoss_convert.progress import progress
    rows = []
    with progress(len(records), "verify: comparing", show_progress, unit="it") as bar:
        for rec, o in zip(records, ours):
            rows.append({"prompt": rec["prompt"], **compare(rec["logits"], o, th, skip_first=skip_first_token)})
            bar.update(1)
    return rows


def _golden_records(golden, hf, prompts, tokens, vocab_size, streamed, show_progress):
    """The golden records (from the file, or transformers on `hf` now) and transformers' coverage (None from a file)."""
    from gptoss_convert.verify.golden import golden_records, prompt_tokens, read_golden
    if golden is not None:
        return read_golden(golden, vocab_size), None
    from gptoss_convert.io.hf_checkpoint import resolve_source
    d = Path(resolve_source(hf))
    items = prompt_tokens(d, prompts, None, tokens, vocab_size)
    return golden_records(d, items, "float32", streamed=streamed, show_progress=show_progress)


class Phases:
    """Wall time and peak RSS of each half of a verify (the peak is reset between them through
    /proc/self/clear_refs where the kernel allows; else it is the process's peak so far)."""

    def __init__(self):
        self.done: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        reset = _reset_peak()
        t0 = time.perf_counter()
        yield
        self.done[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_GiB": _peak_gib(),
                           "peak_since": "this phase" if reset else "process start"}


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None

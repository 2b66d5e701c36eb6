"""What each MXFP4 scale rule costs a fine-tuned gpt-oss: logit KL against the BF16 twin.

Two models, the same protocol:

- `tiny`: a tiny gpt-oss (all dimensions distinct, the tests' config) fine-tuned here with PEFT
  LoRA on attention and both expert stacks (`target_parameters`), `--steps` AdamW steps on CPU
  on a fixed synthetic token stream (its loss is printed: the adapter really trained).
- `full`: a full-shape gpt-oss-20b cut to `--layers` layers (real hidden/expert shapes and the
  real 201k vocabulary; benchmarks/synthetic.py's random MXFP4 base) with bench_merge's
  full-shape synthetic PEFT adapter (rank 16): a cost measurement on random weights, not an
  accuracy claim about the real model.

For each, `merge-lora BASE ADAPTER` writes the BF16 twin, and `merge-lora --mxfp4 --scale-rule R`
the MXFP4 export for every rule; `verify EXPORT --hf TWIN --streamed` runs transformers' own
layers on both (so the figure is the checkpoints' difference, not a forward's), and the table
gets per rule: mean and max per-token KL(P_bf16 || Q_mxfp4), top-1 agreement, max |Δlogit|,
the export's relative RMS error and saturated values / clamped groups (conversion.json), and
the export's wall time and peak RSS (its own process, /usr/bin/time -v).

    PYTHONPATH=. python benchmarks/bench_rules.py tiny --work /tmp/bench-rules
    PYTHONPATH=. python benchmarks/bench_rules.py full --base /work/big/rules/src1 --work /work/big/rules/kl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_merge import write_adapter
from benchmarks.common import machine, markdown_table

ROOT = Path(__file__).resolve().parents[1]
RULES = ("triton", "triton-rtne", "ocp", "compressed-tensors")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def fine_tune_tiny(work: Path, steps: int, seed: int = 0) -> tuple[Path, Path, list[float]]:
    """(BF16 base, trained PEFT adapter, losses): LoRA r=8 on attention + experts, AdamW lr 3e-3."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM

    from gptoss_convert.testing.tiny import tiny_config, write_checkpoint
    base = write_checkpoint(work / "base", tiny_config(), fmt="bf16", seed=seed)
    torch.manual_seed(seed)
    model = get_peft_model(GptOssForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION, target_parameters=EXPERTS))
    rng = np.random.default_rng(seed)
    pattern = rng.integers(3, 300, 37)                           # a repeating stream: learnable, so loss falls
    data = torch.tensor(np.stack([np.roll(np.tile(pattern, 4), -s)[:64] for s in range(16)]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for step in range(steps):
        batch = data[(step * 4) % 16:(step * 4) % 16 + 4]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(float(loss.detach()), 4))
    model.save_pretrained(work / "adapter")
    return base, work / "adapter", losses


def cli(*args: str) -> dict:
    """`python -m gptoss_convert ARGS` in its own process under /usr/bin/time -v: seconds, peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "gptoss_convert", *args, "--no-progress"],
                       env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode not in (0, 4):                               # 4: verify FAIL (expected at default thresholds)
        raise RuntimeError(f"{args[0]} failed ({p.returncode}): {p.stderr[-3000:]}")
    peak = [ln for ln in p.stderr.splitlines() if "Maximum resident set size" in ln][0].split(": ")[1]
    return {"seconds": round(secs, 1), "peak_rss_GB": round(int(peak) * 1024 / 1e9, 2), "stdout": p.stdout}


def run(base: Path, adapter: Path, work: Path, tokens: Path | None) -> list[dict]:
    """The twin, every rule's export, verify of each against the twin: one table row per rule."""
    twin = work / "twin-bf16"
    shutil.rmtree(twin, ignore_errors=True)
    cli("merge-lora", str(base), str(adapter), str(twin))
    rows = []
    for rule in RULES:
        out = work / f"mx-{rule}"
        shutil.rmtree(out, ignore_errors=True)
        exp = cli("merge-lora", str(base), str(adapter), str(out), "--mxfp4", "--scale-rule", rule)
        req = json.loads((out / "conversion.json").read_text())["requantization"]
        report = work / f"verify-{rule}.json"
        args = ["verify", str(out), "--hf", str(twin), "--streamed", "--json", str(report)]
        ver = cli(*args, *(["--tokens", str(tokens)] if tokens else []))
        prompts = json.loads(report.read_text())["result"]["prompts"]     # --json: the common summary
        n = sum(p["tokens"] for p in prompts)
        worst = max(r["rel_rms"] for r in req["tensors"].values())
        rows.append({"rule": rule,
                     "mean KL": f"{sum(p['mean_kl'] * p['tokens'] for p in prompts) / n:.3g}",
                     "max KL": f"{max(p['max_kl'] for p in prompts):.3g}",
                     "top-1": f"{sum(p['top1_agreement'] * p['tokens'] for p in prompts) / n:.2%}",
                     "max abs dlogit": f"{max(p['max_abs_diff'] for p in prompts):.3g}",
                     "rel RMS (all / worst tensor)": f"{req['rel_rms']:.4f} / {worst:.4f}",
                     "saturated values": req["saturated"], "clamped groups": req["clamped_groups"],
                     "export s": exp["seconds"], "export peak RSS GB": exp["peak_rss_GB"],
                     "verify s": ver["seconds"], "tokens": n})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out)
    shutil.rmtree(twin)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["tiny", "full"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-rules"))
    ap.add_argument("--steps", type=int, default=60, help="tiny: LoRA training steps")
    ap.add_argument("--base", type=Path, help="full: a full-shape synthetic base (benchmarks/synthetic.py --layers N)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64, help="full: tokens per sequence (4 random sequences)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.model == "tiny":
        base, adapter, losses = fine_tune_tiny(a.work, a.steps)
        print(json.dumps({"loss_first": losses[:3], "loss_last": losses[-3:]}), flush=True)
        tokens = None                                             # verify's default prompts (tiny tokenizer)
        extra = {"losses": losses}
    else:
        adapter = write_adapter(a.base, a.work / "adapter", a.work, a.rank, 2.0 * a.rank)
        vocab = json.loads((a.base / "config.json").read_text())["vocab_size"]
        tokens = a.work / "tokens.json"
        tokens.write_text(json.dumps(np.random.default_rng(0).integers(0, vocab, (4, a.seq)).tolist()))
        base, extra = a.base, {}
    rows = run(base, adapter, a.work, tokens)
    print(markdown_table(rows, list(rows[0])))
    print(json.dumps({"machine": machine(), "model": a.model, **extra, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

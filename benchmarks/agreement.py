"""Agreement of the JAX forward with HF transformers: strategy x layout x compute dtype.

    python -m benchmarks.agreement [--json out.json]

Tiny random gpt-oss (all dimensions distinct; 2 x 40 tokens, longer than the sliding window 5),
HF GptOssForCausalLM in fp32 with eager attention/experts as the reference; our parameters come
from `to-orbax`'s in-memory path (fp32, or bf16-stored for bf16 compute).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from gptoss_convert.backends.gpt_oss.model import forward
from gptoss_convert.backends.gpt_oss.params import unflatten
from gptoss_convert.converters.to_orbax import convert_in_memory
from gptoss_convert.testing import tiny_config, write_checkpoint
from gptoss_convert.verify.golden import load_hf_model
from gptoss_convert.verify.metrics import Thresholds, compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch
    cfg = tiny_config()
    with tempfile.TemporaryDirectory() as d:
        src = write_checkpoint(Path(d) / "bf16", cfg, fmt="bf16", tokenizer=False)
        model = load_hf_model(src, "float32")
        tokens = np.random.default_rng(0).integers(0, cfg.V, (2, 40)).astype(np.int32)
        with torch.no_grad():
            ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        rows = []
        for scanned in (False, True):
            for dtype in ("float32", "bfloat16"):
                _, flat = convert_in_memory(src, scanned=scanned, dtype="fp32" if dtype == "float32" else "bf16")
                params = unflatten(flat)
                for moe in ("ragged_dot", "dense", "megablox"):
                    ours = np.asarray(forward(params, tokens, cfg, moe=moe, dtype=jnp.dtype(dtype)))
                    m = [compare(r, o, Thresholds()) for r, o in zip(ref, ours)]
                    rows.append({"moe": moe, "layout": "scanned" if scanned else "unscanned", "compute": dtype,
                                 "max_abs_diff": max(x["max_abs_diff"] for x in m),
                                 "max_kl": max(x["max_kl"] for x in m),
                                 "top1": float(np.mean([x["top1_agreement"] for x in m]))})
                    print(json.dumps(rows[-1]), flush=True)
    print("\n| MoE | layout | compute | max \\|Δlogit\\| | max per-token KL | top-1 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['moe']} | {r['layout']} | {r['compute']} | {r['max_abs_diff']:.2e} | {r['max_kl']:.1e} | "
              f"{r['top1']:.1%} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

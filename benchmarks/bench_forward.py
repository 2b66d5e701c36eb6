"""JAX forward throughput per MoE strategy on CPU (or whatever device JAX finds).

    python -m benchmarks.bench_forward [--configs tiny mid] [--strategies ragged_dot dense megablox] [--json out.json]

Also prefill/decode tokens/s of KV-cache `generate` (ragged_dot, batch 1 x 12-token prompt and
batch 8 x 128, 64 new tokens; compilation excluded).

tiny = the test model (H 64, I 96, E 5, k 3, 6 layers, V 300); mid = H 1024, I 1024, 16 experts,
top-4, 8 layers, 16 query heads of 64, 4 kv heads, V 32000. Random parameters of the right shapes,
fp32 compute, one batch of B x T tokens, compiled once, then the median of several runs.
Megablox runs in Pallas interpret mode off TPU, so it is much slower on CPU by construction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_convert.backends.gpt_oss.model import forward
from gptoss_convert.backends.gpt_oss.params import random_params
from gptoss_convert.testing import tiny_config

CONFIGS = {
    "tiny": dict(),
    "mid": dict(vocab_size=32000, hidden_size=1024, intermediate_size=1024, num_hidden_layers=8,
                num_local_experts=16, num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=4,
                head_dim=64, sliding_window=128),
}


def bench(cfg, strategy: str, batch: int, length: int, repeats: int) -> dict:
    params = jax.tree.map(jnp.asarray, random_params(cfg, scanned=True))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.V, (batch, length)), jnp.int32)
    t0 = time.perf_counter()
    forward(params, tokens, cfg, moe=strategy).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(params, tokens, cfg, moe=strategy).block_until_ready()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"strategy": strategy, "tokens": batch * length, "first_call_s": round(compile_s, 2),
            "median_s": round(med, 4), "tokens_per_s": round(batch * length / med, 1)}


def bench_generate(cfg, batch: int, prompt: int, new: int) -> dict:
    from gptoss_convert.backends.gpt_oss.generate import generate_with_stats
    params = jax.tree.map(jnp.asarray, random_params(cfg, scanned=False))
    prompts = np.random.default_rng(0).integers(0, cfg.V, (batch, prompt)).tolist()
    _, st = generate_with_stats(params, cfg, prompts, max_new_tokens=new, warmup=True)
    return {"strategy": "generate (ragged_dot)", "batch": batch, "prompt": prompt, "new": new,
            "prefill_tokens_per_s": round(st.prefill_tokens_per_s, 1),
            "decode_tokens_per_s": round(st.decode_tokens_per_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=sorted(CONFIGS))
    ap.add_argument("--strategies", nargs="+", default=["ragged_dot", "dense", "megablox"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for name in a.configs:
        cfg = tiny_config(**CONFIGS[name])
        for strategy in a.strategies:
            r = {"config": name, "device": jax.devices()[0].platform,
                 **bench(cfg, strategy, a.batch, a.length, a.repeats)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    gen = []
    for name in a.configs:
        for batch, prompt in ((1, 12), (8, 128)):
            gen.append({"config": name, **bench_generate(tiny_config(**CONFIGS[name]), batch, prompt, 64)})
            print(json.dumps(gen[-1]), flush=True)
    print("\n| config | strategy | tokens | first call s | median s | tokens/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['strategy']} | {r['tokens']} | {r['first_call_s']} | {r['median_s']} | "
              f"{r['tokens_per_s']} |")
    print("\n| config | batch x prompt | new tokens | prefill tokens/s | decode tokens/s |\n|---|---|---|---|---|")
    for r in gen:
        print(f"| {r['config']} | {r['batch']} x {r['prompt']} | {r['new']} | {r['prefill_tokens_per_s']} | "
              f"{r['decode_tokens_per_s']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"forward": rows, "generate": gen}, indent=1))


if __name__ == "__main__":
    main()

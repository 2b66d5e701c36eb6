"""Qwen3-MoE at real shapes: a synthetic Qwen3-30B-A3B (the published config with
`num_hidden_layers` cut to `--layers`; every tensor at its real shape: vocab 151936, hidden 2048,
128 experts of 768, 32/4 heads of 128), in the published on-disk format (BF16, one tensor per
expert, ~4 GB shards numbered from 1), converted by `to-orbax --scanned` and `--unscanned`, each
output checked (`check`) and compared with the source bit for bit; then the full 48-layer
model's plan from real-shape sparse shards (`to-orbax --dry-run`), and the same for
Qwen3-235B-A22B's sizes (SIZES_235B).

    python -m benchmarks.bench_qwen3 --workdir /work/bench-q3 --layers 4 [--json qwen3.json]

As bench_fullsize (whose helpers this uses): each conversion runs in a fresh process (its own
peak RSS and CPU seconds), then after its output is deleted the disk's O_DIRECT write bandwidth
is measured, so each ratio is against the disk as it was at that moment. The source is
generated once in 64 MB row blocks (bounded memory) and reused; one output exists at a time.

The oracle: the source's own BF16 tensors read with the `safetensors` package, for every
projection of sampled (layer, expert) pairs (gate_proj -> wi_0, up_proj -> wi_1, down_proj ->
wo, each transposed as backends/qwen3_moe/mapping.py says) and sampled embedding and LM-head
rows; the Orbax output is read back with TensorStore (io.orbax_reader), not the converter.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

from benchmarks import synthetic
from benchmarks.bench_convert import tree_bytes
from benchmarks.bench_fullsize import (Source, bits, compare_all, convert_row, dry_run, expected_rows, read_orbax_rows,
                                       samples)
from benchmarks.common import machine
from gptoss_convert.testing.qwen3 import published_qwen3, qwen3_specs, write_sparse_qwen3

LEAVES = {"gate_proj": "wi_0", "up_proj": "wi_1", "down_proj": "wo"}   # each HF [out, in] -> [in, out]
SHARD_BYTES = 4 * 10**9       # Qwen/Qwen3-30B-A3B: 16 shards of <= 4 GB for its 61 GB
# Qwen3-235B-A22B's sizes (its config.json is not package data here; these are the sizes the
# THUDM/slime training scripts use for it), over the 30B file's other fields: a plan, not a claim
# about the published file.
SIZES_235B = dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
                  head_dim=128, intermediate_size=12288, moe_intermediate_size=1536, num_experts=128,
                  num_experts_per_tok=8, max_window_layers=94)


def qwen_shard_name(k: int, n: int) -> str:
    """Qwen/* numbering: from one, `-of-` the count."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def expected(src: Source, s: dict):
    """Yield (what, reference bits, key) for every sampled value: the expert tensors as MaxText
    holds them (transposed), then embedding and LM-head rows."""
    for layer, e in s["experts"]:
        for proj, leaf in LEAVES.items():
            want = bits(src.slice(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight", slice(None))).T
            yield f"layer {layer} expert {e} {proj}", want, ("expert", layer, e, leaf)
    yield from expected_rows(src, s["rows"])


def read_orbax(out: Path, key: tuple, rows: list[int], scanned: bool):
    """What a Qwen3-MoE Orbax output holds for `key`, read with TensorStore. Scanned: one stack
    `decoder/layers/moe_block/<leaf>` [E, L, ...] (period one, no group level)."""
    from gptoss_convert.io.orbax_reader import open_leaf
    if key[0] != "expert":
        return read_orbax_rows(out, key, rows)
    _, layer, e, leaf = key
    path, at = ("decoder/layers/moe_block/", (e, layer)) if scanned else (f"decoder/layers_{layer}/moe_block/", (e,))
    return bits(open_leaf(out / "0", path + leaf)[at].read().result())


def compare(src: Source, out: Path, cmd: str, s: dict) -> dict:
    """Every sampled value of the `cmd` ("scanned"/"unscanned") output against the source."""
    return compare_all(expected(src, s), lambda key: read_orbax(out, key, s["rows"], scanned=(cmd == "scanned")))


def write_source(work: Path, layers: int) -> tuple[Source, dict]:
    """The synthetic source (made once, reused when complete) and its config."""
    cfg = published_qwen3() | {"num_hidden_layers": layers}
    specs = [(n, dt, shape) for n, (shape, dt) in qwen3_specs(cfg).items()]
    t0 = time.perf_counter()
    out = synthetic.write(work / f"synthetic-qwen3-30b-{layers}L", cfg=cfg, specs=specs,
                          shard_bytes=SHARD_BYTES, shard_name=qwen_shard_name)
    shards = len(list(out.glob("*.safetensors")))
    print(json.dumps({"layers": layers, "source_GB": round(tree_bytes(out) / 1e9, 2), "shards": shards,
                      "made_or_found_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return Source(out), cfg


def plan_full(work: Path, raw: dict, shards: int) -> dict:
    """The dry run's summary on sparse real-shape shards of `raw` (~4 GB each, as published)."""
    plan = dry_run(work / "sparse-qwen3", partial(write_sparse_qwen3, raw=raw, shards=shards))
    print(json.dumps(plan), flush=True)
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="not inside a repository: needs ~2.6 GB free per layer")
    ap.add_argument("--layers", type=int, required=True,
                    help="num_hidden_layers of the synthetic source (published: 48)")
    ap.add_argument("--commands", nargs="+", default=["scanned", "unscanned"])
    ap.add_argument("--experts", type=int, default=8, help="sampled (layer, expert) pairs, at least")
    ap.add_argument("--rows", type=int, default=8, help="sampled embedding rows and LM-head columns")
    ap.add_argument("--baseline-gb", type=float, default=8.0, help="GB written for each O_DIRECT baseline, at most")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, cfg = write_source(work, a.layers)
    s = samples(cfg, a.experts, a.rows)
    rows = []
    for cmd in a.commands:
        rows.append(convert_row(cmd, src, work / f"out-{cmd}", s, int(a.baseline_gb * 1e9), oracle=compare))
        print(json.dumps(rows[-1]), flush=True)
    plans = {"Qwen3-30B-A3B": plan_full(work, published_qwen3(), 16),
             "Qwen3-235B-A22B sizes": plan_full(work, published_qwen3() | SIZES_235B, 118)}
    report = {"machine": machine(), "layers": a.layers, "samples": s, "rows": rows, "dry runs": plans}
    print(f"machine: {report['machine']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

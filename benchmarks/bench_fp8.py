"""FP8 against BF16 Qwen3-MoE sources at real shapes, side by side in one run: a synthetic
Qwen3-30B-A3B (the published config, `num_hidden_layers` cut to `--layers`, every tensor at its
real shape) in the published BF16 layout (bench_qwen3's source) and in the layout of Qwen's FP8
twins (Qwen3-30B-A3B-FP8: every attention and expert projection F8_E4M3 with an F32
`weight_scale_inv` per 128x128 block; embeddings, norms, router and LM head BF16), each converted
by `to-orbax --scanned`, `--unscanned` and `dequantize`, alternating the two sources.

    python -m benchmarks.bench_fp8 --workdir /work/bench-fp8 --layers 4 [--rounds 1] [--json fp8.json]

Each conversion runs in a fresh process (peak RSS = its VmHWM); then `check`, the oracle and the
disk's O_DIRECT write speed on the same bytes (bench_fullsize.convert_row). The oracle for the
FP8 outputs: transformers' own `Fp8Dequantize` of the source's F8 weight and scale grid (read
with the `safetensors` package) for gate_proj, up_proj and down_proj of sampled (layer, expert)
pairs, against the Orbax leaves read with TensorStore (transposed) or the dequantized HF tensor,
bit for bit; for the BF16 source, bench_qwen3's oracle.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import synthetic
from benchmarks.bench_convert import tree_bytes
from benchmarks.bench_fullsize import Source, bits, compare_all, convert_row, samples
from benchmarks.bench_qwen3 import LEAVES, SHARD_BYTES, compare, qwen_shard_name, read_orbax, write_source
from benchmarks.common import machine
from gptoss_convert import fp8
from gptoss_convert.testing.qwen3 import FP8_LINEARS, fp8_quantization_config, published_qwen3, qwen3_specs

BLOCK = (128, 128)


def fp8_specs(cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """The FP8 twin's tensors in order: each quantized projection followed by its scale grid."""
    out = []
    for name, (shape, dtype) in qwen3_specs(cfg).items():
        if name.endswith(FP8_LINEARS):
            out += [(name, "F8_E4M3", shape), (name + "_scale_inv", "F32", fp8.grid_shape(shape, BLOCK))]
        else:
            out.append((name, dtype, shape))
    return out


def write_fp8_source(work: Path, layers: int) -> Source:
    cfg = published_qwen3() | {"num_hidden_layers": layers, "quantization_config": fp8_quantization_config(BLOCK)}
    t0 = time.perf_counter()
    out = synthetic.write(work / f"synthetic-qwen3-30b-fp8-{layers}L", cfg=cfg, specs=fp8_specs(cfg),
                          shard_bytes=SHARD_BYTES, shard_name=qwen_shard_name)
    print(json.dumps({"fp8_source_GB": round(tree_bytes(out) / 1e9, 2),
                      "made_or_found_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return Source(out)


def transformers_expert(src: Source, name: str):
    """transformers' dequantization (Fp8Dequantize, bf16) of one stored FP8 weight."""
    import torch
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    w, s = src.slice(name, slice(None)), src.slice(name + "_scale_inv", slice(None))
    return Fp8Dequantize(None)._dequantize_one(w, s.float(), output_dtype=torch.bfloat16)


def fp8_oracle(src: Source, out: Path, cmd: str, s: dict) -> dict:
    """Sampled experts of an output of the FP8 source against transformers' dequantization."""
    def items():
        for layer, e in s["experts"]:
            for proj, leaf in LEAVES.items():
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                want = bits(transformers_expert(src, name))
                yield (f"layer {layer} expert {e} {proj}", (want if cmd == "dequantize" else want.T),
                       (name, layer, e, leaf))

    def read(key):
        if cmd == "dequantize":
            return bits(Source(out).slice(key[0], slice(None))) if (out / "model.safetensors.index.json").exists() \
                else bits(_single(out, key[0]))
        return read_orbax(out, ("expert", *key[1:]), s["rows"], scanned=(cmd == "scanned"))
    return compare_all(items(), read)


def _single(out: Path, name: str):
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", framework="pt") as f:
        return f.get_tensor(name)


def bf16_oracle(src: Source, out: Path, cmd: str, s: dict) -> dict:
    if cmd != "dequantize":
        return compare(src, out, cmd, s)
    return {"compared": 0, "mismatches": []}       # a BF16 source's dequantize is a copy (check covers it)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="not inside a repository: ~9 GB free for 4 layers + outputs")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--commands", nargs="+", default=["scanned", "unscanned", "dequantize"])
    ap.add_argument("--experts", type=int, default=6, help="sampled (layer, expert) pairs, at least")
    ap.add_argument("--baseline-gb", type=float, default=2.0, help="GB written for each O_DIRECT baseline, at most")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bf16_src, cfg = write_source(work, a.layers)
    fp8_src = write_fp8_source(work, a.layers)
    s = samples(cfg, a.experts, 8)
    rows = []
    for r in range(a.rounds):
        for cmd in a.commands:
            for kind, src, oracle in (("BF16", bf16_src, bf16_oracle), ("FP8", fp8_src, fp8_oracle)):
                row = convert_row(cmd, src, work / f"out-{kind}-{cmd}", s, int(a.baseline_gb * 1e9), oracle=oracle)
                rows.append({"round": r + 1, "source": kind, "source_GB": round(tree_bytes(src.dir) / 1e9, 2)} | row)
                print(json.dumps(rows[-1]), flush=True)
    report = {"machine": machine(), "layers": a.layers, "samples": s, "rows": rows}
    print(f"machine: {report['machine']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

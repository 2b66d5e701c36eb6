"""merge-lora at full gpt-oss size: time, peak RSS and speed against the disk's own.

A synthetic PEFT LoRA adapter at the base's full shapes (rank 16 by default, on q/k/v/o and on
both expert stacks through `target_parameters`), laid out exactly as PEFT 0.21 saves one: its
adapter_config.json is the one PEFT itself writes for a tiny gpt-oss with the same targets
(r and alpha changed), its tensor names and shapes are PEFT's (checked against that tiny
adapter). Each run is `gptoss-convert merge-lora BASE ADAPTER OUT [--mxfp4]` in its own process
under `/usr/bin/time -v` (peak RSS) after the page cache is dropped (cold: the base is read from
disk); OUT is deleted and the disk's O_DIRECT write speed measured right after, on the same disk
(benchmarks/bench_convert.direct_write_bandwidth). Needs root for drop_caches; run it under
`flock /work/.bigdisk.lock` when the output is big (BF16 20b: ~42 GB).

    PYTHONPATH=. python benchmarks/bench_merge.py /work/big/src20b --work /work/big/rules --modes bf16,mxfp4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_convert import direct_write_bandwidth, tree_bytes
from benchmarks.common import machine

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def peft_config(work: Path, rank: int, alpha: float) -> dict:
    """adapter_config.json as PEFT writes it for these targets (from a tiny gpt-oss), r and alpha set."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM

    from gptoss_convert.testing.tiny import tiny_config, write_checkpoint
    tiny = write_checkpoint(work / "tiny-base", tiny_config(), fmt="bf16", seed=0)
    model = get_peft_model(GptOssForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, target_parameters=EXPERTS))
    model.save_pretrained(work / "tiny-adapter")
    conf = json.loads((work / "tiny-adapter" / "adapter_config.json").read_text())
    return conf | {"r": rank, "lora_alpha": alpha, "base_model_name_or_path": None}


def adapter_specs(base_shapes: dict[str, list[int]], rank: int) -> dict[str, tuple[int, ...]]:
    """PEFT's adapter tensor names and shapes for every attention projection and expert stack of the base."""
    out = {}
    for name, shape in base_shapes.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn\.(?:q|k|v|o)_proj)\.weight", name)
        if m:
            p = f"base_model.model.model.layers.{m[1]}.{m[2]}"
            out |= {p + ".lora_A.weight": (rank, shape[1]), p + ".lora_B.weight": (shape[0], rank)}
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if m:                        # ParamWrapper: gate_up_proj registered first, so innermost (.base_layer)
            e, k, n = shape
            p = f"base_model.model.model.layers.{m[1]}.mlp.experts" + (".base_layer" if m[2] == "gate_up_proj" else "")
            out |= {p + ".lora_A.weight": (rank * e, k), p + ".lora_B.weight": (n, rank * e)}
    return out


def base_shapes(d: Path) -> dict[str, list[int]]:
    """HF-orientation shapes of the base's tensors (MXFP4 pairs as the [E, in, out] parameter)."""
    from gptoss_convert.io.hf_checkpoint import open_checkpoint
    return {n: list(t.shape) for n, t in open_checkpoint(d).tensors.items()}


def write_adapter(base: Path, out: Path, work: Path, rank: int, alpha: float, seed: int = 0) -> Path:
    """The full-size synthetic adapter (fp32, as PEFT saves an fp32 model's); skipped if present."""
    from gptoss_convert.io.safetensors import ShardWriter
    if (out / "adapter_config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    conf = peft_config(work, rank, alpha)
    tiny = work / "tiny-adapter"
    want = adapter_specs(base_shapes(work / "tiny-base"), 4)
    from gptoss_convert.io.safetensors import read_header
    got = {n: tuple(i.shape) for n, i in read_header(tiny / "adapter_model.safetensors")[0].items()}
    assert got == want, "PEFT's own adapter layout differs from adapter_specs"
    specs = adapter_specs(base_shapes(base), rank)
    rng = np.random.default_rng(seed)
    w = ShardWriter(out / "adapter_model.safetensors", [(n, "F32", s) for n, s in specs.items()], {"format": "pt"})
    for n, s in specs.items():        # A ~ N(0, 1/in) as PEFT's kaiming-like init; B small, as after training
        std = 1 / np.sqrt(s[1]) if ".lora_A." in n else 1e-3
        w.append(n, (rng.standard_normal(s, dtype=np.float32) * np.float32(std)))
    w.close()
    (out / "adapter_config.json").write_text(json.dumps(conf, indent=2))
    return out


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def run_merge(base: Path, adapter: Path, out: Path, extra: list[str]) -> dict:
    """One merge-lora in its own process under /usr/bin/time -v: wall seconds, peak RSS, CPU."""
    shutil.rmtree(out, ignore_errors=True)
    cold = drop_caches()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "gptoss_convert", "merge-lora", str(base), str(adapter),
           str(out), "--no-progress", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"merge-lora failed ({p.returncode}): {p.stderr[-2000:]}")
    field = {k.strip(): v.strip() for k, v in (ln.split(": ", 1) for ln in p.stderr.splitlines() if ": " in ln)}
    peak = int(field["Maximum resident set size (kbytes)"]) * 1024 / 1e9
    return {"seconds": round(secs, 1), "peak_rss_GB": round(peak, 2),
            "user_s": float(field["User time (seconds)"]), "sys_s": float(field["System time (seconds)"]),
            "cold_cache": cold, "load_1m_after": round(os.getloadavg()[0], 1),
            "log": p.stdout.strip().splitlines()[-3:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-merge"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--modes", default="bf16,mxfp4", help="comma list of bf16, mxfp4, mxfp4:<rule>")
    ap.add_argument("--baseline-gb", type=float, default=8.0, help="GB written by each O_DIRECT probe")
    ap.add_argument("--keep-adapter", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    adapter = write_adapter(a.base, a.work / "adapter", a.work, a.rank, a.alpha)
    rows = []
    for mode in a.modes.split(","):
        extra = [] if mode == "bf16" else ["--mxfp4"] + (["--scale-rule", mode.split(":")[1]] if ":" in mode else [])
        out = a.work / f"out-{mode.replace(':', '-')}"
        row = {"mode": mode, **run_merge(a.base, adapter, out, extra)}
        written = tree_bytes(out)
        shutil.rmtree(out)
        direct = direct_write_bandwidth(a.work / "bandwidth.bin", min(written, int(a.baseline_gb * 1e9)))
        gbps = written / row["seconds"] / 1e9
        row |= {"written_GB": round(written / 1e9, 2), "GB_per_s": round(gbps, 3),
                "o_direct_GB_per_s": direct and round(direct, 3),
                "ratio_to_o_direct": direct and round(gbps / direct, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not a.keep_adapter:
        shutil.rmtree(a.work / "adapter")
    print(json.dumps({"machine": machine(), "base": str(a.base), "rank": a.rank, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

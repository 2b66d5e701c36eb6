"""Regenerate tests/data/maxtext_train/: a training checkpoint written by MaxText's own train loop.

Runs in a separate venv with MaxText 0.2.5 and this project installed (README.md beside this
file has the commands); not part of the test run. Steps:
  1. a tiny random gpt-oss (MXFP4 as published; config.json = the published 20b one with sizes changed);
  2. this project's to-orbax --scanned, fp32;
  3. MaxText's train.py on CPU from those params (synthetic data, a few AdamW steps with a
     learning rate high enough that every weight moves; checked here, value by value);
  4. MaxText's own fp32 logits of the final params on fixed token ids (its model code, loaded
     through its own `from_pretrained` path);
  5. the checkpoint root (MaxText keeps only the final step), config.json, the sidecars
     to-orbax writes, the logits (logits.npz) and the exact run (maxtext_run.json) go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Every dimension distinct (k=2 and the scan length 2 are not tensor dims of one leaf);
# L=4 gives both attention kinds twice; H and I are multiples of 32 (MXFP4 blocks).
SIZES = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
             num_local_experts=5, num_experts_per_tok=2, num_attention_heads=6,
             num_key_value_heads=3, head_dim=8, sliding_window=5)
STEPS = 4
LOGIT_TOKENS = (2, 13)          # batch, length: longer than the sliding window
SIDECARS = ("generation_config.json", "chat_template.jinja", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json")

# How MaxText runs on a CPU in fp32: dense MoE (no megablox/ragged kernels), plain attention,
# fp32 activations and weights, full-precision matmuls, no distributed init.
RUNTIME = ["hardware=cpu", "attention=dot_product", "sparse_matmul=false", "megablox=false",
           "dtype=float32", "weight_dtype=float32", "matmul_precision=highest",
           "skip_jax_distributed_system=true", "scan_layers=true"]
TRAIN = ["dataset_type=synthetic", f"steps={STEPS}", "learning_rate=1e-2", "per_device_batch_size=2",
         "max_target_length=16", "checkpoint_period=1000", "max_num_checkpoints_to_keep=1",
         "async_checkpointing=false", "enable_tensorboard=false", "run_name=tiny"]


def model_overrides(raw: dict) -> list[str]:
    """MaxText's gpt-oss-20b model config with the sizes of `raw` (an HF config.json)."""
    sizes = {"base_emb_dim": raw["hidden_size"], "base_num_query_heads": raw["num_attention_heads"],
             "base_num_kv_heads": raw["num_key_value_heads"], "head_dim": raw["head_dim"],
             "num_experts": raw["num_local_experts"], "num_experts_per_tok": raw["num_experts_per_tok"],
             "base_mlp_dim": raw["intermediate_size"], "base_moe_mlp_dim": raw["intermediate_size"],
             "vocab_size": raw["vocab_size"], "base_num_decoder_layers": raw["num_hidden_layers"],
             "sliding_window_size": raw["sliding_window"]}
    return ["model_name=gpt-oss-20b", "override_model_config=true"] + [f"{k}={v}" for k, v in sizes.items()]


def base_yml() -> str:
    import maxtext
    return os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")


def make_source(work: Path) -> tuple[Path, Path]:
    """The tiny HF checkpoint and this project's scanned fp32 Orbax conversion of it."""
    from gptoss_convert import to_orbax
    from gptoss_convert.testing.tiny import tiny_config, write_checkpoint

    hf = write_checkpoint(work / "hf", tiny_config(**SIZES), fmt="mxfp4", seed=0, shards=1)
    to_orbax(hf, work / "orbax", scanned=True, dtype="fp32", progress=False)
    return hf, work / "orbax"


def train(work: Path, orbax: Path, model: list[str]) -> tuple[Path, list[str]]:
    """Run MaxText's train.py in a subprocess (it sets process-wide JAX flags); the run's
    checkpoint root and the exact arguments."""
    args = [*model, *RUNTIME, *TRAIN, f"load_parameters_path={orbax}/0/items",
            f"base_output_directory={work / 'run'}"]
    cmd = [sys.executable, "-m", "maxtext.trainers.pre_train.train", base_yml(), *args]
    with open(work / "train.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return work / "run" / "tiny" / "checkpoints", args


def final_step(root: Path) -> Path:
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    if steps != [STEPS - 1]:
        raise SystemExit(f"expected MaxText to keep only step {STEPS - 1} in {root}, found {steps}")
    return root / str(STEPS - 1)


def check_every_weight_moved(before: Path, after: Path) -> dict[str, float]:
    """Every value of every params leaf differs between the source and the trained step; returns
    max |change| per leaf (a weight that did not move would make the oracle blind to it)."""
    from gptoss_convert.io.orbax_reader import load_params
    from gptoss_convert.tree import flatten

    a, b = flatten(load_params(before)), flatten(load_params(after))
    if set(a) != set(b):
        raise SystemExit(f"params trees differ: {sorted(set(a) ^ set(b))}")
    stuck = {k: int(np.sum(np.asarray(a[k]) == np.asarray(b[k]))) for k in a}
    if any(stuck.values()):
        raise SystemExit(f"values that did not move: { {k: n for k, n in stuck.items() if n} }")
    return {k: float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in sorted(a)}


def maxtext_logits(step: Path, model: list[str], tokens: np.ndarray) -> np.ndarray:
    """MaxText's own forward of the params in `step`, loaded by its `from_pretrained`."""
    import jax
    import jax.numpy as jnp
    from maxtext.configs import pyconfig
    from maxtext.utils import model_creation_utils

    argv = ["make_checkpoint", base_yml(), *model, *RUNTIME, "enable_checkpointing=false",
            f"per_device_batch_size={tokens.shape[0]}", f"max_target_length={tokens.shape[1]}",
            f"load_parameters_path={step}/items"]
    config = pyconfig.initialize(argv)
    net, mesh = model_creation_utils.from_pretrained(config)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    with jax.set_mesh(mesh):
        logits = net(jnp.asarray(tokens), jnp.asarray(positions), decoder_segment_ids=jnp.ones_like(tokens),
                     enable_dropout=False)
    return np.asarray(logits, dtype=np.float32)


def versions() -> dict[str, str]:
    from importlib.metadata import version
    return {p: version(p) for p in ("maxtext", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore")}


def write_out(out: Path, root: Path, hf: Path, orbax: Path, record: dict, tokens, logits) -> None:
    """Replace --out's generated files (this script and README.md stay). config.json is the
    source's (with its MXFP4 quantization_config, as published); the other sidecars are the
    ones to-orbax writes beside its output."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.copytree(root, out / "checkpoints")
    shutil.copy2(hf / "config.json", out / "config.json")
    for name in SIDECARS:
        shutil.copy2(orbax / name, out / name)
    np.savez(out / "logits.npz", tokens=tokens, logits=logits)
    (out / "maxtext_run.json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        hf, orbax = make_source(work)
        raw = json.loads((hf / "config.json").read_text())
        model = model_overrides(raw)
        root, train_args = train(work, orbax, model)
        step = final_step(root)
        moved = check_every_weight_moved(orbax / "0", step)
        tokens = np.random.default_rng(1234).integers(0, raw["vocab_size"], LOGIT_TOKENS).astype(np.int32)
        logits = maxtext_logits(step, model, tokens)
        record = {"versions": versions(), "train_args": [a.replace(str(work), "<work>") for a in train_args], "step": int(step.name),
                  "logits": {"runtime": RUNTIME, "tokens": "numpy default_rng(1234) ids, shape "
                             f"{list(LOGIT_TOKENS)}", "positions": "0..T-1", "segment_ids": 1},
                  "min_max_abs_weight_change": min(moved.values())}
        write_out(args.out, root, hf, orbax, record, tokens, logits)
        print(f"step {step.name}: every value of {len(moved)} leaves moved (smallest max|change| "
              f"{min(moved.values()):.3g}); logits {logits.shape} -> {args.out}")


if __name__ == "__main__":
    main()

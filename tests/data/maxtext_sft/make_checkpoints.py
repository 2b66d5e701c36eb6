"""Regenerate tests/data/maxtext_sft/: checkpoints written by MaxText 0.2.5's own SFT trainer
(`maxtext.trainers.post_train.sft.train_sft`, Tunix 0.1.7 underneath), full fine-tune and LoRA,
scanned and unscanned, with MaxText's own fp32 logits of each trained model.

Runs in the MaxText venv (README.md beside this file has the commands); not part of the test
run. Steps:
  1. the tiny gpt-oss of tests/data/maxtext_train (same SIZES, seed 0, MXFP4 as published), and
     this project's to-orbax of it, scanned and unscanned, fp32 (what each fine-tune loads);
  2. a small chat dataset (parquet, `messages` column) written here;
  3. per run, in a child process (MaxText sets process-wide JAX flags): MaxText's SFT `train`
     on CPU, then MaxText's forward of the trained model object (for LoRA: with qwix's adapter
     in the forward) on fixed token ids, and a check that the saved final step holds exactly
     the trained weights;
  4. an RL-layout checkpoint *derived* from the full scanned one: its `model_params` tree
     re-saved under `base/` with Orbax's own CheckpointManager (MaxText's RL trainer was not run);
  5. the run roots (final step only), config.json, the sidecars, the HF source, logits.npz and
     maxtext_run.json go to --out.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "maxtext_train"))
import make_checkpoint as pretrain  # noqa: E402  (SIZES, model overrides, sidecars, source)

STEPS = 3
LORA_RANK, LORA_ALPHA = 4, 8.0
LOGIT_TOKENS = pretrain.LOGIT_TOKENS
RUNTIME = [a for a in pretrain.RUNTIME if not a.startswith("scan_layers=")]
# The SFT settings: a local parquet chat set through MaxText's grain pipeline (dataset_type=synthetic
# runs 0 steps under the SFT entry point), sequences long enough for the chat template's byte-level
# tokens, a learning rate high enough that every trained value moves in 3 steps.
TRAIN = ["dataset_type=grain", "grain_file_type=parquet", "train_data_columns=['messages']",
         "tokenizer_type=huggingface", f"steps={STEPS}", "learning_rate=1e-2", "per_device_batch_size=2",
         "max_target_length=96", "eval_interval=-1", "checkpoint_period=1000", "async_checkpointing=false",
         "enable_tensorboard=false", "grain_worker_count=0", "profiler=''", "run_name=tiny"]
LORA = ["lora.enable_lora=true", f"lora.lora_rank={LORA_RANK}", f"lora.lora_alpha={LORA_ALPHA}"]
RUNS = {"full_scanned": (True, False), "full_unscanned": (False, False),
        "lora_scanned": (True, True), "lora_unscanned": (False, True)}


def sft_yml() -> str:
    import maxtext
    return os.path.join(os.path.dirname(maxtext.__file__), "configs", "post_train", "sft.yml")


def write_dataset(path: Path) -> None:
    """64 two-turn chats (user asks, assistant answers), one parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(64)]
    pq.write_table(pa.Table.from_pylist(rows), path)


# --- the child: one SFT run, its logits and the saved-equals-trained check ------------------------

def child(spec: dict) -> None:
    """Train with MaxText's SFT `train`, then MaxText's forward of the trained model object."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from maxtext.configs import pyconfig
    from maxtext.trainers.post_train.sft import train_sft

    config = pyconfig.initialize_pydantic(["train_sft", sft_yml(), *spec["args"]])
    train_sft.validate_config(config)
    trainer, mesh = train_sft.train(config, None)
    model = trainer.model
    tokens = np.asarray(spec["tokens"], dtype=np.int32)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    with jax.set_mesh(mesh):
        logits = model(jnp.asarray(tokens), jnp.asarray(positions), decoder_segment_ids=jnp.ones_like(tokens),
                       enable_dropout=False)
    kind = nnx.LoRAParam if spec["lora"] else nnx.Param
    trained = {"/".join(map(str, k)): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
               for k, v in nnx.state(model, kind).flat_state()}
    np.savez(spec["out"], logits=np.asarray(logits, dtype=np.float32), **{"param:" + k: v for k, v in trained.items()})


# --- the parent ----------------------------------------------------------------------------------

def run(name: str, work: Path, scanned: bool, lora: bool, model: list[str], tokens: np.ndarray) -> tuple[Path, list]:
    """One SFT run in a child process; (its final step dir, the train arguments)."""
    src = work / ("orbax" if scanned else "orbax_unscanned")
    args = [*model, *RUNTIME, f"scan_layers={'true' if scanned else 'false'}", *TRAIN, *(LORA if lora else []),
            f"grain_train_files={work / 'train.parquet'}", f"tokenizer_path={work / 'orbax'}",
            f"load_parameters_path={src}/0/items", f"base_output_directory={work / name}"]
    spec = {"args": args, "lora": lora, "tokens": tokens.tolist(), "out": str(work / f"{name}.npz")}
    with open(work / f"{name}.log", "w") as log:
        subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True, stdout=log,
                       stderr=subprocess.STDOUT)
    root = work / name / "tiny" / "checkpoints"
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    if steps[-1] != STEPS:
        raise SystemExit(f"{name}: expected a final step {STEPS} in {root}, found {steps}")
    for s in steps[:-1]:                                 # Tunix keeps every saved step; the final one is the oracle
        shutil.rmtree(root / str(s))
    return root / str(STEPS), args


def saved_params(step: Path) -> tuple[dict[str, np.ndarray], int]:
    """(every weight of the step's model_params as Orbax restores it, path without the /value;
    the number of NNX rng leaves beside them)."""
    import orbax.checkpoint as ocp
    from gptoss_convert.tree import flatten

    flat = flatten(ocp.PyTreeCheckpointer().restore(step / "model_params"))
    rngs = [k for k in flat if "/rngs/" in f"/{k}/"]
    return {k.removesuffix("/value"): np.asarray(v) for k, v in flat.items() if k not in rngs}, len(rngs)


def check_run(name: str, step: Path, work: Path, source: dict[str, np.ndarray], lora: bool) -> dict:
    """The saved step holds the trained model's weights, bit for bit; every trained value moved."""
    got = np.load(work / f"{name}.npz")
    trained = {k[len("param:"):]: got[k] for k in got.files if k.startswith("param:")}
    weights, rngs = saved_params(step)
    if set(weights) != set(trained) or any(not np.array_equal(weights[k], trained[k]) for k in trained):
        raise SystemExit(f"{name}: the saved model_params differ from the trained model")
    if lora:        # B starts at zero (qwix), A random: B must have moved for the adapter to do anything
        still = [k for k, v in trained.items() if k.endswith("_lora_b") and np.any(v == 0)]
        moved = min(float(np.abs(v).max()) for k, v in trained.items() if k.endswith("_lora_b"))
    else:
        still = [k for k, v in trained.items() if np.any(v == source[k])]
        moved = min(float(np.abs(v - source[k]).max()) for k, v in trained.items())
    if still:
        raise SystemExit(f"{name}: values that did not move: {still}")
    return {"trained_leaves": len(trained), "rng_leaves": rngs, "min_max_abs_change": moved}


def derive_rl(step: Path, out_root: Path) -> None:
    """The RL layout (Tunix's RL actor wraps the model in `base`): the real step's model_params
    tree, restored and saved again under `base/` by Orbax's CheckpointManager, as Tunix saves."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(step / "model_params")
    with ocp.CheckpointManager(out_root.absolute(), item_names=("model_params",)) as mgr:
        mgr.save(int(step.name), args=ocp.args.Composite(model_params=ocp.args.PyTreeSave({"base": tree})))
        mgr.wait_until_finished()


def versions() -> dict[str, str]:
    from importlib.metadata import version
    names = ("maxtext", "google-tunix", "qwix", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore",
             "grain", "pyarrow", "google-metrax", "clu", "perfetto", "pandas", "wrapt", "python-dateutil")
    return {p: version(p) for p in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    from gptoss_convert import to_orbax
    from gptoss_convert.io.orbax_reader import load_params
    from gptoss_convert.tree import flatten

    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).absolute()
        work.mkdir(parents=True, exist_ok=True)
        hf, orbax = pretrain.make_source(work)
        to_orbax(hf, work / "orbax_unscanned", scanned=False, dtype="fp32", progress=False)
        write_dataset(work / "train.parquet")
        raw = json.loads((hf / "config.json").read_text())
        model = pretrain.model_overrides(raw)
        tokens = np.random.default_rng(1234).integers(0, raw["vocab_size"], LOGIT_TOKENS).astype(np.int32)
        record = {"versions": versions(), "steps": STEPS, "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA},
                  "logits": {"runtime": RUNTIME, "tokens": f"numpy default_rng(1234) ids, shape {list(LOGIT_TOKENS)}",
                             "positions": "0..T-1", "segment_ids": 1,
                             "model": "the trained model object MaxText's SFT train() returned (trainer.model)"},
                  "runs": {}}
        logits, roots = {}, {}
        for name, (scanned, lora) in RUNS.items():
            source = flatten(load_params(work / ("orbax" if scanned else "orbax_unscanned") / "0"))
            step, train_args = run(name, work, scanned, lora, model, tokens)
            facts = check_run(name, step, work, {k: np.asarray(v) for k, v in source.items()}, lora)
            logits[name] = np.load(work / f"{name}.npz")["logits"]
            roots[name] = step.parent
            record["runs"][name] = {"scan_layers": scanned, "lora": lora, "step": int(step.name), **facts,
                                    "train_args": [a.replace(str(work), "<work>") for a in train_args]}
            print(f"{name}: step {step.name}, {facts}")
        derive_rl(roots["full_scanned"] / str(STEPS), work / "rl_scanned")
        roots["rl_scanned_derived"] = work / "rl_scanned"
        record["runs"]["rl_scanned_derived"] = {"derived_from": "full_scanned", "how": "model_params tree restored "
                                                "and saved again under base/ with orbax CheckpointManager"}
        write_out(args.out, roots, hf, orbax, record, tokens, logits)


def write_out(out: Path, roots: dict, hf: Path, orbax: Path, record: dict, tokens, logits: dict) -> None:
    """Replace --out's generated files (this script and README.md stay)."""
    for name, root in roots.items():
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(root, out / name / "checkpoints")
    shutil.rmtree(out / "hf_source", ignore_errors=True)
    shutil.copytree(hf, out / "hf_source")
    shutil.copy2(hf / "config.json", out / "config.json")
    for name in pretrain.SIDECARS:
        shutil.copy2(orbax / name, out / name)
    np.savez(out / "logits.npz", tokens=tokens, **logits)
    (out / "maxtext_run.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""A checkpoint written by MaxText 0.2.5's own train loop (tests/data/maxtext_train/, made by its
make_checkpoint.py): it is a real training state, its params tree is the one this project
writes, and this project's forward on its trained params reproduces MaxText's own fp32 logits.
MaxText is not needed here; it made the data once."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_convert.backends.gpt_oss.moe import STRATEGIES
from gptoss_convert.backends.gpt_oss.params import flat_shapes
from gptoss_convert.io.orbax_reader import open_leaf, read_metadata
from gptoss_convert.loading import is_scanned, load_config, load_params, locate
from gptoss_convert.testing.tiny import SIZE_FIELDS, tiny_raw_config
from gptoss_convert.tree import unflatten

DATA = Path(__file__).parent / "data" / "maxtext_train"
STEP = DATA / "checkpoints" / "3"            # the only step MaxText kept (max_num_checkpoints_to_keep=1)
PINNED_TREE = Path(__file__).parent / "data" / "maxtext" / "maxtext_param_tree_scanned.txt"
# megablox runs the Pallas kernel in interpret mode off TPU: correct, but slow to compile.
STRATEGY_PARAMS = [pytest.param(s, marks=pytest.mark.slow) if s == "megablox" else s for s in STRATEGIES]


def _raw_config() -> dict:
    return json.loads((DATA / "config.json").read_text())


def _run() -> dict:
    return json.loads((DATA / "maxtext_run.json").read_text())


def test_config_is_the_published_one_with_sizes_and_maxtext_ran_it():
    raw = _raw_config()
    assert raw == tiny_raw_config(**{k: raw[k] for k in SIZE_FIELDS})
    args = dict(a.split("=", 1) for a in _run()["train_args"])
    assert args["model_name"] == "gpt-oss-20b" and args["scan_layers"] == "true"
    maxtext_name = {"hidden_size": "base_emb_dim", "num_attention_heads": "base_num_query_heads",
                    "num_key_value_heads": "base_num_kv_heads", "head_dim": "head_dim",
                    "num_local_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
                    "intermediate_size": "base_moe_mlp_dim", "vocab_size": "vocab_size",
                    "num_hidden_layers": "base_num_decoder_layers", "sliding_window": "sliding_window_size"}
    assert {k: int(args[v]) for k, v in maxtext_name.items()} == {k: raw[k] for k in maxtext_name}
    assert _run()["versions"]["maxtext"] == "0.2.5"


def test_is_a_maxtext_training_state():
    """Written by Orbax's own handler (OCDBT + zarr3, MaxText's defaults), with optimizer state
    for every parameter and the step counter: not a params-only checkpoint."""
    meta = json.loads((STEP / "_CHECKPOINT_METADATA").read_text())
    assert "PyTreeHandler" in meta["item_handlers"]["items"]
    items = json.loads((STEP / "items" / "_METADATA").read_text())
    assert items["use_ocdbt"] and items["use_zarr3"] and (STEP / "items" / "manifest.ocdbt").is_file()
    params = read_metadata(STEP)["leaves"]
    steps = int(dict(a.split("=", 1) for a in _run()["train_args"])["steps"])
    assert STEP.name == str(steps - 1)                    # MaxText names a step folder by its last index
    assert int(open_leaf(STEP, "step", prefix=()).read().result()) == steps
    assert int(open_leaf(STEP, "opt_state/0/count", prefix=()).read().result()) == steps
    for moment in ("mu", "nu"):
        prefix = ("opt_state", "0", moment, "params")
        assert read_metadata(STEP, prefix=prefix)["leaves"] == params
        moments = np.asarray(open_leaf(STEP, "token_embedder/embedding",
                                       prefix=prefix).read().result())
        assert np.abs(moments).max() > 0, f"{moment} is all zeros: not a state after training steps"


def test_params_tree_is_maxtexts_and_ours():
    """The leaf paths are MaxText's pinned gpt-oss tree; the shapes MaxText wrote are the ones
    this project's table gives for the same config."""
    stored = read_metadata(STEP)["leaves"]
    pinned = {line.split("\t")[0] for line in PINNED_TREE.read_text().splitlines()
              if line and not line.startswith("#")}
    assert set(stored) == pinned
    _, cfg = load_config(locate(STEP, DATA))
    assert {p: shape for p, (shape, _) in stored.items()} == flat_shapes(cfg, scanned=True)
    assert {dtype for _, dtype in stored.values()} == {np.dtype(np.float32)}


@pytest.fixture(scope="module")
def trained():
    """(backend, config, params tree) read through this project's loading path."""
    ck = locate(STEP, DATA)
    backend, cfg = load_config(ck)
    flat, scanned = load_params(ck, dtype=np.float32)
    assert scanned and is_scanned(ck)
    return backend, cfg, unflatten(flat)


@pytest.mark.parametrize("strategy", STRATEGY_PARAMS)
def test_forward_reproduces_maxtext_logits(trained, strategy):
    """Oracle: MaxText's own model code on the weights MaxText trained (logits.npz)."""
    backend, cfg, tree = trained
    ref = np.load(DATA / "logits.npz")
    tokens, expected = ref["tokens"], ref["logits"]
    assert tokens.shape[1] > cfg.sliding_window and expected.shape == (*tokens.shape, cfg.V)
    ours = np.asarray(backend.forward(tree, jnp.asarray(tokens), cfg, moe=strategy, dtype=jnp.float32))
    assert np.abs(ours - expected).max() < 1e-4


def test_relative_path_reads_the_same(trained, monkeypatch):
    """Orbax refuses a relative path into an OCDBT checkpoint (MaxText's default); the reader
    makes it absolute, so `verify ./ckpt/3` works from the shell."""
    from gptoss_convert.io.orbax_reader import load_params as orbax_load
    from gptoss_convert.tree import flatten

    monkeypatch.chdir(DATA)
    relative = flatten(orbax_load(Path("checkpoints") / STEP.name, dtype=np.float32))
    expected = flatten(trained[2])
    assert relative.keys() == expected.keys()
    assert all(np.array_equal(relative[k], expected[k]) for k in expected)


# --- issue 14 §5: back out of MaxText from a checkpoint MaxText's train loop wrote ---------------

QUIET = dict(progress=False, log=lambda *_: None)
RUN_ROOT = DATA / "checkpoints"              # the run's checkpoint root: to-hf picks the latest step


@pytest.mark.slow
def test_to_hf_export_reproduces_maxtext_logits_in_transformers(tmp_path):
    """Oracle: transformers' GptOss model on the fp32 export equals MaxText's own logits of the
    params MaxText trained (the export is read from the run root, optimizer state left behind)."""
    import torch
    from transformers import GptOssForCausalLM

    from gptoss_convert.converters.to_hf import to_hf
    from helpers import tree_digest

    before = tree_digest(RUN_ROOT)
    out = to_hf(RUN_ROOT, tmp_path / "hf", like=DATA, dtype="fp32", **QUIET)
    assert tree_digest(RUN_ROOT) == before                  # SRC untouched
    model, info = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref = np.load(DATA / "logits.npz")
    with torch.no_grad():
        got = model.eval()(torch.tensor(ref["tokens"], dtype=torch.long)).logits.numpy()
    assert got.shape == ref["logits"].shape
    assert np.abs(got - ref["logits"]).max() < 1e-4


@pytest.mark.slow
def test_relayout_to_unscanned_restores_through_maxtexts_call(trained, tmp_path):
    """Training state (scanned, OCDBT + zarr3, opt state) -> params-only unscanned checkpoint:
    MaxText's load call (ocp.v1 load of `items`, partial) restores it, and our forward on the
    unscanned params still gives MaxText's logits."""
    from gptoss_convert.converters.to_orbax import to_orbax
    from helpers import maxtext_load as _maxtext_load

    backend, cfg, _ = trained
    out = to_orbax(RUN_ROOT, tmp_path / "unscanned", scanned=False, dtype="fp32", like=DATA, **QUIET)
    flat = _maxtext_load(out / "0", cfg, scanned=False)
    assert set(flat) == set(flat_shapes(cfg, scanned=False))
    tree = unflatten(flat)
    ref = np.load(DATA / "logits.npz")
    ours = np.asarray(backend.forward(tree, jnp.asarray(ref["tokens"]), cfg, moe="ragged_dot", dtype=jnp.float32))
    assert np.abs(ours - ref["logits"]).max() < 1e-4

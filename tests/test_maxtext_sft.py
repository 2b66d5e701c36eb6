"""Checkpoints written by MaxText 0.2.5's own SFT trainer (Tunix underneath; tests/data/maxtext_sft/,
made by its make_checkpoints.py): every post-training layout is found, read and exported with
logits equal to MaxText's own, and MaxText's LoRA merges into the HF base as MaxText's forward
applies it. MaxText is not needed here; it made the data once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_convert.errors import InputError
from gptoss_convert.io.orbax_source import open_orbax
from gptoss_convert.loading import load_config, load_params, locate
from gptoss_convert.tree import unflatten

DATA = Path(__file__).parent / "data" / "maxtext_sft"
QUIET = dict(progress=False, log=lambda *_: None)
TOL = 1e-4                                   # as test_maxtext_train: fp32, max |Δ|
# run -> (its layout's name, scanned, the logits it must reproduce)
FULL = {"full_scanned": ("model_params:nnx", True, "full_scanned"),
        "full_unscanned": ("model_params:nnx", False, "full_unscanned"),
        "rl_scanned_derived": ("model_params:base/nnx", True, "full_scanned")}
LORA = {"lora_scanned": True, "lora_unscanned": False}


def _run() -> dict:
    return json.loads((DATA / "maxtext_run.json").read_text())


def _logits(name: str) -> tuple[np.ndarray, np.ndarray]:
    ref = np.load(DATA / "logits.npz")
    return ref["tokens"], ref[name]


def _root(run: str) -> Path:
    return DATA / run / "checkpoints"


def test_data_is_maxtexts_sft_output():
    """What MaxText's SFT trainer left: model_params + optimizer_state, OCDBT, no zarr3, NNX leaves."""
    rec = _run()
    assert rec["versions"]["maxtext"] == "0.2.5" and rec["versions"]["google-tunix"] == "0.1.7"
    for run in (*[r for r in FULL if r != "rl_scanned_derived"], *LORA):
        step = _root(run) / str(rec["steps"])
        items = json.loads((step / "model_params" / "_METADATA").read_text())
        assert items["use_ocdbt"] and not items["use_zarr3"] and (step / "optimizer_state" / "_METADATA").is_file()
        assert not (step / "items").exists()
        assert all(e["key_metadata"][-1]["key"] == "value" for e in items["tree_metadata"].values())
        assert rec["runs"][run]["min_max_abs_change"] > 0


@pytest.mark.parametrize("run", sorted(FULL))
def test_layout_detected_and_rng_optimizer_ignored(run):
    """The layout is read off the checkpoint; rng leaves and the optimizer item are left out and
    counted; the params are exactly the backend's tree for the config."""
    from gptoss_convert.backends.gpt_oss.params import flat_shapes
    name, scanned, _ = FULL[run]
    src = open_orbax(_root(run))
    assert src.layout.name == name and src.layout.ocdbt and not src.layout.zarr3
    keys = [[k["key"] for k in e["key_metadata"]] for e in
            json.loads((src.item_dir / "_METADATA").read_text())["tree_metadata"].values()]
    assert src.layout.ignored["rngs"] == sum("rngs" in k for k in keys) > 0
    if run != "rl_scanned_derived":
        assert src.layout.ignored["optimizer_state/"] == 1
    assert not any("rngs" in p for p in src.leaves)
    _, cfg = load_config(locate(_root(run), DATA))
    assert {p: s for p, (s, _) in src.leaves.items()} == flat_shapes(cfg, scanned=scanned)


@pytest.mark.parametrize("run", sorted(FULL))
def test_forward_reproduces_maxtext_logits(run):
    """verify/generate's loader reads each layout; our forward = MaxText's own logits."""
    _, scanned, ref = FULL[run]
    ck = locate(_root(run), DATA)
    backend, cfg = load_config(ck)
    flat, got_scanned = load_params(ck, dtype=np.float32)
    assert got_scanned == scanned
    tokens, expected = _logits(ref)
    ours = np.asarray(backend.forward(unflatten(flat), jnp.asarray(tokens), cfg, moe="ragged_dot", dtype=jnp.float32))
    assert np.abs(ours - expected).max() < TOL


def _transformers_logits(hf_dir: Path, tokens: np.ndarray) -> np.ndarray:
    import torch
    from transformers import GptOssForCausalLM

    model, info = GptOssForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("run", [r if r == "full_scanned" else pytest.param(r, marks=pytest.mark.slow)
                                 for r in sorted(FULL)])
def test_to_hf_reproduces_maxtext_logits_in_transformers(run, tmp_path):
    """Oracle: transformers on the fp32 export = MaxText's own logits; the layout is recorded."""
    from gptoss_convert.converters.to_hf import to_hf
    from helpers import tree_digest

    name, _, ref = FULL[run]
    before = tree_digest(_root(run))
    lines: list[str] = []
    out = to_hf(_root(run), tmp_path / "hf", like=DATA, dtype="fp32", progress=False, log=lines.append)
    assert tree_digest(_root(run)) == before
    assert any(f"layout {name}" in line for line in lines)
    record = json.loads((Path(out) / "conversion.json").read_text())
    assert json.dumps(record).count(f'"name": "{name}"') == 1
    tokens, expected = _logits(ref)
    assert np.abs(_transformers_logits(Path(out), tokens) - expected).max() < TOL


@pytest.mark.parametrize("run", sorted(FULL))
def test_relayout_from_each_layout(run, tmp_path):
    """to-orbax --scanned/--unscanned from each layout: a params-only checkpoint of the other
    layout whose forward still gives MaxText's logits; the source layout is recorded."""
    from gptoss_convert.converters.to_orbax import to_orbax

    name, scanned, ref = FULL[run]
    out = to_orbax(_root(run), tmp_path / "relaid", scanned=not scanned, dtype="fp32", like=DATA, **QUIET)
    record = json.loads((Path(out) / "conversion.json").read_text())
    assert f'"name": "{name}"' in json.dumps(record)
    ck = locate(out)
    backend, cfg = load_config(ck)
    flat, got_scanned = load_params(ck)
    assert got_scanned == (not scanned) and ck.orbax.layout.name == "items:params/params"
    tokens, expected = _logits(ref)
    ours = np.asarray(backend.forward(unflatten(flat), jnp.asarray(tokens), cfg, moe="ragged_dot", dtype=jnp.float32))
    assert np.abs(ours - expected).max() < TOL


# --- choosing and refusing -----------------------------------------------------------------------

def _step_with_items(tmp_path: Path, items: dict[str, list[list[str]]]) -> Path:
    """A committed step holding PyTree items whose _METADATA list these keys (no arrays)."""
    step = tmp_path / "run" / "7"
    step.mkdir(parents=True)
    (step / "_CHECKPOINT_METADATA").write_text(json.dumps({"commit_timestamp_nsecs": 1}))
    for name, keys in items.items():
        (step / name).mkdir()
        tree = {str(k): {"key_metadata": [{"key": p} for p in k]} for k in keys}
        (step / name / "_METADATA").write_text(json.dumps({"tree_metadata": tree, "use_zarr3": False}))
    return step


def test_unknown_layout_refused_naming_what_was_found(tmp_path):
    step = _step_with_items(tmp_path, {"state": [["weights", "w"]], "extra": [["x"]]})
    with pytest.raises(InputError, match=r"unknown Orbax layout: items \['extra', 'state'\].*--item"):
        open_orbax(step)
    with pytest.raises(InputError, match=r"unknown Orbax layout: no decoder/.*top-level keys: weights\)"):
        open_orbax(step, item="state")
    with pytest.raises(InputError, match=r"has no Orbax item 'nope' \(items: extra, state\)"):
        open_orbax(step, item="nope")


def test_several_params_items_need_item(tmp_path):
    step = _step_with_items(tmp_path, {"items": [["params", "params", "decoder", "x"]],
                                       "model_params": [["decoder", "x", "value"]]})
    with pytest.raises(InputError, match=r"several params items \(items, model_params\); pick one with --item"):
        open_orbax(step.parent)


def test_item_option_picks_the_item():
    """--item model_params reads it; --item optimizer_state is refused naming its top-level key."""
    root = _root("full_scanned")
    assert open_orbax(root, item="model_params").layout.name == "model_params:nnx"
    with pytest.raises(InputError, match=r"unknown Orbax layout.*top-level keys: opt_state"):
        open_orbax(root, item="optimizer_state")


def test_cli_item_option_spelled_the_same(tmp_path):
    """--item is accepted by to-hf and to-orbax (dry runs), with the same meaning."""
    from click.testing import CliRunner

    from gptoss_convert.cli import main
    for cmd in (["to-hf"], ["to-orbax", "--unscanned"]):
        r = CliRunner().invoke(main, [*cmd, str(_root("full_scanned")), str(tmp_path / cmd[0]), "--like", str(DATA),
                                      "--item", "model_params", "--dry-run", "--no-progress"])
        assert r.exit_code == 0, r.output
        assert "layout model_params:nnx" in r.output


# --- MaxText LoRA -> merge-lora ------------------------------------------------------------------

def _merge(run: str, out: Path, base: Path = DATA / "hf_source", **kw) -> Path:
    from gptoss_convert.converters.merge_lora import merge_lora
    lora = _run()["lora"]
    kw = {"lora_alpha": lora["alpha"], "lora_rank": lora["rank"], **kw}
    return merge_lora(base, _root(run), out, dtype="fp32", **QUIET, **kw)


@pytest.mark.parametrize("run", [r if r == "lora_scanned" else pytest.param(r, marks=pytest.mark.slow)
                                 for r in sorted(LORA)])
def test_maxtext_lora_merge_reproduces_maxtexts_forward(run, tmp_path):
    """Oracle: MaxText's forward with qwix's adapter applied (the trained model object) = transformers
    on our merge of the adapter into the HF base the fine-tune started from."""
    out = _merge(run, tmp_path / "merged")
    record = json.loads((Path(out) / "conversion.json").read_text())
    lora = record["lora"] if "lora" in record else record["extra"]["lora"]
    assert lora["format"] == "maxtext" and lora["r"] == 4 and lora["scaling"] == [2.0]
    assert len(lora["tensors"]) == 4 * 4          # q, k, v, o of 4 layers: attention only (no expert adapters)
    tokens, expected = _logits(run)
    got = _transformers_logits(Path(out), tokens)
    assert np.abs(got - expected).max() < TOL
    base = _transformers_logits(DATA / "hf_source", tokens)
    assert np.abs(base - expected).max() > 100 * TOL      # the adapter matters: the base alone is far off


def test_maxtext_lora_needs_rank_and_alpha(tmp_path):
    with pytest.raises(InputError, match="records no rank or alpha; pass --lora-alpha and --lora-rank"):
        _merge("lora_scanned", tmp_path / "a", lora_alpha=None, lora_rank=None)
    with pytest.raises(InputError, match="pass --lora-rank"):
        _merge("lora_scanned", tmp_path / "b", lora_rank=None)
    with pytest.raises(InputError, match=r"rank 4 .* not --lora-rank 8"):
        _merge("lora_scanned", tmp_path / "c", lora_rank=8)
    assert not any(tmp_path.iterdir())


def test_maxtext_lora_says_no_expert_adapters(tmp_path):
    lines: list[str] = []
    from gptoss_convert.converters.merge_lora import merge_lora
    merge_lora(DATA / "hf_source", _root("lora_scanned"), tmp_path / "m", dtype="fp32", dry_run=True,
               lora_alpha=8.0, lora_rank=4, progress=False, log=lines.append)
    assert any("attention only, none for the experts" in line for line in lines)
    assert any("layout model_params:nnx" in line for line in lines)


@pytest.mark.parametrize("scanned", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_maxtext_lora_merge_into_orbax_base(scanned, tmp_path):
    """BASE = the Orbax params the fine-tune loaded (this project's to-orbax of hf_source, fp32):
    merged in MaxText's own layout as read, exported to HF; transformers = MaxText's LoRA forward."""
    from gptoss_convert.converters.to_orbax import to_orbax
    base = to_orbax(DATA / "hf_source", tmp_path / "base", scanned=scanned, dtype="fp32", **QUIET)
    run = "lora_scanned" if scanned else "lora_unscanned"
    out = _merge_into(base, run, tmp_path / "merged")
    record = json.loads((Path(out) / "conversion.json").read_text())
    assert record["command"] == "merge-lora" and '"format": "maxtext"' in json.dumps(record)
    tokens, expected = _logits(run)
    assert np.abs(_transformers_logits(Path(out), tokens) - expected).max() < TOL
    with pytest.raises(InputError, match="relayout the base with to-orbax"):
        _merge_into(base, "lora_unscanned" if scanned else "lora_scanned", tmp_path / "other")


@pytest.mark.parametrize("base", ["hf", "orbax"])
def test_maxtext_lora_merge_to_orbax_reproduces_maxtexts_forward(base, tmp_path):
    """merge-lora --to-orbax --unscanned of the scanned LoRA run, from the HF base and from its
    fp32 scanned Orbax conversion (merged in MaxText's layout, then relaid out): our forward on
    the Orbax output = MaxText's own forward with the adapter applied; check passes."""
    from gptoss_convert.converters.check import check
    from gptoss_convert.converters.to_orbax import to_orbax
    src = DATA / "hf_source"
    if base == "orbax":
        src = to_orbax(src, tmp_path / "base", scanned=True, dtype="fp32", **QUIET)
    out = _merge("lora_scanned", tmp_path / "merged", to_orbax=True, scanned=False, base=src)
    rec = check(out, log=lambda *_: None)
    assert rec["command"] == "merge-lora" and rec["lora"]["format"] == "maxtext" and rec["options"]["layout"]
    ck = locate(out, None)
    backend, cfg = load_config(ck)
    flat, scanned = load_params(ck, dtype=np.float32)
    assert scanned is False
    tokens, expected = _logits("lora_scanned")
    ours = np.asarray(backend.forward(unflatten(flat), jnp.asarray(tokens), cfg, moe="ragged_dot", dtype=jnp.float32))
    assert np.abs(ours - expected).max() < TOL


def _merge_into(base, run: str, out: Path) -> Path:
    from gptoss_convert.converters.merge_lora import merge_lora
    return merge_lora(base, _root(run), out, dtype="fp32", lora_alpha=8.0, lora_rank=4, **QUIET)


def _two_step_run(tmp_path: Path) -> Path:
    """A LoRA run root holding step 3 (the scanned run's adapter) and step 5 (the unscanned one's)."""
    import shutil
    root = tmp_path / "run"
    shutil.copytree(_root("lora_scanned") / "3", root / "3")
    shutil.copytree(_root("lora_unscanned") / "3", root / "5")
    return root


def _merge_cli(*args: str):
    from click.testing import CliRunner

    from gptoss_convert.cli import main
    return CliRunner().invoke(main, ["merge-lora", *map(str, args), "--lora-alpha", "8", "--lora-rank", "4",
                                     "--dtype", "fp32", "--no-progress"])


def test_merge_lora_step_and_item_choose_within_the_adapter(tmp_path):
    """--step/--item pick the MaxText ADAPTER's step and item (the HF BASE has none): the latest
    committed by default; a missing step or item, or an ambiguous item, refused in one line naming
    the option; on two HF checkpoints they are refused too."""
    root = _two_step_run(tmp_path)
    r = _merge_cli(DATA / "hf_source", root, tmp_path / "dry", "--dry-run")
    assert r.exit_code == 0 and f"{root / '5'}: layout model_params:nnx" in r.output, r.output
    r = _merge_cli(DATA / "hf_source", root, tmp_path / "dry", "--dry-run", "--step", "3", "--item", "model_params")
    assert r.exit_code == 0 and f"{root / '3'}: layout model_params:nnx" in r.output, r.output
    out = _merge_cli(DATA / "hf_source", root, tmp_path / "merged", "--step", "3")
    assert out.exit_code == 0, out.output
    tokens, expected = _logits("lora_scanned")
    assert np.abs(_transformers_logits(tmp_path / "merged", tokens) - expected).max() < TOL     # step 3's adapter
    assert np.abs(_logits("lora_unscanned")[1] - expected).max() > 100 * TOL                     # not step 5's
    (root / "3" / "items").symlink_to("model_params")      # a second params item: which one is ambiguous
    for args, msg in [(["--step", "4"], r"has no step 4 \(steps: \[3, 5\]\); pick one with --step"),
                      (["--step", "3"], r"several params items \(items, model_params\); pick one with --item"),
                      (["--step", "3", "--item", "nope"], r"has no Orbax item 'nope'.*pick one with --item")]:
        r = _merge_cli(DATA / "hf_source", root, tmp_path / "bad", *args)
        assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output
        assert re.search(msg, r.output), r.output
    r = _merge_cli(DATA / "hf_source", DATA / "hf_source", tmp_path / "bad", "--step", "3")
    assert r.exit_code != 0 and "--step: neither BASE" in r.output and "is an Orbax checkpoint" in r.output
    assert not (tmp_path / "bad").exists()


def test_cli_step_item_on_generate():
    """--step and --item are spelled the same on the commands reading an Orbax CKPT (generate here)."""
    from click.testing import CliRunner

    from gptoss_convert.cli import main
    r = CliRunner().invoke(main, ["generate", str(_root("full_unscanned")), "--like", str(DATA), "--prompt", "hi",
                                  "--max-new-tokens", "2", "--step", "3", "--item", "model_params"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["generate", str(_root("full_unscanned")), "--like", str(DATA), "--prompt", "hi",
                                  "--step", "2"])
    assert r.exit_code != 0 and "has no step 2 (steps: [3])" in r.output


def test_streamed_forward_reads_the_nnx_layout():
    """verify --streamed reads leaves through the same reader: layer by layer, MaxText's logits."""
    from gptoss_convert.verify.streamed import streamed_logits
    ck = locate(_root("full_scanned"), DATA)
    backend, cfg = load_config(ck)
    tokens, expected = _logits("full_scanned")
    got = streamed_logits(ck.orbax, cfg, True, tokens, np.ones_like(tokens), backend=backend)
    assert np.abs(np.stack(got) - expected).max() < TOL


def test_pure_nnx_train_state_nnx_aux_ignored():
    """MaxText's train state (an NNX one saved as Linen params/params + opt_state + nnx_aux):
    the layout is named and nnx_aux, opt_state, step left out."""
    src = open_orbax(Path(__file__).parent / "data" / "maxtext_train" / "checkpoints")
    assert src.layout.name == "items:params/params" and src.layout.zarr3
    assert {"nnx_aux", "opt_state", "step"} <= set(src.layout.ignored)

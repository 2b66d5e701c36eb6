"""`to-orbax` end to end: restored through MaxText's call and plain Orbax, compared bit for bit
with an independent numpy mapping (tests/hf_reference.py) of what HF transformers loads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from conftest import run_env
from gptoss_convert.backends.gpt_oss.params import flatten
from gptoss_convert.converters.to_orbax import to_orbax
from helpers import maxtext_load as _maxtext_load
from hf_reference import hf_to_maxtext

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def hf_state(mxfp4_dir):
    """What HF transformers itself loads from the MXFP4 directory (its own dequantizer)."""
    from transformers import GptOssForCausalLM, Mxfp4Config
    m = GptOssForCausalLM.from_pretrained(mxfp4_dir, dtype=torch.float32,
                                          quantization_config=Mxfp4Config(dequantize=True))
    return {k: v.detach().numpy() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def outputs(mxfp4_dir, bf16_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax")
    out = {}
    for src_name, src in (("mxfp4", mxfp4_dir), ("bf16", bf16_dir)):
        for scanned in (True, False):
            for dtype in ("bf16", "fp32"):
                if src_name == "bf16" and dtype == "fp32":
                    continue
                key = (src_name, scanned, dtype)
                out[key] = to_orbax(src, root / "-".join(map(str, key)), scanned=scanned, dtype=dtype, **QUIET)
    return out




@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_maxtext_load_matches_independent_reference(outputs, hf_state, tiny_cfg, scanned):
    ref = hf_to_maxtext(hf_state, tiny_cfg, scanned)
    got = _maxtext_load(outputs[("mxfp4", scanned, "fp32")] / "0", tiny_cfg, scanned)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        assert np.array_equal(np.signbit(got[k]), np.signbit(ref[k])), k   # -0.0 kept


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_v0_readers_and_bf16_sources_give_identical_checkpoints(outputs, hf_state, tiny_cfg, scanned):
    ref = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_to_maxtext(hf_state, tiny_cfg, scanned).items()}
    trees = []
    for src in ("mxfp4", "bf16"):
        root = outputs[(src, scanned, "bf16")]
        a = ocp.PyTreeCheckpointer().restore(root / "0" / "items")
        mgr = ocp.CheckpointManager(root, item_names=("items",))
        assert mgr.all_steps() == [0]
        b = mgr.restore(0, args=ocp.args.Composite(items=ocp.args.PyTreeRestore()))["items"]
        fa, fb = flatten(a["params"]["params"]), flatten(b["params"]["params"])
        assert fa.keys() == fb.keys() == ref.keys()
        for k in ref:
            assert np.asarray(fa[k]).dtype == ml_dtypes.bfloat16
            assert np.array_equal(np.asarray(fa[k]).view(np.uint16), ref[k].view(np.uint16)), k
            assert np.array_equal(np.asarray(fb[k]).view(np.uint16), ref[k].view(np.uint16)), k
        trees.append(fa)
    assert all(np.array_equal(np.asarray(trees[0][k]).view(np.uint16), np.asarray(trees[1][k]).view(np.uint16))
               for k in ref)


def test_zstd_chunks_restore_to_the_same_tree(outputs, mxfp4_dir, tmp_path):
    """compression="zstd" (--zstd: every chunk through TensorStore, compressed as Orbax does)
    restores to the same values as the default, whose whole chunks the writer makes itself."""
    root = to_orbax(mxfp4_dir, tmp_path / "z", scanned=True, compression="zstd", **QUIET)
    plain = outputs[("mxfp4", True, "bf16")]
    codecs = json.loads(next((root / "0" / "items").glob("*wi_0/zarr.json")).read_text())["codecs"]
    assert [c["name"] for c in codecs[0]["configuration"]["codecs"]] == ["bytes", "zstd"]
    a = flatten(ocp.PyTreeCheckpointer().restore(root / "0" / "items")["params"]["params"])
    b = flatten(ocp.PyTreeCheckpointer().restore(plain / "0" / "items")["params"]["params"])
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.asarray(a[k]).view(np.uint16), np.asarray(b[k]).view(np.uint16)), k


def test_metadata_sidecars_and_record(outputs, mxfp4_dir):
    root = outputs[("mxfp4", True, "bf16")]
    meta = json.loads((root / "0" / "_CHECKPOINT_METADATA").read_text())
    assert meta["custom_metadata"]["scan_layers"] is True
    conf = json.loads((root / "config.json").read_text())
    assert "quantization_config" not in conf and conf["model_type"] == "gpt_oss"
    rec = json.loads((root / "conversion.json").read_text())
    assert rec["command"] == "to-orbax" and rec["options"]["layout"] == "scanned"
    assert len(rec["leaves"]) == 41 and any(f.startswith("0/items/") for f in rec["outputs"])
    assert not list(root.parent.glob(".*.partial"))


def test_dry_run_writes_nothing(mxfp4_dir, tmp_path):
    lines = []
    plan = to_orbax(mxfp4_dir, tmp_path / "o", scanned=True, dry_run=True, log=lines.append)
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())
    text = "\n".join(lines)
    assert "decoder/layers/layers_1/GptOssMlp/wi_1 [5, 3, 64, 96]" in text
    assert "take[1::2] of last axis" in text and "41 target leaves" in text
    assert len(plan.targets) == 41
    largest = max(b.nbytes for b in plan.blocks)              # the memory estimate is in blocks
    assert "needs: 0.0 GB of disk for OUT" in text and f"(largest block {largest / 1e6:.0f} MB)" in text


def test_all_zero_tensor_survives(tmp_path, tiny_cfg):
    """All-zero chunks must still be written, or Orbax's restore fails on a missing chunk."""
    from gptoss_convert.io.safetensors import read_header, read_tensor, save_file
    from gptoss_convert.testing import write_checkpoint
    src = write_checkpoint(tmp_path / "src", tiny_cfg, fmt="bf16", shards=1, tokenizer=False)
    f = src / "model.safetensors"
    tensors = {n: read_tensor(t) for n, t in read_header(f)[0].items()}
    tensors["model.layers.3.mlp.experts.down_proj"] = np.zeros_like(tensors["model.layers.3.mlp.experts.down_proj"])
    tensors["model.layers.2.self_attn.sinks"] = np.zeros_like(tensors["model.layers.2.self_attn.sinks"])
    save_file(tensors, f)
    root = to_orbax(src, tmp_path / "o", scanned=True, **QUIET)
    got = flatten(ocp.PyTreeCheckpointer().restore(root / "0" / "items")["params"]["params"])
    wo = np.asarray(got["decoder/layers/layers_1/GptOssMlp/wo"])       # layer 3 = layers_1 slot 1
    assert not wo[:, 1].any() and wo[:, 0].any()
    sinks = np.asarray(got["decoder/layers/layers_0/GptOssAttention/sinks"])  # layer 2 = layers_0 slot 1
    assert not sinks[:, 1].any() and sinks[:, 0].any()


def _cli(*args, env_extra=None):
    return subprocess.run([sys.executable, "-m", "gptoss_convert", *args], capture_output=True, text=True,
                          env=run_env() | (env_extra or {}))


def _files(root):
    skip = {"_CHECKPOINT_METADATA", "conversion.json", "commit_success.txt"}   # hold timestamps / paths
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip}


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["read:7", "write:40", "journal:100", "commit:1"])
def test_sigkill_then_resume_gives_same_checkpoint(outputs, mxfp4_dir, tmp_path, kill_at):
    out = tmp_path / "o"
    r = _cli("to-orbax", str(mxfp4_dir), str(out), "--scanned", "--no-progress",
             env_extra={"GPTOSS_CONVERT_KILL_AT": kill_at})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists()                       # OUT/0 is never there half-written
    leaf = next(p for p in (tmp_path / ".o.partial" / "0" / "items").iterdir() if p.is_dir())
    for stale in ("0.gptoss-tmp", "0.__lock"):    # what a kill inside a chunk write leaves (removed on resume)
        (leaf / stale).write_bytes(b"half a chunk")
    r = _cli("to-orbax", str(mxfp4_dir), str(out), "--scanned", "--no-progress", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and "load_parameters_path=" in r.stdout
    assert _files(out) == _files(outputs[("mxfp4", True, "bf16")])
    # conversion.json: chunks hashed as they committed (this run) and re-read (the killed run's)
    r = _cli("check", str(out))
    assert r.returncode == 0 and "check: OK" in r.stdout, r.stdout + r.stderr

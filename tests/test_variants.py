"""Every gpt-oss checkpoint users bring (issue 25): the safeguard variants convert like gpt-oss; the
third-party BF16 copies (unsloth, lmsys) convert with their extra config fields; a copy whose
weights are stored wider than BF16 is named in one warning line and converts exactly as stored;
nvidia's gpt-oss-puzzle and unknown model types are refused in one line saying why and what works."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_env
from gptoss_convert.backends.gpt_oss.config import config_from_dict
from gptoss_convert.converters.dequantize import dequantize
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.errors import InputError
from gptoss_convert.io.hf_checkpoint import HFCheckpoint
from gptoss_convert.io.orbax_reader import load_params
from gptoss_convert.io.safetensors import save_file
from gptoss_convert.testing.published import VARIANTS, published_config
from gptoss_convert.testing.tiny import write_sparse_checkpoint
from gptoss_convert.tree import flatten

QUIET = dict(progress=False, log=lambda *_: None)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss_convert", *args], capture_output=True, text=True,
                          env=run_env(), timeout=600)


def leaves(root) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten(load_params(root / "0")).items()}


def assert_same_leaves(a, b):
    la, lb = leaves(a), leaves(b)
    assert sorted(la) == sorted(lb)
    for k in la:
        np.testing.assert_array_equal(la[k].view(np.uint8), lb[k].view(np.uint8), err_msg=k)


def with_config(src, dst, **fields):
    """A copy of checkpoint `src` with config.json fields set (None removes one)."""
    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text())
    for k, v in fields.items():
        conf.pop(k, None) if v is None else conf.__setitem__(k, v)
    (dst / "config.json").write_text(json.dumps(conf, indent=2))
    return dst


@pytest.fixture(scope="module")
def bf16_orbax(bf16_dir, tmp_path_factory):
    """to-orbax (unscanned, bf16) of the tiny BF16 gpt-oss: what every copy below must give."""
    return to_orbax(bf16_dir, tmp_path_factory.mktemp("ref") / "out", scanned=False, **QUIET)


# ---- gpt-oss-safeguard: the same architecture ------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_safeguard_config_reads_as_its_base(name):
    raw = published_config(name)
    assert raw["model_type"] == "gpt_oss" and raw["architectures"] == ["GptOssForCausalLM"]
    base = published_config(name.replace("-safeguard", ""))
    cfg = config_from_dict(raw, strict=True)
    assert cfg == config_from_dict(base) and cfg.unknown_fields == ()


def test_safeguard_checkpoint_converts(mxfp4_dir, bf16_orbax, tmp_path):
    """A tiny checkpoint whose config.json is safeguard-20b's (sizes changed) converts to the same tree."""
    tiny = json.loads((mxfp4_dir / "config.json").read_text())
    raw = published_config("gpt-oss-safeguard-20b")
    sizes = {k: tiny[k] for k in raw if k in tiny and tiny[k] != raw[k] and k != "quantization_config"}
    src = with_config(mxfp4_dir, tmp_path / "sg", **{k: v for k, v in raw.items() if k not in sizes} | sizes)
    r = cli("to-orbax", str(src), str(tmp_path / "out"), "--unscanned", "--no-progress", "--strict-config")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert_same_leaves(tmp_path / "out", bf16_orbax)


def test_safeguard_120b_real_shape_dry_run(tmp_path):
    src = write_sparse_checkpoint(tmp_path / "sg120", published_config("gpt-oss-safeguard-120b"), shards=15)
    r = cli("to-orbax", str(src), str(tmp_path / "out"), "--scanned", "--dry-run")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert "41 target leaves" in r.stdout


# ---- third-party BF16 copies -------------------------------------------------------------------------


# What re-uploads add: unsloth marks its copies and may restate sizes; lmsys's is a plain re-save.
UNSLOTH = dict(unsloth_fixed=True, torch_dtype="bfloat16", max_position_embeddings=131072, quantization_config=None)
LMSYS = dict(torch_dtype="bfloat16", quantization_config=None)


@pytest.mark.parametrize("fields, unknown", [(UNSLOTH, ["unsloth_fixed"]), (LMSYS, [])], ids=["unsloth", "lmsys"])
def test_bf16_copies_convert(bf16_dir, bf16_orbax, tmp_path, fields, unknown):
    src = with_config(bf16_dir, tmp_path / "copy", **fields)
    r = cli("to-orbax", str(src), str(tmp_path / "out"), "--unscanned", "--no-progress")
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning")]
    assert warned == ([f"warning: {src / 'config.json'}: unknown fields {unknown} accepted as inert (recorded in "
                       "conversion.json; --strict-config refuses them)"] if unknown else [])
    assert_same_leaves(tmp_path / "out", bf16_orbax)


@pytest.fixture(scope="module")
def f32_copy(bf16_dir, tmp_path_factory):
    """The tiny BF16 gpt-oss re-saved with its expert matrices as F32 (a copy saved in full precision)."""
    dst = tmp_path_factory.mktemp("f32") / "copy"
    shutil.copytree(bf16_dir, dst)
    ck = HFCheckpoint(dst)
    for f in ck.files:
        mine = {n: ck.read(n) for n, t in ck.tensors.items() if t.stored.file.name == f}
        save_file({n: a.astype(np.float32) if "experts" in n else a for n, a in mine.items()}, dst / f,
                  {"format": "pt"})
    return dst


def test_wider_experts_are_named_and_convert_exactly(f32_copy, bf16_orbax, tmp_path, caplog):
    """F32 experts: one warning line naming how many and one of them; to-orbax bf16 rounds them to
    nearest even (here exact: they were BF16 values), fp32 keeps them exact; dequantize copies them."""
    with caplog.at_level(logging.WARNING):
        HFCheckpoint(f32_copy)
    lines = [r.getMessage() for r in caplog.records if "not BF16" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert (lines[0].startswith(f"warning: {f32_copy}: 24 of ")
            and "stored as F32, not BF16 (e.g. 'model.layers." in lines[0])
    assert_same_leaves(to_orbax(f32_copy, tmp_path / "bf16", scanned=False, **QUIET), bf16_orbax)
    exact = leaves(to_orbax(f32_copy, tmp_path / "fp32", scanned=False, dtype="fp32", **QUIET))
    ck = HFCheckpoint(f32_copy)
    np.testing.assert_array_equal(exact["decoder/layers_1/GptOssMlp/wo"],
                                  ck.read("model.layers.1.mlp.experts.down_proj"))
    out = dequantize(f32_copy, tmp_path / "deq", **QUIET)
    assert HFCheckpoint(out).tensors["model.layers.0.mlp.experts.down_proj"].dtype == "F32"


# ---- refused: gpt-oss-puzzle and unknown model types ----------------------------------------------


# nvidia/gpt-oss-puzzle-88B's distinguishing fields: heterogeneous layers described per block.
PUZZLE = dict(model_type="gpt_oss_puzzle", architectures=["GptOssPuzzleForCausalLM"],
              block_configs=[{"attention": {"window_length": w}, "ffn": {"moe": {"num_local_experts": e}}}
                             for w, e in [(128, 128), (8192, 64), (None, 128), (128, 64), (8192, 128), (None, 64)]])


@pytest.mark.parametrize("command", ["to-orbax", "dequantize"])
def test_puzzle_is_refused_in_one_line(mxfp4_dir, tmp_path, command):
    src = with_config(mxfp4_dir, tmp_path / "puzzle", **PUZZLE)
    r = cli(command, str(src), str(tmp_path / "out"), "--no-progress",
            *(["--scanned"] if command == "to-orbax" else []))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    assert line.startswith("error: model_type 'gpt_oss_puzzle' is not supported: nvidia/gpt-oss-puzzle-88B's layers")
    assert "cannot be stacked into one scanned MaxText layer" in line and "openai/gpt-oss-20b/120b" in line
    assert not (tmp_path / "out").exists()


def test_unknown_model_type_lists_the_supported_ones(mxfp4_dir, tmp_path):
    src = with_config(mxfp4_dir, tmp_path / "llama", model_type="llama")
    with pytest.raises(InputError, match=r"model_type 'llama' is not supported; known model types: gpt_oss, qwen3_moe"):
        to_orbax(src, tmp_path / "out", scanned=True, **QUIET)

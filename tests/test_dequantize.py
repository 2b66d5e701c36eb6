"""`dequantize` against the independent oracles: HF's MXFP4 loader and GptOssForCausalLM."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
import torch
from safetensors.torch import load_file

from conftest import run_env
from gptoss_convert.converters.dequantize import dequantize
from gptoss_convert.errors import ConvertError


def _load_all(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "conversion.json"}


@pytest.fixture(scope="module")
def converted(mxfp4_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("deq") / "bf16"
    dequantize(mxfp4_dir, out, max_shard_size="200KB", progress=False, log=lambda *_: None)
    return out


def test_loads_in_transformers_without_key_warnings(converted, caplog):
    from transformers import GptOssForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        model, info = GptOssForCausalLM.from_pretrained(converted, dtype=torch.float32, output_loading_info=True)
    # the whole loading report is empty: nothing missing, unexpected, mismatched or failed
    assert {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"} <= set(info)
    assert {k: v for k, v in info.items() if v} == {}
    assert not [r for r in caplog.records
                if "missing" in r.getMessage().lower() or "unexpected" in r.getMessage().lower()]


def test_logits_bit_identical_to_hf_mxfp4_loader(converted, mxfp4_dir):
    from transformers import GptOssForCausalLM, Mxfp4Config
    ours = GptOssForCausalLM.from_pretrained(converted, dtype=torch.float32)
    ref = GptOssForCausalLM.from_pretrained(mxfp4_dir, dtype=torch.float32,
                                            quantization_config=Mxfp4Config(dequantize=True))
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens).logits, ref(tokens).logits
    assert torch.equal(a, b)
    # and every parameter is bit-identical (expert matrices included)
    sa, sb = ours.state_dict(), ref.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_expert_tensors_match_hf_dequantizer_and_rest_copied(converted, mxfp4_dir):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    src, out = _load_all(mxfp4_dir), _load_all(converted)
    assert set(out) == {k.removesuffix("_blocks") for k in src if not k.endswith("_scales")}
    for name, t in out.items():
        if name + "_blocks" in src:
            ref = convert_moe_packed_tensors(src[name + "_blocks"], src[name + "_scales"], dtype=torch.bfloat16)
            assert t.dtype == torch.bfloat16 and t.shape == ref.shape, name
            assert torch.equal(t.view(torch.int16), ref.view(torch.int16)), name
        else:
            assert torch.equal(t.view(torch.uint8) if t.dtype == torch.uint8 else t.view(torch.int16),
                               src[name].view(torch.int16)), name
    e = out["model.layers.0.mlp.experts.gate_up_proj"]
    assert tuple(e.shape) == (5, 64, 192)   # [E, H, 2I], distinct dims


def test_metadata_files(converted, mxfp4_dir):
    conf = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in conf and conf["dtype"] == "bfloat16"
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((converted / s).is_file() for s in shards)
    total = sum(t.numel() * t.element_size() for t in _load_all(converted).values())
    assert index["metadata"]["total_size"] == total
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (converted / f).read_bytes() == (mxfp4_dir / f).read_bytes()
    rec = json.loads((converted / "conversion.json").read_text())
    assert rec["command"] == "dequantize"
    for f, meta in rec["outputs"].items():              # the xxhash package over the whole file
        assert xxhash.xxh3_128((converted / f).read_bytes()).hexdigest() == meta["xxh3_128"], f
    for f, meta in rec["source"]["files"].items():      # a plain directory, not a hub cache
        assert xxhash.xxh3_128((mxfp4_dir / f).read_bytes()).hexdigest() == meta["xxh3_128"], f
    assert not list(converted.parent.glob(".*partial")) and not list(converted.parent.glob(".*lock"))


def test_fp32_output(mxfp4_dir, converted, tmp_path):
    out = dequantize(mxfp4_dir, tmp_path / "f32", dtype="fp32", progress=False, log=lambda *_: None)
    a, b = _load_all(out), _load_all(converted)
    for k in b:
        assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k].float()), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_bf16_source_passes_through_bit_for_bit(bf16_dir, converted, tmp_path):
    out = dequantize(bf16_dir, tmp_path / "o", progress=False, log=lambda *_: None)
    a, b = _load_all(out), _load_all(converted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_out_refused_then_overwrite(mxfp4_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConvertError, match="already exists.*--overwrite"):
        dequantize(mxfp4_dir, out, progress=False, log=lambda *_: None)
    assert (out / "keep").read_text() == "x"
    dequantize(mxfp4_dir, out, overwrite=True, progress=False, log=lambda *_: None)
    assert not (out / "keep").exists() and (out / "config.json").exists()


def _cli(*args, env_extra=None, check=False):
    env = run_env() | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "gptoss_convert", *args], capture_output=True, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["write:3", "journal:2", "commit:1"])
def test_sigkill_then_resume_is_byte_identical(mxfp4_dir, converted, tmp_path, kill_at):
    out = tmp_path / "o"
    r = _cli("dequantize", str(mxfp4_dir), str(out), "--max-shard-size", "200KB", "--no-progress",
             env_extra={"GPTOSS_CONVERT_KILL_AT": kill_at})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists()                                  # never a complete-looking partial
    r = _cli("dequantize", str(mxfp4_dir), str(out), "--max-shard-size", "200KB", "--no-progress", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert _tree_bytes(out) == _tree_bytes(converted)


def test_cli_error_is_one_line_and_src_untouched(mxfp4_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(mxfp4_dir, src)
    before = _tree_bytes(src)
    (tmp_path / "exists").mkdir()
    r = _cli("dequantize", str(src), str(tmp_path / "exists"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "exists" in r.stderr and "Traceback" not in r.stderr
    assert _tree_bytes(src) == before

"""The streamed golden (transformers' layers one at a time, verify/hf_streamed.py) against the
whole-model golden, on the tiny models of both families; `--tokens`, expert coverage, output
paths checked before any work, dtype aliases and progress lines of golden/verify (issues 21, 24).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import run_env
from family_cases import CASES
from gptoss_convert.cli import main
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.errors import InputError, OutputError, VerifyFailed
from gptoss_convert.io.orbax_reader import load_params
from gptoss_convert.verify import hf_streamed
from gptoss_convert.verify.golden import golden, golden_records, read_golden, read_tokens
from gptoss_convert.verify.verify import verify

QUIET = dict(progress=False, log=lambda *_: None, overwrite=True)
SHORT = "I love to;Today is a;What is the;The river rose slowly through the night, and by morning the lower " \
        "streets of the old town were under a hand's depth of brown water."


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return CASES["qwen3_moe"].write_tiny(tmp_path_factory.mktemp("qwen3") / "hf")


@pytest.fixture(scope="module")
def qwen3_no_tokenizer(qwen3_dir, tmp_path_factory):
    """The transformers-saved Qwen3-MoE without its tokenizer files (weights and config only)."""
    d = tmp_path_factory.mktemp("qwen3-notok") / "hf"
    d.mkdir()
    for f in [*qwen3_dir.glob("*.safetensors"), *qwen3_dir.glob("*.json")]:
        if "token" not in f.name:
            (d / f.name).write_bytes(f.read_bytes())
    return d


@pytest.fixture(scope="module")
def qwen3_orbax(qwen3_dir, tmp_path_factory):
    return to_orbax(qwen3_dir, tmp_path_factory.mktemp("qwen3-out") / "orbax", scanned=True, dtype="fp32", **QUIET)


@pytest.fixture(scope="module")
def gpt_orbax(mxfp4_dir, tmp_path_factory):
    return to_orbax(mxfp4_dir, tmp_path_factory.mktemp("gpt-out") / "orbax", scanned=False, dtype="fp32", **QUIET)


# ---- the streamed golden equals the whole-model golden ------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("source", ["mxfp4_dir", "bf16_dir", "qwen3_dir"])
def test_streamed_golden_bit_for_bit(source, dtype, request, tmp_path):
    """Same file, byte for byte (so the same fp32 logits bit for bit), whole model vs layer by
    layer: gpt-oss MXFP4 (transformers' dequantizer), gpt-oss BF16, Qwen3-MoE (per-expert tensors
    fused by transformers' conversion ops); fp32 and bf16 compute."""
    src = request.getfixturevalue(source)
    whole = golden(src, tmp_path / "whole.jsonl", prompts=SHORT, dtype=dtype, streamed=False, log=lambda *_: None)
    lines: list[str] = []
    streamed = golden(src, tmp_path / "streamed.jsonl", prompts=SHORT, dtype=dtype, streamed=True, log=lines.append)
    assert streamed.read_bytes() == whole.read_bytes()
    recs = read_golden(streamed)
    assert [len(r["tokens"]) for r in recs][:3] == [len(r["tokens"]) for r in read_golden(whole)][:3]
    assert all(np.ptp(r["logits"], axis=-1).min() > 0 for r in recs)   # real logits, not constant rows
    assert "every expert of every layer" in lines[0]


def test_streamed_logits_free_each_layer(mxfp4_dir):
    """After the run every decoder layer is back on the meta device (its weights freed)."""
    import torch
    seen = []
    orig = hf_streamed.LayerLoader.free

    def free(module):
        orig(module)
        seen.append(all(p.device == torch.device("meta") for p in module.parameters()))
    hf_streamed.LayerLoader.free = staticmethod(free)
    try:
        logits, hit = hf_streamed.streamed_logits(mxfp4_dir, [[1, 2, 3, 4]], show_progress=False)
    finally:
        hf_streamed.LayerLoader.free = staticmethod(orig)
    assert len(seen) == 6 + 3 and all(seen)        # embedding, 6 layers, norm, LM head
    assert logits[0].shape == (4, 300) and len(hit) == 6


# ---- tokens, tokenizer-less checkpoints, coverage ----------------------------------------------

def test_tokenizerless_qwen3_refused_naming_tokens(qwen3_orbax, qwen3_no_tokenizer):
    """transformers 5 builds an empty tokenizer for this folder (it returns no ids): refused with
    a one-line error naming --tokens, exit 2, not a reshape crash inside transformers."""
    res = CliRunner().invoke(main, ["verify", str(qwen3_orbax), "--hf", str(qwen3_no_tokenizer), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "--tokens FILE" in res.output and str(qwen3_no_tokenizer) in res.output
    assert "reshape" not in res.output


def test_tokens_file_verify_and_golden(qwen3_orbax, qwen3_no_tokenizer, qwen3_dir, tmp_path):
    """--tokens runs without a tokenizer; the ids are used as given (same logits as the prompts'
    ids through the tokenizer)."""
    ids = [[5, 17, 42], list(range(1, 80))]
    toks = tmp_path / "tokens.json"
    toks.write_text(json.dumps(ids))
    report = verify(qwen3_orbax, hf=qwen3_no_tokenizer, tokens=toks, json_report=tmp_path / "r.json",
                    show_progress=False, log=lambda *_: None)
    assert report["pass"] and [r["tokens"] for r in report["prompts"]] == [3, 79]
    assert max(r["max_abs_diff"] for r in report["prompts"]) < 1e-4
    res = CliRunner().invoke(main, ["golden", str(qwen3_no_tokenizer), "--out", str(tmp_path / "g.jsonl"),
                                    "--tokens", str(toks), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert [r["tokens"] for r in read_golden(tmp_path / "g.jsonl")] == ids


@pytest.mark.parametrize("content, match", [("[[1, 2], []]", "non-empty"), ('{"a": 1}', "JSON list"),
                                            ("[[1, 2.5]]", "token ids"), ("[[1, 999]]", "vocab_size 300"),
                                            ("[[1,", "cannot read")])
def test_bad_tokens_file(content, match, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        read_tokens(path, 300)
    assert str(path) in str(e.value)


def test_tokens_with_prompts_or_golden_file_refused(mxfp4_dir, gpt_orbax, tmp_path):
    toks = tmp_path / "t.json"
    toks.write_text("[[1, 2]]")
    with pytest.raises(InputError, match="not both"):
        golden(mxfp4_dir, tmp_path / "g.jsonl", prompts="a", tokens=toks)
    (tmp_path / "g.jsonl").write_text("")
    with pytest.raises(InputError, match="has its own tokens"):
        verify(gpt_orbax, golden=tmp_path / "g.jsonl", tokens=toks)


def test_coverage_every_expert_by_default(gpt_orbax, mxfp4_dir, tmp_path):
    """The default prompts route every expert of every layer (tiny model: 5 experts x 6 layers),
    counted by our streamed forward (experts read) and by transformers' router alike."""
    report = verify(gpt_orbax, hf=mxfp4_dir, streamed=True, json_report=tmp_path / "r.json", show_progress=False,
                    log=lambda *_: None)
    for cov in (report["coverage"], report["golden_coverage"]):
        assert cov["per_layer"] == [5] * 6 and cov["hit"] == cov["total"] == 30 and not cov["missing"]
    assert json.loads((tmp_path / "r.json").read_text())["coverage"]["summary"].startswith("expert coverage")
    for phase in ("golden", "forward"):
        assert report["phases"][phase]["seconds"] > 0 and report["phases"][phase]["peak_rss_GiB"] > 0.1


def test_coverage_reports_missing_experts(mxfp4_dir):
    """One token routes top-3 of 5 experts per layer: coverage says which are missing."""
    (rec,), cov = golden_records(Path(mxfp4_dir), [("one", [7])], show_progress=False)
    assert cov["per_layer"] == [3] * 6 and cov["hit"] == 18 and cov["total"] == 30
    assert len(cov["missing"]) == 6 and all(len(m) == 2 for m in cov["missing"].values())
    assert "6 layer(s) miss experts" in cov["summary"]


def test_corrupted_expert_cannot_pass_unseen(gpt_orbax, mxfp4_dir, tmp_path):
    """The last expert of the last layer scaled by 1.5 in an otherwise correct output (plain
    numpy, written back with OrbaxWriter): the default prompts route tokens to it, so verify FAILs."""
    from gptoss_convert.backends.gpt_oss.params import flatten
    from helpers import write_orbax
    flat = {k: np.asarray(v) for k, v in flatten(load_params(gpt_orbax / "0")).items()}
    wo = "decoder/layers_5/GptOssMlp/wo"
    flat[wo] = flat[wo].copy()
    flat[wo][-1] *= 1.5
    broken = write_orbax(tmp_path / "broken", flat, gpt_orbax, scanned=False)
    with pytest.raises(VerifyFailed):
        verify(broken, hf=mxfp4_dir, streamed=True, show_progress=False, log=lambda *_: None)


# ---- issue 21: outputs checked first, dtype aliases, progress -----------------------------------

def test_unwritable_outputs_refused_before_work(gpt_orbax, mxfp4_dir, tmp_path):
    """golden --out and verify --json in a missing folder: exit 3 naming the path, before any
    model is loaded (no progress line, no PASS)."""
    env = run_env() | {"GPTOSS_CONVERT_PROGRESS_EVERY": "0"}
    for args, path in ((["golden", str(mxfp4_dir), "--out", "/nonexistent/dir/g.jsonl"], "/nonexistent/dir/g.jsonl"),
                       (["verify", str(gpt_orbax), "--hf", str(mxfp4_dir), "--json", "/nonexistent/r.json"],
                        "--json /nonexistent/r.json")):
        proc = subprocess.run([sys.executable, "-m", "gptoss_convert", *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 3, proc.stderr
        assert f"error: {path}" in proc.stderr and "[progress]" not in proc.stderr and "PASS" not in proc.stdout
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        golden(mxfp4_dir, tmp_path / "adir")


def test_dtype_aliases(mxfp4_dir, tmp_path):
    runner = CliRunner()
    outs = {}
    for dt in ("bf16", "bfloat16", "fp32", "float32"):
        res = runner.invoke(main, ["golden", str(mxfp4_dir), "--out", str(tmp_path / f"{dt}.jsonl"), "--prompts",
                                   "I love to", "--dtype", dt, "--no-progress"])
        assert res.exit_code == 0, res.output
        outs[dt] = (tmp_path / f"{dt}.jsonl").read_bytes()
    assert outs["bf16"] == outs["bfloat16"] and outs["fp32"] == outs["float32"] and outs["bf16"] != outs["fp32"]
    res = runner.invoke(main, ["golden", str(mxfp4_dir), "--out", str(tmp_path / "x.jsonl"), "--dtype", "fp16"])
    assert res.exit_code == 2 and "fp16" in res.output


def test_progress_lines_when_not_a_terminal(gpt_orbax, mxfp4_dir, tmp_path):
    """golden and verify through the CLI with stderr a pipe: [progress] lines for the model load
    or each layer and each prompt; none with --no-progress."""
    env = run_env() | {"GPTOSS_CONVERT_PROGRESS_EVERY": "0"}
    runs = {"golden": ["golden", str(mxfp4_dir), "--out", str(tmp_path / "g.jsonl"), "--prompts", "I love to;Today"],
            "golden-streamed": ["golden", str(mxfp4_dir), "--out", str(tmp_path / "s.jsonl"), "--prompts", "I love",
                                "--streamed"],
            "verify": ["verify", str(gpt_orbax), "--hf", str(mxfp4_dir), "--prompts", "I love to;Today", "--streamed"]}
    expect = {"golden": ["golden: loading the whole model", "golden: transformers, whole model: 2/2"],
              "golden-streamed": ["golden: embedding", "golden: transformers layers: 6/6", "final norm and LM head"],
              "verify": ["golden:", "verify: our forward, layer by layer: 6/6", "verify: comparing: 2/2"]}
    for name, args in runs.items():
        for quiet in (False, True):
            flags = ["--no-progress"] if quiet else []
            proc = subprocess.run([sys.executable, "-m", "gptoss_convert", *args, *flags],
                                  capture_output=True, text=True, env=env)
            assert proc.returncode == 0, proc.stderr
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[progress] ")]
            if quiet:
                assert not lines, lines
            else:
                for want in expect[name]:
                    assert any(want in ln for ln in lines), (want, lines)

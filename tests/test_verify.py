"""golden -> verify on tiny models (docs/verification.md): the golden file, round trips for both layouts
and every MoE strategy, the CLI (report, table, exit codes), bad golden files, and negative
controls — deliberately broken conversions from docs/pitfalls.md that verify must FAIL.

Cost control: most checks share one short golden file, so every in-process `verify` on a tree
of the same structure reuses one jit compilation; the long default golden is verified once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from conftest import run_env
from gptoss_convert.backends.gpt_oss.params import flatten
from gptoss_convert.cli import main
from gptoss_convert.converters.dequantize import dequantize
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.errors import InputError, VerifyFailed
from gptoss_convert.io.orbax_reader import load_params
from gptoss_convert.io.orbax_writer import OrbaxWriter
from gptoss_convert.testing import tiny_config, write_checkpoint
from gptoss_convert.verify.golden import golden, read_golden
from gptoss_convert.verify.prompts import DEFAULT_PROMPTS, LONG_PASSAGE
from gptoss_convert.verify.verify import verify

QUIET = dict(progress=False, log=lambda *_: None, overwrite=True)
# MaxText's three prompts and one sentence long enough (~70 tiny-tokenizer tokens) to cross the
# tiny model's 5-token sliding window many times over.
LONG_SENTENCE = ("The river rose slowly through the night, and by morning the lower streets of the old town "
                 "were under a hand's depth of brown water.")
SHORT = ";".join([*DEFAULT_PROMPTS, LONG_SENTENCE])
EXACT = dict(max_abs=1e-4, kl=1e-6)         # fp32-stored checkpoint vs fp32 HF (docs/forward.md §4)


def worst(report: dict) -> dict:
    """The worst per-prompt figures of a verify report."""
    rows = report["prompts"]
    return {"max_abs": max(r["max_abs_diff"] for r in rows), "max_kl": max(r["max_kl"] for r in rows),
            "top1": min(r["top1_agreement"] for r in rows)}


def run_verify(ckpt, golden_file, tmp: Path, *, expect_pass: bool, **kw) -> dict:
    """In-process verify; asserts the verdict (VerifyFailed on FAIL) and returns the JSON report."""
    tmp.mkdir(parents=True, exist_ok=True)
    report = tmp / f"report-{len(list(tmp.glob('report-*.json')))}.json"
    lines: list[str] = []
    if expect_pass:
        ret = verify(ckpt, golden=golden_file, json_report=report, log=lines.append, **kw)
        assert ret["pass"] and lines[-1].startswith("verify: PASS")
    else:
        with pytest.raises(VerifyFailed, match="FAIL against the golden logits"):
            verify(ckpt, golden=golden_file, json_report=report, log=lines.append, **kw)
    data = json.loads(report.read_text())
    assert data["pass"] is expect_pass
    return data


def assert_exact(report: dict) -> None:
    w = worst(report)
    print(f"PASS {report['checkpoint']} ({report['layout']}, {report['moe']}): {w}")    # figures, with -s
    assert w["max_abs"] < EXACT["max_abs"] and w["max_kl"] < EXACT["kl"] and w["top1"] == 1.0, w


def assert_far_off(report: dict) -> None:
    """A FAIL that is not a near miss: some prompt's top-1 agreement or KL is far off."""
    w = worst(report)
    print(f"FAIL {report['checkpoint']}: {w}")
    assert w["top1"] < 0.9 or w["max_kl"] > 1e-2, w


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("verify")


@pytest.fixture(scope="module")
def golden_default(mxfp4_dir, work):
    """MaxText's three prompts + the long passage, fp32 (the defaults of `golden`)."""
    return golden(mxfp4_dir, work / "golden-default.jsonl", log=lambda *_: None)


@pytest.fixture(scope="module")
def golden_short(mxfp4_dir, work):
    return golden(mxfp4_dir, work / "golden-short.jsonl", prompts=SHORT, log=lambda *_: None)


@pytest.fixture(scope="module")
def orbax_fp32(mxfp4_dir, work):
    """Correct fp32-stored to-orbax outputs of the tiny MXFP4 model, both layouts."""
    return {layout: to_orbax(mxfp4_dir, work / f"orbax-{layout}-fp32", scanned=layout == "scanned", dtype="fp32",
                             **QUIET) for layout in ("scanned", "unscanned")}


@pytest.fixture(scope="module")
def orbax_bf16(mxfp4_dir, work):
    """The default (bf16-stored) unscanned output."""
    return to_orbax(mxfp4_dir, work / "orbax-unscanned-bf16", scanned=False, **QUIET)


@pytest.fixture(scope="module")
def hf_bf16(mxfp4_dir, work):
    """`dequantize` output: an HF BF16 directory that verify reads directly."""
    return dequantize(mxfp4_dir, work / "hf-bf16", **QUIET)


@pytest.fixture(scope="module")
def flat_unscanned(orbax_fp32):
    """The correct unscanned fp32 params {path: numpy}, read back from the checkpoint."""
    return {k: np.asarray(v) for k, v in flatten(load_params(orbax_fp32["unscanned"] / "0")).items()}


# ---- golden -----------------------------------------------------------------------------------


def test_golden_default_file_format(golden_default, tiny_cfg):
    """One JSON line per prompt, {"prompt", "tokens", "logits" [T][V] fp32}; MaxText's three
    prompts and a long passage that crosses the sliding window many times."""
    lines = golden_default.read_text().splitlines()
    recs = [json.loads(ln) for ln in lines]
    assert [r["prompt"] for r in recs] == [*DEFAULT_PROMPTS, LONG_PASSAGE]
    for r in recs:
        assert set(r) == {"prompt", "tokens", "logits"}
        assert r["tokens"] and all(isinstance(t, int) and 0 <= t < tiny_cfg.V for t in r["tokens"])
        logits = np.asarray(r["logits"], np.float64)
        assert logits.shape == (len(r["tokens"]), tiny_cfg.V)
        np.testing.assert_array_equal(logits, logits.astype(np.float32))     # fp32 values, written exactly
    assert len(recs[-1]["tokens"]) > tiny_cfg.sliding_window * 10


def test_golden_prompts_options(mxfp4_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "g.jsonl"
    res = runner.invoke(main, ["golden", str(mxfp4_dir), "--out", str(out), "--prompts", "I love to; Today is a;"])
    assert res.exit_code == 0, res.output
    assert [json.loads(ln)["prompt"] for ln in out.read_text().splitlines()] == ["I love to", "Today is a"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("What is the\n\nI love to read books about the sea, every day\n")
    res = runner.invoke(main, ["golden", str(mxfp4_dir), "--out", str(out), "--prompts-file", str(pf)])
    assert res.exit_code == 0, res.output
    assert [json.loads(ln)["prompt"] for ln in out.read_text().splitlines()] == [
        "What is the", "I love to read books about the sea, every day"]
    assert not out.with_name(out.name + ".tmp").exists()


def test_golden_equals_transformers_directly(golden_short, bf16_dir):
    """Independent check: transformers itself, fp32 eager, on the BF16 twin written by the test
    generator (not by our dequantize), gives the golden file's tokens and logits."""
    tok = transformers.AutoTokenizer.from_pretrained(bf16_dir)
    model = transformers.GptOssForCausalLM.from_pretrained(
        bf16_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()
    for rec in read_golden(golden_short):
        assert rec["tokens"] == tok(rec["prompt"])["input_ids"]
        with torch.no_grad():
            ref = model(torch.tensor([rec["tokens"]])).logits[0].numpy()
        np.testing.assert_allclose(rec["logits"], ref, atol=1e-5, rtol=0)


def test_golden_mxfp4_equals_dequantized_bf16(golden_short, hf_bf16, tmp_path):
    """HF dequantizes MXFP4 on load exactly as `dequantize` does: the two goldens agree."""
    g = golden(hf_bf16, tmp_path / "g.jsonl", prompts=SHORT, log=lambda *_: None)
    for a, b in zip(read_golden(golden_short), read_golden(g), strict=True):
        assert a["prompt"] == b["prompt"] and a["tokens"] == b["tokens"]
        np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5, rtol=0)


def test_golden_bf16_dtype(mxfp4_dir, golden_short, tmp_path):
    """--dtype bfloat16 computes in bf16 (weights loaded as bf16, not cast after loading):
    the file still holds fp32 logits, close to but not equal to the fp32 golden."""
    res = CliRunner().invoke(main, ["golden", str(mxfp4_dir), "--out", str(tmp_path / "g.jsonl"),
                                    "--prompts", SHORT, "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    diffs, agree = [], []
    for a, b in zip(read_golden(golden_short), read_golden(tmp_path / "g.jsonl"), strict=True):
        assert a["tokens"] == b["tokens"] and b["logits"].dtype == np.float32
        diffs.append(np.abs(a["logits"] - b["logits"]).max())
        agree.append((a["logits"].argmax(-1) == b["logits"].argmax(-1)).mean())
    assert 1e-3 < max(diffs) < 1.0, diffs
    assert min(agree) >= 0.8, agree


def test_maxtext_written_golden_is_accepted(bf16_dir, orbax_fp32, golden_short, tmp_path):
    """A file written as MaxText's generate_hf_golden_logits writes it (jsonlines of
    {"prompt", "tokens", "logits"} from `tokenizer.encode` and an fp32 model; no code of ours)
    verifies a correct checkpoint."""
    tok = transformers.AutoTokenizer.from_pretrained(bf16_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        bf16_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    path = tmp_path / "golden_maxtext.jsonl"
    with open(path, "w") as f:
        for prompt in SHORT.split(";"):
            ids = tok.encode(prompt, return_tensors="pt")
            with torch.no_grad():
                logits = model(ids).logits.cpu().numpy().astype("float32")
            f.write(json.dumps({"prompt": prompt, "tokens": ids.tolist()[0], "logits": logits.tolist()[0]}) + "\n")
    assert_exact(run_verify(orbax_fp32["unscanned"], path, tmp_path, expect_pass=True))


# ---- verify: round trips ------------------------------------------------------------------------

# megablox compiles slowly in interpret mode on CPU: one layout is enough.
ROUND_TRIPS = [(layout, moe) for layout in ("scanned", "unscanned") for moe in ("ragged_dot", "dense")] + [
    pytest.param("scanned", "megablox", marks=pytest.mark.slow)]


@pytest.mark.parametrize("layout, moe", ROUND_TRIPS)
def test_round_trip_fp32(orbax_fp32, golden_short, work, layout, moe):
    report = run_verify(orbax_fp32[layout], golden_short, work / f"rt-{layout}-{moe}", expect_pass=True, moe=moe)
    assert (report["kind"], report["layout"], report["moe"]) == ("orbax", layout, moe)
    assert_exact(report)


def test_round_trip_default_golden(orbax_fp32, golden_default, work):
    """The long passage too: sliding window and RoPE far from position 0, fp32-exact."""
    report = run_verify(orbax_fp32["scanned"], golden_default, work / "rt-default", expect_pass=True)
    assert [r["prompt"] for r in report["prompts"]] == [*DEFAULT_PROMPTS, LONG_PASSAGE]
    assert_exact(report)


def test_round_trip_hf_bf16_dir(hf_bf16, golden_short, work):
    report = run_verify(hf_bf16, golden_short, work / "rt-hf", expect_pass=True)
    assert report["kind"] == "hf"
    assert_exact(report)


def test_bf16_checkpoint_passes_upstream_thresholds(orbax_bf16, golden_short, work):
    """The default bf16-stored output passes the upstream 20b thresholds (the tiny model's
    weights are bf16 numbers, so storing them in bf16 loses nothing)."""
    report = run_verify(orbax_bf16, golden_short, work / "rt-bf16", expect_pass=True)
    assert report["thresholds"] == {"atol": 0.1, "rtol": 0.1, "max_kl": 3e-4}


def test_report_and_table(orbax_fp32, golden_short, tmp_path):
    lines: list[str] = []
    rp = tmp_path / "r.json"
    ret = verify(orbax_fp32["scanned"], golden=golden_short, json_report=rp, log=lines.append)
    report = json.loads(rp.read_text())
    assert report == json.loads(json.dumps(ret))
    assert set(report) == {"checkpoint", "kind", "layout", "moe", "thresholds", "prompts", "coverage",
                           "golden_coverage", "phases", "pass"}
    assert report["coverage"] is None and set(report["phases"]) == {"golden", "forward"}    # in memory, from a file
    assert report["checkpoint"] == str(orbax_fp32["scanned"] / "0") and report["layout"] == "scanned"
    recs = read_golden(golden_short)
    assert [r["prompt"] for r in report["prompts"]] == [r["prompt"] for r in recs]
    for row, rec in zip(report["prompts"], recs):
        assert set(row) == {"prompt", "tokens", "max_abs_diff", "mean_kl", "max_kl", "top1_agreement",
                            "top5_overlap", "allclose_fraction", "pass"}
        assert row["tokens"] == len(rec["tokens"]) and row["pass"] and row["allclose_fraction"] == 1.0
    table = lines[0].splitlines()
    assert "max|Δ|" in table[0] and "verdict" in table[0]
    assert len(table) == 2 + len(recs) + 1 and all(ln.rstrip().endswith("PASS") for ln in table[2:-1])
    assert table[-1] == "thresholds: atol=0.1 rtol=0.1 max_kl=0.0003"


def test_hf_on_the_fly_equals_golden_file(orbax_fp32, mxfp4_dir, golden_short, work):
    from_file = run_verify(orbax_fp32["unscanned"], golden_short, work / "fly", expect_pass=True)
    lines: list[str] = []
    on_the_fly = verify(orbax_fp32["unscanned"], hf=mxfp4_dir, prompts=SHORT, log=lines.append)
    assert on_the_fly["prompts"] == from_file["prompts"]


def test_skip_first_token(orbax_fp32, golden_short, tmp_path):
    """A golden whose first position is off (e.g. a BOS logit the reference handles differently)
    FAILs, and passes with --skip-first-token, which drops position 0 from every prompt."""
    recs = [json.loads(ln) for ln in golden_short.read_text().splitlines()]
    for r in recs:
        r["logits"][0] = [x + 3.0 * (i % 2) for i, x in enumerate(r["logits"][0])]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    failed = run_verify(orbax_fp32["unscanned"], path, tmp_path, expect_pass=False)
    assert [r["pass"] for r in failed["prompts"]] == [False] * len(recs)
    passed = run_verify(orbax_fp32["unscanned"], path, tmp_path, expect_pass=True, skip_first_token=True)
    assert [r["tokens"] for r in passed["prompts"]] == [len(r["tokens"]) - 1 for r in recs]
    assert_exact(passed)


# ---- verify: the CLI --------------------------------------------------------------------------


def test_cli_pass_exit_0_table_and_json(orbax_fp32, golden_short, tmp_path):
    rp = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["verify", str(orbax_fp32["unscanned"]), "--golden", str(golden_short),
                                    "--moe", "dense", "--json", str(rp)])
    assert res.exit_code == 0, res.output
    assert "max|Δ|" in res.stdout and res.stdout.count("PASS") >= len(SHORT.split(";")) + 1
    assert "verify: PASS (orbax, unscanned, moe=dense, 4 prompts)" in res.stdout
    summary = json.loads(rp.read_text())         # the common --json schema; the report is its result
    assert {k: summary[k] for k in ("command", "ok", "exit_code", "error")} == \
        {"command": "verify", "ok": True, "exit_code": 0, "error": None}
    assert summary["result"]["pass"] is True and len(summary["result"]["prompts"]) == 4


def test_cli_tight_atol_fails_bf16_checkpoint_exit_4(orbax_bf16, golden_short, tmp_path):
    """Thresholds are the verdict: an absurd --atol 1e-12 --rtol 0 FAILs a checkpoint that passes
    the defaults (test_bf16_checkpoint_passes_upstream_thresholds); a real subprocess, exit 4."""
    rp = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "gptoss_convert", "verify", str(orbax_bf16), "--golden",
                           str(golden_short), "--atol", "1e-12", "--rtol", "0", "--json", str(rp)],
                          env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 4, proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "FAIL against the golden logits" in err[0], proc.stderr
    assert "FAIL" in proc.stdout and "thresholds: atol=1e-12 rtol=0.0" in proc.stdout
    summary = json.loads(rp.read_text())
    assert summary["ok"] is False and summary["exit_code"] == 4 and "FAIL against the golden" in summary["error"]
    report = summary["result"]
    assert report["pass"] is False and report["thresholds"]["atol"] == 1e-12
    assert all(r["allclose_fraction"] < 1.0 for r in report["prompts"])
    assert worst(report)["max_abs"] < EXACT["max_abs"]      # the checkpoint is right; only the bar moved


def _bad_vocab(recs, V):
    recs[1]["logits"] = [row[:V - 1] for row in recs[1]["logits"]]
    return 2, "vocab"


def _token_out_of_range(recs, V):
    recs[0]["tokens"][-1] = V
    return 1, "token ids"


def _length_mismatch(recs, V):
    recs[3]["logits"] = recs[3]["logits"][:-1]
    return 4, "does not match"


def _invalid_json(recs, V):
    return 3, "not a golden record"


BAD_GOLDEN = [_bad_vocab, _token_out_of_range, _length_mismatch, _invalid_json]


@pytest.mark.parametrize("corrupt", BAD_GOLDEN, ids=lambda f: f.__name__.lstrip("_"))
def test_bad_golden_one_line_error_naming_line(corrupt, orbax_fp32, golden_short, tiny_cfg, tmp_path):
    recs = [json.loads(ln) for ln in golden_short.read_text().splitlines()]
    line, words = corrupt(recs, tiny_cfg.V)
    text = [json.dumps(r) for r in recs]
    if corrupt is _invalid_json:
        text[line - 1] = text[line - 1][: len(text[line - 1]) // 2]      # a truncated write
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(InputError, match=rf"bad\.jsonl:{line}: .*{words}"):
        read_golden(path, tiny_cfg.V)
    res = CliRunner().invoke(main, ["verify", str(orbax_fp32["unscanned"]), "--golden", str(path)])
    assert res.exit_code == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"bad.jsonl:{line}:" in err[0], res.stderr


# ---- negative controls (docs/pitfalls.md) -------------------------------------------------------
# Each broken checkpoint is the correct to-orbax output corrupted with plain numpy (no converter
# code) and written back with OrbaxWriter; each must FAIL, far off, while the correct one passes.


def write_orbax(out: Path, flat: dict[str, np.ndarray], *, scanned: bool, like: Path) -> Path:
    """An Orbax checkpoint `out/0` holding `flat`, with `like`'s config.json beside it."""
    writer = OrbaxWriter(out / "0", {p: (a.shape, a.dtype) for p, a in flat.items()},
                         custom_metadata={"scan_layers": scanned}, compression=None)
    writer.create()
    for p, a in flat.items():
        writer.write(p, tuple(slice(None) for _ in a.shape), a)
    writer.finalize()
    shutil.copyfile(like / "config.json", out / "config.json")
    return out


def _mlp(flat, cfg):
    return [f"decoder/layers_{i}/GptOssMlp/" for i in range(cfg.L)]


def swap_wi(flat, cfg):
    """wi_0 (gate) and wi_1 (up) exchanged, with their biases: the clamp, the sigmoid and the +1
    land on the wrong projection."""
    out = dict(flat)
    for m in _mlp(flat, cfg):
        for s in ("", "_bias"):
            out[m + "wi_0" + s], out[m + "wi_1" + s] = flat[m + "wi_1" + s], flat[m + "wi_0" + s]
    return out


def gate_up_halves(flat, cfg):
    """gate_up_proj [E, H, 2I] split as halves [:I] / [I:] instead of even/odd (mlx-lm#679):
    rebuild HF's interleaved tensor from the correct leaves, then split it the wrong way."""
    out = dict(flat)
    for m in _mlp(flat, cfg):
        for s in ("", "_bias"):
            gate, up = flat[m + "wi_0" + s], flat[m + "wi_1" + s]
            interleaved = np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * cfg.I)
            out[m + "wi_0" + s] = np.ascontiguousarray(interleaved[..., :cfg.I])
            out[m + "wi_1" + s] = np.ascontiguousarray(interleaved[..., cfg.I:])
    return out


def sinks_zero(flat, cfg):
    """Sinks dropped the way a llama-style converter drops them: its table has no `sinks` line,
    so MaxText's leaf keeps its zero init. (A zero sink is still a softmax column with logit 0,
    so this is a different model from 'no sinks', and from gpt-oss's learned ones.)"""
    out = dict(flat)
    for i in range(cfg.L):
        k = f"decoder/layers_{i}/GptOssAttention/sinks"
        out[k] = np.zeros_like(flat[k])
    return out


def stack_layers(flat, cfg, groups: tuple[list[int], list[int]]) -> dict[str, np.ndarray]:
    """A scanned tree: HF layers groups[g] (in slot order) stacked at axis 1 into layers_{g}."""
    out = {k: v for k, v in flat.items() if not k.startswith("decoder/layers_")}
    rels = [k.removeprefix("decoder/layers_0/") for k in flat if k.startswith("decoder/layers_0/")]
    for g, layers in enumerate(groups):
        for rel in rels:
            out[f"decoder/layers/layers_{g}/{rel}"] = np.stack([flat[f"decoder/layers_{i}/{rel}"] for i in layers], 1)
    return out


UNSCANNED_BREAKS = [swap_wi, gate_up_halves, sinks_zero]


@pytest.mark.parametrize("corrupt", UNSCANNED_BREAKS, ids=lambda f: f.__name__)
def test_negative_control_unscanned(corrupt, flat_unscanned, orbax_fp32, golden_short, tiny_cfg, work):
    tmp = work / f"neg-{corrupt.__name__}"
    broken = write_orbax(tmp / "ckpt", corrupt(flat_unscanned, tiny_cfg), scanned=False, like=orbax_fp32["unscanned"])
    assert_far_off(run_verify(broken, golden_short, tmp, expect_pass=False))
    assert_exact(run_verify(orbax_fp32["unscanned"], golden_short, tmp, expect_pass=True))


def test_negative_control_cli_exit_4(flat_unscanned, orbax_fp32, golden_short, tiny_cfg, work):
    broken = work / "neg-swap_wi" / "ckpt"
    if not broken.exists():
        write_orbax(broken, swap_wi(flat_unscanned, tiny_cfg), scanned=False, like=orbax_fp32["unscanned"])
    res = CliRunner().invoke(main, ["verify", str(broken), "--golden", str(golden_short), "--no-progress"])
    assert res.exit_code == 4 and "FAIL" in res.stdout
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1


def test_negative_control_scan_grouped_contiguously(flat_unscanned, orbax_fp32, golden_short, tiny_cfg, work):
    """Scanned stacks filled with contiguous layers (layers_0 = HF 0,1,2; layers_1 = 3,4,5)
    instead of by attention pattern (layers_0 = 0,2,4 sliding; layers_1 = 1,3,5 full). All
    shapes are right; the sliding/full pattern and the layer order are not."""
    L = tiny_cfg.L
    tmp = work / "neg-contiguous"
    by_pattern = stack_layers(flat_unscanned, tiny_cfg, (list(range(0, L, 2)), list(range(1, L, 2))))
    # our own by-pattern stacking is what to-orbax --scanned wrote: the control differs only in grouping
    scanned = flatten(load_params(orbax_fp32["scanned"] / "0"))
    assert by_pattern.keys() == scanned.keys()
    for k, v in scanned.items():
        np.testing.assert_array_equal(by_pattern[k], np.asarray(v), err_msg=k)
    contiguous = stack_layers(flat_unscanned, tiny_cfg, (list(range(L // 2)), list(range(L // 2, L))))
    broken = write_orbax(tmp / "ckpt", contiguous, scanned=True, like=orbax_fp32["unscanned"])
    assert_far_off(run_verify(broken, golden_short, tmp, expect_pass=False))
    assert_exact(run_verify(orbax_fp32["scanned"], golden_short, tmp, expect_pass=True))


def test_negative_control_yarn_truncate(orbax_fp32, golden_default, tiny_cfg, work):
    """YaRN `truncate: false` lost (vllm#28244): a config.json rewritten without the key, which
    reads as truncate=true (low/high rounded to 1/3 instead of 1.01/2.17 at D=8), beside a
    checkpoint whose golden came from the real truncate=false model. The correction range moves
    one rotary frequency, so the error grows with position: the long passage shows it."""
    assert tiny_cfg.rope_scaling.truncate is False
    tmp = work / "neg-yarn"
    broken = tmp / "ckpt"
    shutil.copytree(orbax_fp32["scanned"], broken)
    (broken / "conversion.json").unlink()        # else verify refuses the edited config.json by its hash (issue 22 §5)
    conf = json.loads((broken / "config.json").read_text())
    assert conf["rope_scaling"].pop("truncate") is False      # the published (transformers 4.55) spelling
    (broken / "config.json").write_text(json.dumps(conf))
    report = run_verify(broken, golden_default, tmp, expect_pass=False)
    long_row = report["prompts"][-1]
    assert long_row["prompt"] == LONG_PASSAGE and not long_row["pass"]
    figures = {k: long_row[k] for k in ("max_abs_diff", "max_kl", "top1_agreement")}
    print(f"FAIL yarn truncate, long passage: {figures}")
    assert long_row["top1_agreement"] < 0.9 or long_row["max_kl"] > 1e-2, long_row


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """A tiny model with square experts (H == I == 64), where a transposed wo keeps its shape."""
    d = tmp_path_factory.mktemp("square")
    src = write_checkpoint(d / "mxfp4", tiny_config(intermediate_size=64), fmt="mxfp4", seed=1)
    ckpt = to_orbax(src, d / "orbax", scanned=False, dtype="fp32", **QUIET)
    return ckpt, golden(src, d / "golden.jsonl", prompts=SHORT, log=lambda *_: None)


def test_negative_control_square_wo_transposed(square, work):
    """down_proj silently transposed (slime#1840): wo [E, I, H] stored as [E, H, I], invisible
    when H == I (as in the real models, 2880 == 2880)."""
    ckpt, gold = square
    cfg = tiny_config(intermediate_size=64)
    assert cfg.H == cfg.I
    tmp = work / "neg-square"
    flat = {k: np.asarray(v) for k, v in flatten(load_params(ckpt / "0")).items()}
    for i in range(cfg.L):
        k = f"decoder/layers_{i}/GptOssMlp/wo"
        flat[k] = np.ascontiguousarray(np.swapaxes(flat[k], -1, -2))
    broken = write_orbax(tmp / "ckpt", flat, scanned=False, like=ckpt)
    assert_far_off(run_verify(broken, gold, tmp, expect_pass=False))
    assert_exact(run_verify(ckpt, gold, tmp, expect_pass=True))

"""One oracle suite for every registered model family (tests/family_cases.py has one case each).

For each family: a tiny checkpoint in its published on-disk format converts with `to-orbax`
(scanned and unscanned) to leaves equal to an independent re-derivation from the HF tensors; the
converted checkpoint's fp32 logits equal HF transformers' (max |Δ| < 1e-4, KL < 1e-6) for all three
MoE strategies; `golden` + `verify` pass in memory and `--streamed`; `generate` equals HF greedy;
`check` confirms the output. At real shapes: the published config's tree traces the forward with
`jax.eval_shape`, and `to-orbax --dry-run` plans it from sparse real-shape shards.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import run_env
from family_cases import CASES, safetensors_fp32
from gptoss_convert.backends import get_backend, known_model_types
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.io.orbax_reader import load_params
from gptoss_convert.tree import flatten, unflatten
from gptoss_convert.verify.golden import golden
from gptoss_convert.verify.verify import verify

QUIET = dict(progress=False, log=lambda *_: None)
FAMILIES = sorted(CASES)
STRATEGIES = ["ragged_dot", "dense", pytest.param("megablox", marks=pytest.mark.slow)]


def test_every_registered_family_has_a_case():
    assert FAMILIES == known_model_types()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(case, backend, cfg, tiny HF directory, fp32 HF model) of one family."""
    case = CASES[request.param]
    d = case.write_tiny(tmp_path_factory.mktemp(case.model_type) / "hf")
    backend = get_backend(case.model_type)
    cfg = backend.config_from_dict(json.loads((d / "config.json").read_text()))
    hf = getattr(transformers, case.hf_class).from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()
    return case, backend, cfg, d, hf


@pytest.fixture(scope="module", params=[True, False], ids=["scanned", "unscanned"])
def converted(request, family, tmp_path_factory):
    """(scanned, output root, {leaf: array}) of `to-orbax` in fp32."""
    root = to_orbax(family[3], tmp_path_factory.mktemp("o") / "out", scanned=request.param, dtype="fp32", **QUIET)
    return request.param, root, {k: np.asarray(v) for k, v in flatten(load_params(root / "0")).items()}


@pytest.fixture(scope="module")
def hf_logits(family):
    cfg, hf = family[2], family[4]
    tokens = np.random.default_rng(1).integers(0, cfg.V, (2, 19))     # 19 > gpt-oss's tiny window of 5
    with torch.no_grad():
        return tokens, hf(torch.tensor(tokens)).logits.numpy()


def test_to_orbax_leaves_equal_independent_rederivation(family, converted):
    case, backend, cfg, d, _ = family
    scanned, _, got = converted
    want = case.expected_leaves(safetensors_fp32(d), cfg, scanned)
    assert sorted(got) == sorted(want) == sorted(backend.flat_shapes(cfg, scanned))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("moe", STRATEGIES)
def test_forward_matches_hf(family, converted, hf_logits, moe):
    _, backend, cfg, _, _ = family
    tokens, want = hf_logits
    ours = np.asarray(backend.forward(unflatten(converted[2]), tokens.astype(np.int32), cfg, moe=moe))
    assert np.abs(ours - want).max() < 1e-4
    logp, logq = jax.nn.log_softmax(want, -1), jax.nn.log_softmax(ours, -1)
    assert float(np.max(np.sum(np.exp(logp) * (logp - logq), -1))) < 1e-6


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_golden_then_verify_passes(family, converted, tmp_path, streamed):
    """golden (HF on the tiny dir) -> verify the Orbax output, in memory or layer by layer."""
    scanned, root, _ = converted
    g = golden(family[3], tmp_path / "g.jsonl", log=lambda *_: None)
    report = verify(root, golden=g, streamed=streamed, log=lambda *_: None, atol=1e-4, rtol=0, max_kl=1e-6)
    assert report["pass"] and report["layout"] == ("scanned" if scanned else "unscanned")
    assert len(report["prompts"]) >= 3 and report["moe"] == ("streamed per-expert" if streamed else "ragged_dot")


def test_generate_equals_hf_greedy(family, converted):
    """Greedy KV-cache decoding of a left-padded batch gives HF's greedy continuation of each prompt."""
    _, backend, cfg, _, hf = family
    prompts = [[5, 17, 230, 41, 99, 7, 64], [120, 3, 288]]
    ours, stats = backend.generate(unflatten(converted[2]), cfg, prompts, max_new_tokens=8)
    for p, new in zip(prompts, ours):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist()
        assert new == want
    assert stats.batch == 2 and stats.prompt_tokens == 10


@pytest.mark.parametrize("converted", [True], ids=["scanned"], indirect=True)   # the shell: one layout
def test_cli_check_and_generate_on_the_output(family, converted):
    """`check` confirms the output against its record; `generate` reads it with the tokenizer
    copied beside it and continues greedily with the ids the library call gives."""
    _, backend, cfg, _, _ = family
    _, root, leaves = converted
    r = subprocess.run([sys.executable, "-m", "gptoss_convert", "check", str(root)], capture_output=True, text=True,
                       env=run_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "gptoss_convert", "generate", str(root), "--prompt",
                        "the quick brown fox", "--max-new-tokens", "5"], capture_output=True, text=True, env=run_env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr
    ids = json.loads(r.stdout.split("prompt ids: ")[1].splitlines()[0])
    new = json.loads(r.stdout.split("new ids: ")[1].splitlines()[0])
    assert new == backend.generate(unflatten(leaves), cfg, ids, max_new_tokens=5)[0][0]


# ---- the published config at real shapes ---------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_published_config_traces_the_forward_at_real_shape(model_type):
    """jax.eval_shape runs the whole forward over the real-shape abstract tree (nothing allocated)."""
    backend = get_backend(model_type)
    cfg = backend.config_from_dict(CASES[model_type].published())
    tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
    for scanned in (True, False):
        tree = backend.abstract_params(cfg, scanned)
        out = jax.eval_shape(lambda p, t: backend.forward(p, t, cfg, dtype=jax.numpy.bfloat16), tree, tokens)
        assert out.shape == (1, 8, cfg.V) and out.dtype == np.float32


@pytest.mark.parametrize("layout", ["--scanned", "--unscanned"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_dry_run_plans_real_shape_shards(model_type, layout, tmp_path):
    """Real-shape shards (real headers, holes for data) give to-orbax --dry-run the real plan."""
    case, backend = CASES[model_type], get_backend(model_type)
    raw = case.published()
    case.write_sparse(tmp_path / "src", raw)
    assert sum(p.stat().st_blocks for p in (tmp_path / "src").glob("*.safetensors")) * 512 < 64 << 20  # holes
    r = subprocess.run([sys.executable, "-m", "gptoss_convert", "to-orbax", str(tmp_path / "src"),
                        str(tmp_path / "out"), layout, "--dry-run"], capture_output=True, text=True, env=run_env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr and not (tmp_path / "out").exists()
    shapes = backend.flat_shapes(backend.config_from_dict(raw), layout == "--scanned")
    want = sum(math.prod(s) for s in shapes.values()) * 2                                   # bf16
    assert f"{len(shapes)} target leaves" in r.stdout and f"{want:,} bytes to write" in r.stdout

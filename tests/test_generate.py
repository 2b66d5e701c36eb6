"""KV-cache decoding against HF transformers' `generate` (greedy, fp32) and the full forward.

One left-padded batch holds a prompt shorter (3) and one longer (12) than the tiny sliding
window (5), and decoding runs N = 14 tokens, far past the window. Every call here uses the same
batch shape, so each layout compiles the prefill and the decode step once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from hf_reference import hf_to_maxtext, torch_state_dict_numpy

from gptoss_convert.backends.gpt_oss import generate as G
from gptoss_convert.backends.gpt_oss import model as M
from gptoss_convert.backends.gpt_oss import params as P
from gptoss_convert.cli import main
from gptoss_convert.converters.to_orbax import to_orbax

N = 14                      # new tokens: prompt + N runs well past the window of 5
PROMPT_LENS = (3, 12)       # shorter and longer than the window
EOS, PAD = 2, 0             # the tiny checkpoints' ids (config.json / generation_config.json)
LAYOUTS = {"unscanned": False, "scanned": True}
F32 = jnp.dtype(jnp.float32)


@pytest.fixture(scope="module")
def hf_model(bf16_dir):
    return transformers.GptOssForCausalLM.from_pretrained(
        bf16_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager").eval()


@pytest.fixture(scope="module")
def trees(hf_model, tiny_cfg):
    state = torch_state_dict_numpy(hf_model)
    return {name: P.unflatten({k: jnp.asarray(v) for k, v in hf_to_maxtext(state, tiny_cfg, scanned).items()})
            for name, scanned in LAYOUTS.items()}


@pytest.fixture(scope="module")
def prompts(tiny_cfg):
    rng = np.random.default_rng(3)
    return [rng.integers(3, tiny_cfg.V, n).tolist() for n in PROMPT_LENS]   # no special ids


def hf_generate(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """HF greedy continuation of one unpadded prompt, cut after the first eos (as ours stops)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=PAD)
    new = out[0, len(ids):].tolist()
    return new[:new.index(EOS) + 1] if EOS in new else new


@pytest.fixture(scope="module")
def hf_ids(hf_model, prompts):
    return [hf_generate(hf_model, p, N) for p in prompts]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_equals_hf_generate(trees, prompts, hf_ids, tiny_cfg, layout):
    assert [len(r) for r in hf_ids] == [N, N]      # no early eos: decoding really runs past the window
    ours = G.generate(trees[layout], tiny_cfg, prompts, max_new_tokens=N, eos_id=EOS)
    assert ours == hf_ids


def test_eos_stops_a_row_like_hf(trees, prompts, hf_ids, tiny_cfg):
    """Declare a token that row 0's greedy continuation first emits at step j ≥ 3, and row 1 never
    emits, the eos: row 0 stops there (eos included), row 1 runs on to N tokens."""
    j = next(j for j in range(3, N) if hf_ids[0][j] not in hf_ids[0][:j] + hf_ids[1])
    ours = G.generate(trees["unscanned"], tiny_cfg, prompts, max_new_tokens=N, eos_id=[hf_ids[0][j], 10_000])
    assert ours == [hf_ids[0][:j + 1], hf_ids[1]]


def test_cached_logits_equal_full_forward(trees, prompts, tiny_cfg):
    """Greedy decode by hand with `step`; each step's logits equal the full forward over the
    sequence so far (computed once over the final sequence: the forward is causal). Also the
    caches: sliding layers hold exactly the last `window` positions, full layers everything."""
    cfg, tree = tiny_cfg, trees["scanned"]
    tokens, positions = G.left_pad(prompts)
    (B, T), W, lengths = tokens.shape, cfg.sliding_window, np.array(PROMPT_LENS)
    max_len = T + N - 1
    caches = G.init_caches(cfg, B, max_len, F32)
    kw = {"cfg": cfg, "moe": "ragged_dot", "dtype": F32}
    logits, caches = G.step(tree, caches, tokens, positions, **kw)
    steps, seq = [np.asarray(logits)], tokens
    for t in range(N - 1):
        nxt = np.argmax(steps[-1], -1).astype(np.int32)[:, None]
        seq = np.concatenate([seq, nxt], axis=1)
        logits, caches = G.step(tree, caches, nxt, (lengths + t)[:, None].astype(np.int32), **kw)
        steps.append(np.asarray(logits))
    mask = np.pad(positions >= 0, ((0, 0), (0, N - 1)), constant_values=True)   # left padding off
    full = np.asarray(M.forward(tree, jnp.asarray(seq), cfg, attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(np.stack(steps, 1), full[:, T - 1:], atol=1e-5, rtol=0)

    last = lengths + N - 2                          # position of the last token fed
    for i, c in enumerate(caches):
        S = W if cfg.is_sliding(i) else max_len
        assert c.k.shape == c.v.shape == (B, S, cfg.Nkv, cfg.D) and c.pos.shape == (B, S)
        for b in range(B):
            want = np.arange(last[b] - W + 1, last[b] + 1) if cfg.is_sliding(i) else \
                np.r_[np.full(T - lengths[b], -1), np.arange(last[b] + 1)]
            np.testing.assert_array_equal(np.asarray(c.pos[b]), want)


def test_sampling_is_deterministic_per_seed(trees, prompts, tiny_cfg):
    def run(seed, **kw):
        return G.generate(trees["unscanned"], tiny_cfg, prompts, max_new_tokens=N, temperature=1.0, seed=seed, **kw)
    a = run(0)
    assert a == run(0) and a != run(1)
    assert run(7, top_p=1e-6) == G.generate(trees["unscanned"], tiny_cfg, prompts, max_new_tokens=N)


def test_top_p_keeps_the_nucleus():
    """p = .5 .3 .15 .05, top_p .7: only the first two can be drawn, in proportion .5 : .3."""
    logits = jnp.log(jnp.tile(jnp.array([[0.15, 0.5, 0.05, 0.3]]), (4000, 1)))
    draws = np.asarray(G.sample(logits, jax.random.key(0), jnp.float32(1.0), jnp.float32(0.7), greedy=False))
    assert set(np.unique(draws)) == {1, 3}
    assert abs((draws == 1).mean() - 0.5 / 0.8) < 0.03


def test_bad_arguments_are_named(trees, tiny_cfg):
    with pytest.raises(G.GenerateArgumentError) as e:
        G.generate(trees["unscanned"], tiny_cfg, [[1, 2], [tiny_cfg.V]], max_new_tokens=-1, temperature=-1, top_p=0,
                   moe="nope")
    for name in ("prompt_ids", "max_new_tokens", "temperature", "top_p", "moe"):
        assert name in str(e.value)


@pytest.mark.slow
def test_cli_generate_orbax_and_hf(bf16_dir, hf_model, tmp_path):
    """`generate` on a to-orbax output (tokenizer found beside it) and on the HF directory itself:
    the continuation printed, and its ids equal HF's greedy generate."""
    out = to_orbax(bf16_dir, tmp_path / "o", scanned=True, dtype="fp32", progress=False, log=lambda *_: None)
    tok = transformers.AutoTokenizer.from_pretrained(bf16_dir)
    prompt_ids = tok("I love to")["input_ids"]
    want = hf_generate(hf_model, prompt_ids, 8)
    runner = CliRunner()
    for ckpt in (out, bf16_dir):
        r = runner.invoke(main, ["generate", str(ckpt), "--prompt", "I love to", "--max-new-tokens", "8"])
        assert r.exit_code == 0, r.output
        lines = r.stdout.splitlines()
        assert lines[0] == "I love to" + tok.decode(want)
        assert f"prompt ids: {prompt_ids}" in lines and f"new ids: {want}" in lines
        assert "tok/s" in r.stderr


def test_cli_generate_errors_in_one_line(bf16_dir, tmp_path):
    r = CliRunner().invoke(main, ["generate", str(bf16_dir), "--prompt", "x", "--tokenizer", str(tmp_path)])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and "tokenizer.json" in r.stderr and r.stderr.count("\n") == 1

"""MoE strategies against a plain per-expert numpy loop; grouped matmuls; argument validation."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gptoss_convert.backends.common import moe as moe_mod   # the shared strategies: their one-time warning
from gptoss_convert.backends.gpt_oss.moe import STRATEGIES, MoeArgumentError, grouped_matmul, moe
from gptoss_convert.errors import ConvertError

# megablox runs in Pallas interpret mode off TPU (one loop step per tile): few, small examples.
EXAMPLES = {"megablox": 4, "ragged_dot": 12, "dense": 12}
STRATEGY_PARAMS = [pytest.param(s, marks=pytest.mark.slow) if s == "megablox" else s for s in STRATEGIES]
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# ---- reference (numpy, float64) ---------------------------------------------------------------


def reference_grouped_matmul(lhs, rhs, group_sizes):
    out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
    for g, size in enumerate(group_sizes):
        out[start:start + size] = lhs[start:start + size].astype(np.float64) @ rhs[g]
        start += size
    return out


def reference_moe(h, p, cfg):
    """Per-token top-k routing, then one loop over experts, each on the tokens that chose it."""
    h = h.astype(np.float64)
    logits = h @ p["gate"]["kernel"] + p["gate"]["bias"]                       # [N, E]
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]  # [N, k]
    sel = np.take_along_axis(logits, top, -1)
    w = np.exp(sel - sel.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)                                                # softmax over the k
    out = np.zeros_like(h)
    for e in range(cfg.E):
        tok, slot = np.nonzero(top == e)
        if not len(tok):
            continue                                                             # expert got no tokens
        g = np.minimum(h[tok] @ p["wi_0"][e] + p["wi_0_bias"][e], cfg.swiglu_limit)
        u = np.clip(h[tok] @ p["wi_1"][e] + p["wi_1_bias"][e], -cfg.swiglu_limit, cfg.swiglu_limit)
        a = g / (1 + np.exp(-cfg.swiglu_alpha * g)) * (u + 1)
        out[tok] += w[tok, slot, None] * (a @ p["wo"][e] + p["wo_bias"][e])
    return out, logits


def random_mlp_params(cfg, rng, hot_experts=None):
    """One layer's GptOssMlp params (float32). `hot_experts`: bias routing so every token picks
    exactly those, leaving the other experts with zero tokens."""
    E, H, inter = cfg.E, cfg.H, cfg.I

    def n(*shape, std):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    bias = n(E, std=0.1)
    if hot_experts is not None:
        bias[list(hot_experts)] += 100.0
    # std 0.6 on 64 inputs: pre-activations of a few units, so the ±7 clamps are exercised.
    return {"gate": {"kernel": n(H, E, std=0.3), "bias": bias}, "wi_0": n(E, H, inter, std=0.6),
            "wi_1": n(E, H, inter, std=0.6), "wi_0_bias": n(E, inter, std=0.5), "wi_1_bias": n(E, inter, std=0.5),
            "wo": n(E, inter, H, std=0.1), "wo_bias": n(E, H, std=0.1)}


_moe_jit = jax.jit(moe, static_argnames=("cfg", "strategy"))


def check_against_reference(cfg, h, p, strategy):
    ref, logits = reference_moe(h, p, cfg)
    srt = np.sort(logits, -1)[:, ::-1]
    k = cfg.num_experts_per_tok
    if len(h) and k < cfg.E:
        assume(np.min(srt[:, k - 1] - srt[:, k]) > 1e-4)     # no near-tie at the top-k boundary
    out = np.asarray(_moe_jit(jnp.asarray(h), p, cfg, strategy=strategy))
    assert out.shape == h.shape
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-4)


# ---- strategies vs reference ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGY_PARAMS)
def test_moe_matches_reference(tiny_cfg, strategy):
    @settings(max_examples=EXAMPLES[strategy], **SETTINGS)
    @given(n_tokens=st.integers(0, 24), seed=st.integers(0, 2**16), skew=st.booleans())
    def run(n_tokens, seed, skew):
        rng = np.random.default_rng(seed)
        hot = rng.choice(tiny_cfg.E, tiny_cfg.num_experts_per_tok, replace=False) if skew else None
        p = random_mlp_params(tiny_cfg, rng, hot)
        check_against_reference(tiny_cfg, rng.standard_normal((n_tokens, tiny_cfg.H)).astype(np.float32), p, strategy)
    run()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_experts_with_zero_tokens(tiny_cfg, strategy):
    """All tokens on the same k experts: the other E-k groups are empty."""
    rng = np.random.default_rng(5)
    p = random_mlp_params(tiny_cfg, rng, hot_experts=[4, 0, 2])
    h = rng.standard_normal((2, 9, tiny_cfg.H)).astype(np.float32)    # leading dims are kept
    ref, _ = reference_moe(h.reshape(-1, tiny_cfg.H), p, tiny_cfg)
    out = _moe_jit(jnp.asarray(h), p, tiny_cfg, strategy=strategy)
    np.testing.assert_allclose(np.asarray(out).reshape(-1, tiny_cfg.H), ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_tokens(tiny_cfg, strategy):
    p = random_mlp_params(tiny_cfg, np.random.default_rng(7))
    out = _moe_jit(jnp.zeros((0, tiny_cfg.H)), p, tiny_cfg, strategy=strategy)
    assert out.shape == (0, tiny_cfg.H)
    if strategy != "dense":
        gs = jnp.zeros(3, jnp.int32)
        assert grouped_matmul(jnp.zeros((0, 16)), jnp.ones((3, 16, 8)), gs, strategy=strategy).shape == (0, 8)


def test_strategies_agree_in_bf16(tiny_cfg):
    rng = np.random.default_rng(6)
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), random_mlp_params(tiny_cfg, rng))
    h = jnp.asarray(rng.standard_normal((20, tiny_cfg.H)), jnp.bfloat16)
    outs = {s: np.asarray(_moe_jit(h, p, tiny_cfg, strategy=s), np.float32) for s in STRATEGIES}
    assert all(o.dtype == np.float32 for o in outs.values())
    np.testing.assert_allclose(outs["megablox"], outs["ragged_dot"], atol=0.05, rtol=0.02)
    np.testing.assert_allclose(outs["dense"], outs["ragged_dot"], atol=0.05, rtol=0.02)


@pytest.mark.parametrize("strategy", STRATEGY_PARAMS[:2])   # megablox (slow), ragged_dot
def test_grouped_matmul_matches_loop(strategy):
    @settings(max_examples=EXAMPLES[strategy], **SETTINGS)
    @given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6), seed=st.integers(0, 2**16))
    def run(sizes, seed):
        rng = np.random.default_rng(seed)
        gs = np.array(sizes, np.int32)
        lhs = rng.standard_normal((int(gs.sum()), 16)).astype(np.float32)
        rhs = rng.standard_normal((len(gs), 16, 24)).astype(np.float32)
        out = grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(gs), strategy=strategy)
        np.testing.assert_allclose(np.asarray(out), reference_grouped_matmul(lhs, rhs, gs), atol=1e-4, rtol=1e-5)
    run()


def test_megablox_interpret_warning_logged_once(tiny_cfg, monkeypatch, caplog):
    if jax.default_backend() == "tpu":
        pytest.skip("megablox runs natively on TPU")
    monkeypatch.setattr(moe_mod, "_interpret_warned", False)
    lhs, rhs = jnp.ones((4, 16)), jnp.ones((2, 16, 8))
    with caplog.at_level(logging.WARNING, logger=moe_mod.__name__):
        for _ in range(2):
            grouped_matmul(lhs, rhs, jnp.array([1, 3], jnp.int32), strategy="megablox")
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "interpret mode" in caplog.records[0].message


# ---- refusals and validation ------------------------------------------------------------------


@pytest.fixture
def mlp(tiny_cfg):
    return random_mlp_params(tiny_cfg, np.random.default_rng(0))


@pytest.mark.parametrize("cf", [1.0, 1.25, 0])
def test_capacity_factor_refused(tiny_cfg, mlp, cf):
    with pytest.raises(MoeArgumentError, match=r"token dropping is not supported; use capacity_factor=-1"):
        moe(jnp.zeros((3, tiny_cfg.H)), mlp, tiny_cfg, capacity_factor=cf)


def test_unknown_strategy(tiny_cfg, mlp):
    with pytest.raises(MoeArgumentError, match=r"strategy: expected one of megablox, ragged_dot, dense, got 'gshard'"):
        moe(jnp.zeros((3, tiny_cfg.H)), mlp, tiny_cfg, strategy="gshard")


def test_errors_are_ours_and_value_errors():
    assert issubclass(MoeArgumentError, ConvertError) and issubclass(MoeArgumentError, ValueError)


def test_moe_validation_names_arguments(tiny_cfg, mlp):
    bad = dict(mlp, wi_0=np.swapaxes(mlp["wi_0"], 1, 2))      # [E, I, H]: the transposition trap
    del bad["wo_bias"]
    with pytest.raises(MoeArgumentError) as e:
        moe(jnp.zeros((3, tiny_cfg.H + 1), jnp.int32), bad, tiny_cfg)
    msg = str(e.value)
    assert "h: expected last dimension H=64, got shape (3, 65)" in msg
    assert "h: expected float32 or bfloat16, got int32" in msg
    assert "layer_mlp_params['wi_0']: expected shape (5, 64, 96), got (5, 96, 64)" in msg
    assert "layer_mlp_params['wo_bias']: missing" in msg


def test_moe_validation_router(tiny_cfg, mlp):
    bad = dict(mlp, gate={"kernel": mlp["gate"]["kernel"].T, "bias": mlp["gate"]["bias"]})
    with pytest.raises(MoeArgumentError, match=r"layer_mlp_params\['gate'\]\['kernel'\]: expected shape \(64, 5\)"):
        moe(jnp.zeros((3, tiny_cfg.H)), bad, tiny_cfg)


@pytest.mark.parametrize("lhs, rhs, sizes, message", [
    (np.ones((4, 16, 1), np.float32), np.ones((2, 16, 8), np.float32), np.array([1, 3], np.int32),
     "lhs: expected a 2-D [m, k] array, got shape (4, 16, 1)"),
    (np.ones((4, 16), np.float32), np.ones((16, 8), np.float32), np.array([1, 3], np.int32),
     "rhs: expected a 3-D [groups, k, n] array"),
    (np.ones((4, 16), np.float32), np.ones((2, 12, 8), np.float32), np.array([1, 3], np.int32),
     "lhs/rhs: contracting dimensions differ"),
    (np.ones((4, 16), np.int32), np.ones((2, 16, 8), np.float32), np.array([1, 3], np.int32),
     "lhs: expected float32 or bfloat16, got int32"),
    (np.ones((4, 16), np.float32), np.ones((2, 16, 8), np.float16), np.array([1, 3], np.int32),
     "rhs: expected float32 or bfloat16, got float16"),
    (np.ones((4, 16), np.float32), np.ones((2, 16, 8), np.float32), np.array([1, 3], np.int64),
     "group_sizes: expected a 1-D int32 array, got int64"),
    (np.ones((4, 16), np.float32), np.ones((2, 16, 8), np.float32), np.array([1, 1, 2], np.int32),
     "group_sizes: expected 2 groups (rhs.shape[0]), got 3"),
    (np.ones((4, 16), np.float32), np.ones((2, 16, 8), np.float32), np.array([1, 2], np.int32),
     "group_sizes: sum is 3 but lhs has 4 rows"),
    (np.ones((4, 16), np.float32), np.ones((2, 16, 8), np.float32), np.array([5, -1], np.int32),
     "group_sizes: negative sizes [5, -1]"),
])
@pytest.mark.parametrize("strategy", ["ragged_dot", "megablox"])
def test_grouped_matmul_validation(lhs, rhs, sizes, message, strategy):
    with pytest.raises(MoeArgumentError) as e:
        grouped_matmul(lhs, rhs, sizes, strategy=strategy)
    assert message in str(e.value)

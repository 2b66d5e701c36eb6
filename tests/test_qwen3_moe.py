"""Qwen3-MoE, the second family: what is particular to it. The oracles every family passes
(to-orbax both layouts against HF's tensors, forward = HF's `Qwen3MoeForCausalLM` for every MoE
strategy, verify in memory and streamed, generate = HF greedy, check, real-shape trace and dry run)
are tests/test_families.py's; here: the pinned MaxText tree, the config policy, quantization refusals, the
per-expert plan and verify straight from the HF directory."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_env
from family_cases import QWEN3_TINY, write_tiny_qwen3
from gptoss_convert.backends import get_backend
from gptoss_convert.backends.qwen3_moe.config import config_from_dict
from gptoss_convert.backends.qwen3_moe.params import flat_shapes
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.errors import ConfigError, InputError
from gptoss_convert.testing.published import DATA
from gptoss_convert.verify.golden import golden
from gptoss_convert.verify.verify import verify

QUIET = dict(progress=False, log=lambda *_: None)
TINY = QWEN3_TINY      # all dimensions distinct (family_cases.py)
PUBLISHED_30B = DATA / "Qwen3-30B-A3B.config.json"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Qwen3MoeForCausalLM saved by transformers (BF16, per-expert tensors)."""
    return write_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "saved")


def test_verify_accepts_the_hf_directory_itself(hf_dir, tmp_path):
    """verify pointed at the HF directory converts it in memory (the same plan) and passes."""
    g = golden(hf_dir, tmp_path / "g.jsonl", prompts="the quick brown fox", log=lambda *_: None)
    report = verify(hf_dir, golden=g, moe="dense", atol=1e-4, rtol=0, max_kl=1e-6, log=lambda *_: None)
    assert report["pass"] and report["kind"] == "hf" and len(report["prompts"]) == 1


@pytest.mark.parametrize("quant, error, needle", [
    ({"quant_method": "mxfp4"}, ConfigError, "quant_method='mxfp4' is not supported (supported: fp8; or convert"),
    ({"quant_method": "gptq"}, InputError, "quant_method 'gptq' is not supported"),    # the reader refuses first
], ids=["mxfp4", "gptq"])
def test_quantization_other_than_fp8_refused(hf_dir, tmp_path, quant, error, needle):
    """FP8 twins are read (tests/test_fp8.py); any other quantization is refused before anything is written."""
    src = tmp_path / "q"
    src.mkdir()
    for f in hf_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    conf = json.loads((hf_dir / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(conf | {"quantization_config": quant}))
    with pytest.raises(error) as e:
        to_orbax(src, tmp_path / "out", scanned=True, **QUIET)
    assert needle in str(e.value)
    assert not (tmp_path / "out").exists()


# ---- the published Qwen3-30B-A3B at real shapes --------------------------------------------------


def published_30b() -> dict:
    return json.loads(PUBLISHED_30B.read_text())


# Pinned from MaxText: layer names from src/MaxText/layers/qwen3.py (Qwen3MoeDecoderLayer /
# AttentionWithNorm: pre_self_attention_layer_norm, self_attention{query,key,value,out,
# query_norm,key_norm}, post_self_attention_layer_norm, moe_block{gate,wi_0,wi_1,wo}); the scanned
# paths `decoder/layers/...` with experts before layers ([E, L, ...]) from
# src/MaxText/utils/ckpt_conversion/strategies/qwen.py; shapes from its reshape_kernel (HF .T).
PINNED_SCANNED_30B = {
    "token_embedder/embedding": (151936, 2048),
    "decoder/decoder_norm/scale": (2048,),
    "decoder/logits_dense/kernel": (2048, 151936),
    "decoder/layers/pre_self_attention_layer_norm/scale": (2048, 48),
    "decoder/layers/post_self_attention_layer_norm/scale": (2048, 48),
    "decoder/layers/self_attention/query/kernel": (2048, 48, 32, 128),
    "decoder/layers/self_attention/key/kernel": (2048, 48, 4, 128),
    "decoder/layers/self_attention/value/kernel": (2048, 48, 4, 128),
    "decoder/layers/self_attention/out/kernel": (32, 48, 128, 2048),
    "decoder/layers/self_attention/query_norm/scale": (128, 48),
    "decoder/layers/self_attention/key_norm/scale": (128, 48),
    "decoder/layers/moe_block/gate/kernel": (2048, 48, 128),
    "decoder/layers/moe_block/wi_0": (128, 48, 2048, 768),
    "decoder/layers/moe_block/wi_1": (128, 48, 2048, 768),
    "decoder/layers/moe_block/wo": (128, 48, 768, 2048),
}


def test_published_config_is_read_whole_and_gives_the_pinned_tree():
    cfg = config_from_dict(published_30b(), strict=True)      # every field known: nothing unknown
    assert (cfg.L, cfg.E, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.rope_theta) == (48, 128, 8, True, 1e6)
    assert flat_shapes(cfg, scanned=True) == dict(sorted(PINNED_SCANNED_30B.items()))
    unscanned = flat_shapes(cfg, scanned=False)
    assert unscanned["decoder/layers_47/moe_block/wo"] == (128, 768, 2048) and len(unscanned) == 3 + 12 * 48
    params = sum(math.prod(s) for s in unscanned.values())
    assert abs(params / 30.5e9 - 1) < 0.01                     # the model card's 30.5B


def test_registered_by_model_type():
    assert get_backend("qwen3_moe").model_type == "qwen3_moe"


# ---- the shared mechanism the family needed: per-expert sources, period-1 scan ------------------


def _tiny_plan_inputs(scanned: bool):
    from gptoss_convert.converters.plan import edges_from_rules
    backend = get_backend("qwen3_moe")
    cfg = config_from_dict(dict(published_30b(), **{k: v for k, v in TINY.items() if k != "intermediate_size"}))
    edges = edges_from_rules(backend.rules(cfg), cfg.L, backend.layout_for(cfg, scanned))
    return cfg, edges, backend.flat_shapes(cfg, scanned)


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_plan_puts_each_expert_in_its_slice(scanned):
    from gptoss_convert.converters.plan import build_plan
    cfg, edges, targets = _tiny_plan_inputs(scanned)
    shapes = {"gate_proj": (cfg.I, cfg.H), "up_proj": (cfg.I, cfg.H), "down_proj": (cfg.H, cfg.I)}
    sources = {e.source: (shapes[e.source.split(".")[-2]], "BF16") for e in edges if e.expert is not None}
    plan = build_plan(sources, {t: s for t, s in targets.items() if "moe_block/w" in t},
                      [e for e in edges if e.expert is not None], itemsize=2)
    emits = {(em.target, b.source): em for b in plan.blocks for em in b.emits}
    j, i = 5, 3
    em = emits[("decoder/layers/moe_block/wo" if scanned else f"decoder/layers_{i}/moe_block/wo",
                f"model.layers.{i}.mlp.experts.{j}.down_proj.weight")]
    want = (slice(j, j + 1), slice(i, i + 1)) if scanned else (slice(j, j + 1),)
    assert em.index[:len(want)] == want
    x = np.arange(cfg.H * cfg.I, dtype=np.float32).reshape(cfg.H, cfg.I)     # HF down_proj [H, I]
    from gptoss_convert.mapping.transforms import apply
    np.testing.assert_array_equal(apply(em.transforms, x), x.T[None])       # one [1, I, H] slice


def test_plan_names_a_missing_expert_and_the_slice_left_empty():
    from gptoss_convert.converters.plan import build_plan
    from gptoss_convert.errors import PlanError
    cfg, edges, targets = _tiny_plan_inputs(True)
    shapes = {"gate_proj": (cfg.I, cfg.H), "up_proj": (cfg.I, cfg.H), "down_proj": (cfg.H, cfg.I)}
    sources = {e.source: (shapes[e.source.split(".")[-2]], "BF16") for e in edges if e.expert is not None}
    targets = {t: s for t, s in targets.items() if "moe_block/w" in t}
    edges = [e for e in edges if e.expert is not None]
    name = "model.layers.2.mlp.experts.6.up_proj.weight"
    with pytest.raises(PlanError) as err:
        build_plan({k: v for k, v in sources.items() if k != name}, targets, edges, itemsize=2)
    assert f"{name!r} is missing (needed for decoder/layers/moe_block/wi_1 slot 2 expert 6)" in str(err.value)
    with pytest.raises(PlanError) as err:     # a table that forgot one expert
        build_plan(sources, targets, [e for e in edges if e.source != name], itemsize=2)
    assert "decoder/layers/moe_block/wi_1 slot 2 expert 6 is filled 0 times" in str(err.value)
    assert f"{name!r} is not used by any target" in str(err.value)


def test_per_expert_rule_runs_backwards_and_insert_axis_inverts():
    from gptoss_convert.backends.qwen3_moe.mapping import rules
    from gptoss_convert.mapping.rules import Rule
    from gptoss_convert.mapping.transforms import DropAxis, InsertAxis, apply
    cfg = config_from_dict(published_30b())
    wo = next(r for r in rules(cfg) if r.target == "moe_block/wo")
    back = wo.inverse()
    assert back.hf == "moe_block/wo" and back.target == "model.layers.{i}.mlp.experts.{j}.down_proj.weight"
    assert back.experts == 128 and back.inverse() == wo
    x = np.arange(6.0).reshape(2, 3)
    assert (apply((InsertAxis(1), InsertAxis(1).inverse()), x).shape == (2, 3)
            and InsertAxis(1).shape((2, 3)) == (2, 1, 3))
    assert DropAxis(0).inverse() == InsertAxis(0)
    with pytest.raises(ValueError, match="go together"):
        Rule("model.layers.{i}.mlp.experts.{j}.up_proj.weight", "moe_block/wi_1")


def test_period_one_scan_is_one_stack_without_a_group_level():
    from gptoss_convert.mapping.layout import Layout, layer_relative
    lay = Layout(scanned=True, num_layers=48, period=1)
    p = lay.place(17, "moe_block/wo", (128, 768, 2048))
    assert (p.path, p.slot, p.shape) == ("decoder/layers/moe_block/wo", 17, (128, 48, 768, 2048))
    assert lay.layer_of(p.path, p.slot) == 17
    assert layer_relative("decoder/layers/moe_block/wo") == ("moe_block/wo", True)
    assert layer_relative("decoder/layers/layers_1/GptOssMlp/wo") == ("GptOssMlp/wo", True)   # gpt-oss unchanged
    assert layer_relative("decoder/layers_3/moe_block/wo") == ("moe_block/wo", False)


@pytest.mark.parametrize("shape", [(77, 2048), (2048, 77), (40, 4096)])
def test_transpose_of_4k_strided_rows_is_exact_in_short_tiles(shape):
    """Qwen3's expert and head tensors have rows of 4 KiB (bf16 x 2048): `transposed` copies them
    8 rows at a time (they share one L1 set) and still gives numpy's transpose, ragged tile included."""
    from gptoss_convert.mapping.transforms import transpose_tile_rows, transposed
    x = np.random.default_rng(0).integers(0, 1 << 16, shape, dtype=np.uint16)
    assert transpose_tile_rows(x.shape[1] * x.itemsize) == (8 if x.shape[1] in (2048, 4096) else (2 << 20) // 154)
    np.testing.assert_array_equal(transposed(x), x.T)
    assert transpose_tile_rows(2880 * 2) == (2 << 20) // 5760     # gpt-oss's 5760-byte rows: tiles unchanged


# ---- the config policy (as gpt-oss's) ------------------------------------------------------------


def test_transformers5_spelling_reads_the_same_as_the_published_one(hf_dir):
    saved = json.loads((hf_dir / "config.json").read_text())     # num_local_experts, rope_parameters
    assert "num_local_experts" in saved and "rope_parameters" in saved
    v4 = dict(published_30b(), **{k: v for k, v in TINY.items()})
    assert config_from_dict(saved) == config_from_dict(v4)


@pytest.mark.parametrize("update, message", [
    ({"num_local_experts": 64}, "num_experts=128 and num_local_experts=64 disagree"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
     "rope_theta=1000000.0 and rope_parameters.rope_theta=500000.0 disagree"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     "rope_scaling="),
    ({"mlp_only_layers": [3]}, "mlp_only_layers=[3] is not supported"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2 is not supported"),
    ({"use_sliding_window": True}, "use_sliding_window=True is not supported"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false, got 'yes'"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a positive number"),
    ({"num_experts_per_tok": 129}, "num_experts_per_tok must be between 1 and num_experts"),
    ({"num_experts": None}, "missing required field num_experts (or num_local_experts)"),
    ({"hidden_size": 2048.0}, "hidden_size must be an integer"),
])
def test_unsupported_values_are_refused_naming_field_and_value(update, message):
    raw = published_30b()
    for k, v in update.items():
        raw.pop(k) if v is None else raw.__setitem__(k, v)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(raw, "Qwen3-30B-A3B/config.json")


def test_unknown_fields_are_accepted_and_listed_unless_strict():
    raw = dict(published_30b(), quantization_note="none", layer_norm_flag=True)
    assert config_from_dict(raw).unknown_fields == ("layer_norm_flag", "quantization_note")
    with pytest.raises(ConfigError, match=re.escape("unknown fields ['layer_norm_flag', 'quantization_note']")):
        config_from_dict(raw, strict=True)


def test_cli_warns_once_about_unknown_fields(hf_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in hf_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "config.json").write_text(json.dumps(dict(json.loads((hf_dir / "config.json").read_text()),
                                                     fine_tuned_by="x")))
    r = subprocess.run([sys.executable, "-m", "gptoss_convert", "to-orbax", str(src), str(tmp_path / "o"), "--scanned",
                        "--dry-run"], capture_output=True, text=True, env=run_env(), timeout=600)
    assert r.returncode == 0 and r.stderr.count("unknown fields ['fine_tuned_by']") == 1, r.stderr

"""Config allowlist, the abstract tree vs MaxText's own, the mapping table and the plan checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gptoss_convert.backends import get_backend
from gptoss_convert.backends.gpt_oss.config import config_from_dict
from gptoss_convert.backends.gpt_oss.params import abstract_params, flat_shapes, flatten, layer_shapes
from gptoss_convert.converters.plan import Edge, build_plan, edges_from_rules
from gptoss_convert.errors import ConfigError, InputError, PlanError
from gptoss_convert.mapping import transforms
from gptoss_convert.mapping.rules import Rule
from gptoss_convert.mapping.transforms import (Deinterleave, Interleave, MergeAxes, SplitAxis, TakeInterleaved,
                                               Transpose, apply, interleave)
from gptoss_convert.testing.published import published_config

MAXTEXT_TREES = Path(__file__).resolve().parent / "data" / "maxtext"   # MaxText 0.2.5's own trees (see its README)
REAL_20B = published_config("gpt-oss-20b")        # the config.json openai/gpt-oss-20b publishes, verbatim


def _reference_tree(kind: str) -> dict[str, tuple[int, ...]]:
    ref = {}
    for line in (MAXTEXT_TREES / f"maxtext_param_tree_{kind}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            path, shape, _ = line.split("\t")
            ref[path] = tuple(json.loads(shape))
    return ref


@pytest.mark.parametrize("kind", ["scanned", "unscanned"])
def test_tree_equals_maxtext_reference(kind):
    cfg = config_from_dict(dict(model_type="gpt_oss", vocab_size=256, hidden_size=48, intermediate_size=32,
                                num_hidden_layers=6, num_local_experts=8, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16))
    assert flat_shapes(cfg, kind == "scanned") == _reference_tree(kind)


@pytest.mark.parametrize("layers,experts,scanned_leaves", [(24, 32, 41), (36, 128, 41)])
def test_real_model_shapes_without_allocating(layers, experts, scanned_leaves):
    import jax
    raw = dict(REAL_20B, num_hidden_layers=layers, num_local_experts=experts,
               layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    cfg = config_from_dict(raw)
    tree = abstract_params(cfg, scanned=True)
    flat = flatten(tree)
    assert len(flat) == scanned_leaves
    assert flat["decoder/layers/layers_0/GptOssMlp/wi_0"].shape == (experts, layers // 2, 2880, 2880)
    assert flat["decoder/layers/layers_1/GptOssAttention/sinks"].shape == (64, layers // 2)
    assert flat["decoder/logits_dense/kernel"].shape == (2880, 201088)
    unscanned = flatten(abstract_params(cfg, scanned=False))
    assert len(unscanned) == 3 + 19 * layers
    # eval_shape over the tree: shapes only, nothing allocated
    out = jax.eval_shape(lambda t: jax.tree.map(lambda x: x.sum(), t), tree)
    assert all(o.shape == () for o in jax.tree.leaves(out))
    params = sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree))
    assert (20.5e9 < params < 21.5e9) if layers == 24 else (116e9 < params < 118e9)   # "20b" is 20.9B, "120b" 116.8B


def test_config_spellings_and_allowlist():
    a = config_from_dict(REAL_20B)
    t5 = {k: v for k, v in REAL_20B.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    t5 |= {"dtype": "bfloat16", "rope_parameters": dict(REAL_20B["rope_scaling"], rope_theta=150000.0)}
    assert config_from_dict(t5) == a
    assert a.rope_scaling.truncate is False and a.num_experts_per_tok == 4
    no_truncate = dict(REAL_20B, rope_scaling={k: v for k, v in REAL_20B["rope_scaling"].items() if k != "truncate"})
    assert config_from_dict(no_truncate).rope_scaling.truncate is True      # as transformers reads it
    with pytest.raises(ConfigError, match="unsupported rope parameters \\['mscale'\\]"):
        config_from_dict(dict(REAL_20B, rope_scaling=dict(REAL_20B["rope_scaling"], mscale=0.7)))
    assert config_from_dict(REAL_20B | {"mystery": 1}).unknown_fields == ("mystery",)   # accepted, named
    with pytest.raises(ConfigError, match="unknown fields \\['mystery'\\]"):
        config_from_dict(REAL_20B | {"mystery": 1}, strict=True)
    with pytest.raises(ConfigError, match="vocab_size=1000000000000 is out of the supported range"):
        config_from_dict(REAL_20B | {"vocab_size": 10**12})
    with pytest.raises(ConfigError) as e:
        config_from_dict(REAL_20B | {"hidden_size": "big", "tie_word_embeddings": True})
    assert "hidden_size must be an integer" in str(e.value) and "tie_word_embeddings" in str(e.value)


def test_unknown_model_type_lists_known():
    with pytest.raises(InputError, match="known model types: gpt_oss"):
        get_backend("llama")


def test_transforms_are_invertible():
    x = np.arange(2 * 12 * 5).reshape(2, 12, 5)
    for ops in [(Transpose((2, 0, 1)),), (SplitAxis(1, (3, 4)),), (Transpose((0, 2, 1)), SplitAxis(2, (4, 3)))]:
        y = apply(ops, x)
        back = apply(tuple(op.inverse() for op in reversed(ops)), y)
        np.testing.assert_array_equal(back, x)
    gu = np.arange(3 * 4 * 6).reshape(3, 4, 6)
    parts = [TakeInterleaved(p)(gu) for p in range(2)]
    np.testing.assert_array_equal(parts[0], gu[..., [0, 2, 4]])
    np.testing.assert_array_equal(interleave(parts), gu)



def test_merge_and_split_invert_each_other():
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    merged = MergeAxes(1, (3, 4))(x)
    assert merged.shape == (2, 12, 5) and MergeAxes(1, (3, 4)).shape(x.shape) == (2, 12, 5)
    np.testing.assert_array_equal(apply((MergeAxes(1, (3, 4)).inverse(),), merged), x)
    for op in (MergeAxes(-3, (3, 4)), SplitAxis(-2, (2, 2))):      # negative axes count from the end
        np.testing.assert_array_equal(apply((op, op.inverse()), x), x)
    with pytest.raises(ValueError, match="expected sizes"):
        MergeAxes(1, (4, 3)).shape(x.shape)


def test_every_rule_runs_backwards(tiny_cfg):
    """Each table line, forward then `inverse()`, gives the HF tensor back; forward it gives the
    params.py shape of each target. The gate/up lines name two targets (backwards: two sources)."""
    from gptoss_convert.testing.tiny import dequantized, hf_tensors
    hf = dequantized(hf_tensors(tiny_cfg))
    shapes = layer_shapes(tiny_cfg) | flat_shapes(tiny_cfg, scanned=False)
    for r in get_backend("gpt_oss").rules(tiny_cfg):
        x = np.asarray(hf[r.hf.format(i=3)], np.float32)
        y = apply(r.transforms, x)
        parts = y if isinstance(y, tuple) else (y,)
        assert [p.shape for p in parts] == [shapes[t] for t in r.targets], r
        back = r.inverse()
        assert (back.sources, back.targets) == (r.targets, r.sources)
        np.testing.assert_array_equal(apply(back.transforms, y), x)
    gu = np.asarray(hf["model.layers.3.mlp.experts.gate_up_proj"], np.float32)    # [E, H, 2I], gate = 0::2
    wi_0, wi_1 = apply((Deinterleave(2),), gu)
    np.testing.assert_array_equal(wi_0, gu[..., 0::2])
    np.testing.assert_array_equal(wi_1, gu[..., 1::2])


def test_rules_naming_several_tensors_say_how():
    with pytest.raises(ValueError, match="first transform that splits into 2"):
        Rule("a", ("x", "y"), (Transpose((1, 0)),))
    with pytest.raises(ValueError, match="last transform that joins 2"):
        Rule(("a", "b"), "x")
    with pytest.raises(ValueError, match="not supported by the conversion plan"):
        Rule(("a", "b"), "x", (Interleave(2),)).per_target()
    assert [(t, ops) for _, t, ops in Rule("a", ("x", "y"), (Deinterleave(2),)).per_target()] == \
        [("x", (TakeInterleaved(0, 2),)), ("y", (TakeInterleaved(1, 2),))]

def test_mapping_against_spec_formulas(tiny_cfg):
    """q/o kernels follow kernel[h,n,d] = Wq[n*D+d, h] and out[n,d,h] = Wo[h, n*D+d] (docs/maxtext.md §1)."""
    rules = {r.target: r for r in get_backend("gpt_oss").rules(tiny_cfg)}
    H, Nq, D = tiny_cfg.H, tiny_cfg.Nq, tiny_cfg.D
    wq = np.random.default_rng(0).standard_normal((Nq * D, H))
    q = apply(rules["GptOssAttention/query/kernel"].transforms, wq)
    wo = np.random.default_rng(1).standard_normal((H, Nq * D))
    o = apply(rules["GptOssAttention/out/kernel"].transforms, wo)
    for h, n, d in [(0, 0, 0), (5, 3, 7), (63, 1, 2)]:
        assert q[h, n, d] == wq[n * D + d, h]
        assert o[n, d, h] == wo[h, n * D + d]


def test_plan_reports_every_problem_at_once(tiny_cfg):
    b = get_backend("gpt_oss")
    cfg = tiny_cfg
    edges = edges_from_rules(b.rules(cfg), cfg.L, b.layout_for(cfg, True))
    from gptoss_convert.testing.tiny import dequantized, hf_tensors
    src = {n: (a.shape, "BF16") for n, a in dequantized(hf_tensors(cfg)).items()}
    del src["model.layers.3.self_attn.sinks"]
    src["model.layers.4.self_attn.q_proj.weight"] = ((cfg.Nq * cfg.D, cfg.H + 1), "BF16")
    src["model.layers.0.mlp.extra"] = ((3,), "BF16")
    targets = b.flat_shapes(cfg, True)
    with pytest.raises(PlanError) as e:
        build_plan(src, targets, edges + [Edge("model.norm.weight", "decoder/decoder_norm/scale")], itemsize=2)
    msg = str(e.value)
    assert ("'model.layers.3.self_attn.sinks' is missing "
            "(needed for decoder/layers/layers_1/GptOssAttention/sinks slot 1)" in msg)
    assert "'model.layers.4.self_attn.q_proj.weight' [32, 65]" in msg and "layers_0/GptOssAttention/query/kernel" in msg
    assert "'model.layers.0.mlp.extra' is not used" in msg
    assert "decoder/decoder_norm/scale is filled 2 times" in msg
    assert len(e.value.problems) >= 4


def test_blocks_split_into_parts_only_when_every_emit_takes_one(tiny_cfg):
    """ReadBlock.parts: the gate/up blocks (wi_0 takes 0::2, wi_1 takes 1::2) are read as 2 parts; a block
    with an emit that needs the whole (or any other block) is read whole."""
    b = get_backend("gpt_oss")
    from gptoss_convert.testing.tiny import dequantized, hf_tensors
    src = {n: (a.shape, "BF16") for n, a in dequantized(hf_tensors(tiny_cfg)).items()}
    edges = edges_from_rules(b.rules(tiny_cfg), tiny_cfg.L, b.layout_for(tiny_cfg, True))
    plan = build_plan(src, b.flat_shapes(tiny_cfg, True), edges, itemsize=2)
    split = {blk.source.split(".", 3)[-1] for blk in plan.blocks if blk.parts == 2}
    assert split == {"mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias"}
    assert all(blk.parts is None for blk in plan.blocks if "gate_up" not in blk.source)
    blk = next(blk for blk in plan.blocks if blk.parts == 2)
    assert sorted(e.transforms[0].part for e in blk.emits) == [0, 1]
    mixed = dataclasses.replace(blk, emits=blk.emits + (dataclasses.replace(blk.emits[0], transforms=()),))
    assert mixed.parts is None


@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (700, 3), (1000, 1300)])
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32, np.complex128])
def test_transpose_gives_a_contiguous_copy_in_tiles(shape, dtype, monkeypatch):
    """Transpose((1, 0)) of a 2-D block is a C-contiguous copy equal to x.T bit for bit (NaN payloads,
    -0.0 included), also when the tile does not divide the rows; other inputs stay views."""
    monkeypatch.setattr(transforms, "TRANSPOSE_TILE_BYTES", 1 << 16)   # several tiles, a ragged last one
    bits = np.random.default_rng(0).integers(0, 256, (*shape, np.dtype(dtype).itemsize), dtype=np.uint8)
    x = bits.view(dtype).reshape(shape)
    y = Transpose((1, 0))(x)
    assert y.flags.c_contiguous and y.shape == shape[::-1] and y.dtype == x.dtype
    assert y.tobytes() == np.ascontiguousarray(x.T).tobytes()
    if shape[1] > 2:                                                     # not contiguous: a view, as before
        assert np.shares_memory(Transpose((1, 0))(x[:, ::2]), x)
    assert np.shares_memory(Transpose((1, 0, 2))(x[None]), x)

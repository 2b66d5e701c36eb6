"""Every family's forward under a ("fsdp", "tensor", "expert") mesh of 8 simulated CPU devices
equals one device, and its to-orbax output restores straight into those shardings.

The shardings come from each family's leaf tables through the shared rule (backends/common/
sharding.py, `Backend.param_shardings`). XLA's device count is fixed when jax initialises, and this
test process may already hold a 1-device jax, so the sharded runs happen in a subprocess: this file
run as a script (`python tests/test_sharding.py`) prints one JSON line of results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from gptoss_convert.backends import get_backend, known_model_types
from gptoss_convert.testing import tiny_config
from gptoss_convert.tree import flatten, unflatten

ROOT = Path(__file__).resolve().parents[1]
AXES = ("fsdp", "tensor", "expert")
# Mesh shapes and the MoE strategies run on each. megablox runs in Pallas interpret mode off TPU
# (slow): one mesh, scanned layout only.
MESHES = {(8, 1, 1): ["ragged_dot"], (2, 2, 2): ["ragged_dot", "dense", "megablox"], (1, 2, 4): ["ragged_dot", "dense"]}
# 8 experts so the expert axis really splits them; H (fsdp) divisible by 8, I and heads by 2.
# (E, H, I, L) per family: what each device's wi_0 shard is cut from.
QWEN3_SIZES = dict(vocab_size=300, hidden_size=32, moe_intermediate_size=20, num_hidden_layers=3, num_experts=8,
                   num_experts_per_tok=2, num_attention_heads=6, num_key_value_heads=2, head_dim=12)
DIMS = {"gpt_oss": (8, 64, 96, 6), "qwen3_moe": (8, 32, 20, 3)}


def qwen3_raw() -> dict:
    from gptoss_convert.testing.qwen3 import published_qwen3
    return dict(published_qwen3(), **QWEN3_SIZES)


def sharding_config(model_type: str):
    if model_type == "gpt_oss":
        return tiny_config(num_local_experts=8)
    return get_backend(model_type).config_from_dict(qwen3_raw())


# ---- worker (subprocess) ------------------------------------------------------------------------


def _gpt_oss_source(d: Path, cfg) -> tuple[Path, dict]:
    """(MXFP4 checkpoint dir, its HF tensors dequantized to fp32) for the restore check."""
    from gptoss_convert.testing import write_checkpoint
    from gptoss_convert.testing.tiny import dequantized, hf_tensors
    src = write_checkpoint(d / "src", cfg, fmt="mxfp4", seed=4, tokenizer=False)
    return src, {k: v.astype(np.float32) for k, v in dequantized(hf_tensors(cfg, seed=4)).items()}


def _qwen3_source(d: Path, cfg) -> tuple[Path, dict]:
    """(BF16 per-expert checkpoint dir, its tensors as fp32) for the restore check."""
    import ml_dtypes

    from gptoss_convert.io.safetensors import save_file
    from gptoss_convert.testing.qwen3 import qwen3_specs
    rng = np.random.default_rng(4)
    tensors = {n: ((1.0 if "norm" in n else 0.0) + 0.3 * rng.standard_normal(s)).astype(ml_dtypes.bfloat16)
               for n, (s, _) in qwen3_specs(qwen3_raw()).items()}
    (d / "src").mkdir()
    save_file(tensors, d / "src" / "model.safetensors", {"format": "pt"})
    (d / "src" / "config.json").write_text(json.dumps(qwen3_raw()))
    return d / "src", {k: v.astype(np.float32) for k, v in tensors.items()}


def _expected_tree(model_type, hf, cfg, scanned):
    from family_cases import CASES
    return unflatten(CASES[model_type].expected_leaves(hf, cfg, scanned))


def _wi0(tree, backend, cfg, scanned):
    rel = next(r for r in backend.expert_leaves if r.endswith("wi_0"))
    return flatten(tree)[backend.layout_for(cfg, scanned).place(0, rel, ()).path]


def _family_runs(model_type: str, d: Path) -> list[dict]:
    backend, cfg = get_backend(model_type), sharding_config(model_type)
    src, hf = (_gpt_oss_source if model_type == "gpt_oss" else _qwen3_source)(d, cfg)
    tokens = np.random.default_rng(4).integers(0, cfg.V, (4, 13))
    results = []
    for scanned in (False, True):
        tree = _expected_tree(model_type, hf, cfg, scanned)
        one = jax.device_put(tree, jax.devices()[0])
        refs = {}
        for shape, strategies in MESHES.items():
            mesh = Mesh(np.array(jax.devices()).reshape(shape), AXES)
            placed = jax.device_put(tree, backend.param_shardings(tree, mesh))
            batch_axis = "fsdp" if tokens.shape[0] % mesh.shape["fsdp"] == 0 else None
            toks = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(batch_axis)))
            wi0 = _wi0(placed, backend, cfg, scanned)
            for strategy in strategies:
                if strategy == "megablox" and not scanned:
                    continue
                if strategy not in refs:
                    refs[strategy] = np.asarray(backend.forward(one, jnp.asarray(tokens), cfg, moe=strategy))
                out = backend.forward(placed, toks, cfg, moe=strategy)
                results.append({"family": model_type, "mesh": list(shape), "scanned": scanned, "strategy": strategy,
                                "max_abs": float(np.abs(np.asarray(out) - refs[strategy]).max()),
                                "wi_0_spec": list(wi0.sharding.spec),
                                "wi_0_shard": list(wi0.addressable_shards[0].data.shape)})
    results.append(_restored_into_sharding(model_type, src, hf, cfg, tokens, d))
    return results


def _restored_into_sharding(model_type, src, hf, cfg, tokens, d) -> dict:
    """to-orbax output restored straight into the (2, 2, 2) mesh's shardings (each device reads
    its own slice; no full host copy), then the forward: equals the in-memory one-device run on
    the tree re-derived from the source tensors."""
    from gptoss_convert.converters.to_orbax import to_orbax
    from gptoss_convert.io.orbax_reader import load_params
    backend = get_backend(model_type)
    root = to_orbax(src, d / "o", scanned=True, dtype="fp32", progress=False, log=lambda *_: None)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), AXES)
    abstract = backend.abstract_params(cfg, scanned=True, dtype=jnp.float32)
    restored = load_params(root / "0", abstract, sharding=backend.param_shardings(abstract, mesh))
    ref = np.asarray(backend.forward(_expected_tree(model_type, hf, cfg, True), jnp.asarray(tokens), cfg))
    out = backend.forward(restored, jnp.asarray(tokens), cfg)
    wi0 = _wi0(restored, backend, cfg, True)
    return {"family": model_type, "mesh": [2, 2, 2], "scanned": True, "strategy": "restored-sharded",
            "max_abs": float(np.abs(np.asarray(out) - ref).max()),
            "wi_0_spec": list(wi0.sharding.spec), "wi_0_shard": list(wi0.addressable_shards[0].data.shape)}


def _worker() -> list[dict]:
    import tempfile
    assert jax.device_count() == 8, jax.devices()
    results = []
    for model_type in known_model_types():
        with tempfile.TemporaryDirectory() as d:
            results += _family_runs(model_type, Path(d))
    return results


# ---- tests (parent process) ---------------------------------------------------------------------


def _run_worker() -> list[dict]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sharded_forward_equals_one_device():
    results = _run_worker()
    expected = {(f, tuple(shape), scanned, s) for f in known_model_types() for shape, strategies in MESHES.items()
                for s in strategies for scanned in (False, True) if s != "megablox" or scanned}
    expected |= {(f, (2, 2, 2), True, "restored-sharded") for f in known_model_types()}
    assert {(r["family"], tuple(r["mesh"]), r["scanned"], r["strategy"]) for r in results} == expected
    for r in results:
        shape, (E, H, inter, L) = r["mesh"], DIMS[r["family"]]
        assert r["max_abs"] < 1e-5, r
        # E, H, I are divisible by every axis size used, so no dimension falls back to replicated.
        assert r["wi_0_spec"] == (["expert", None, "fsdp", "tensor"] if r["scanned"]
                                  else ["expert", "fsdp", "tensor"]), r
        # The experts really are split: each device holds E/expert × H/fsdp × I/tensor.
        e, h, i = (E // shape[2], H // shape[0], inter // shape[1])
        stack = L // get_backend(r["family"]).layout_for(sharding_config(r["family"]), True).period
        assert r["wi_0_shard"] == ([e, stack, h, i] if r["scanned"] else [e, h, i]), r


def test_partition_specs_follow_the_rules(tiny_cfg):
    backend = get_backend("gpt_oss")
    mesh = AbstractMesh((2, 2, 4), AXES)
    specs = {p: backend.partition_spec(p, s, mesh) for p, s in backend.flat_shapes(tiny_cfg, scanned=True).items()}
    L0 = "decoder/layers/layers_0/"
    assert specs[L0 + "GptOssMlp/wi_0"] == PartitionSpec(None, None, "fsdp", "tensor")    # E=5: not divisible by 4
    assert specs[L0 + "GptOssMlp/wo"] == PartitionSpec(None, None, "tensor", "fsdp")
    assert specs[L0 + "GptOssAttention/query/kernel"] == PartitionSpec("fsdp", None, "tensor", None)
    assert specs[L0 + "GptOssAttention/out/kernel"] == PartitionSpec("tensor", None, None, "fsdp")
    assert specs[L0 + "GptOssAttention/sinks"] == PartitionSpec("tensor", None)
    assert specs["token_embedder/embedding"] == PartitionSpec("tensor", "fsdp")
    assert specs["decoder/logits_dense/kernel"] == PartitionSpec("fsdp", "tensor")
    unscanned = backend.flat_shapes(tiny_config(num_local_experts=8), scanned=False)
    assert backend.partition_spec("decoder/layers_3/GptOssMlp/wi_1", unscanned["decoder/layers_3/GptOssMlp/wi_1"],
                                  mesh) == PartitionSpec("expert", "fsdp", "tensor")


def test_qwen3_partition_specs_follow_the_rules():
    """Qwen3's tables: experts on "expert", H on "fsdp", heads and I on "tensor"; the period-1
    stack (`decoder/layers/...`, no layers_{j} level) gets None on axis 1."""
    backend = get_backend("qwen3_moe")
    cfg = sharding_config("qwen3_moe")
    mesh = AbstractMesh((2, 2, 4), AXES)
    specs = {p: backend.partition_spec(p, s, mesh) for p, s in backend.flat_shapes(cfg, scanned=True).items()}
    assert specs["decoder/layers/moe_block/wi_0"] == PartitionSpec("expert", None, "fsdp", "tensor")
    assert specs["decoder/layers/moe_block/wo"] == PartitionSpec("expert", None, "tensor", "fsdp")
    assert specs["decoder/layers/moe_block/gate/kernel"] == PartitionSpec("fsdp", None, None)
    assert specs["decoder/layers/self_attention/query/kernel"] == PartitionSpec("fsdp", None, "tensor", None)
    assert specs["decoder/layers/self_attention/key_norm/scale"] == PartitionSpec(None, None)
    assert specs["token_embedder/embedding"] == PartitionSpec("tensor", "fsdp")
    odd = backend.partition_spec("decoder/layers_1/moe_block/wi_1", (7, 32, 20), mesh)      # 7 experts: replicated
    assert odd == PartitionSpec(None, "fsdp", "tensor")


@pytest.mark.parametrize("model_type", known_model_types())
def test_param_shardings_tree_matches_params(model_type):
    backend, cfg = get_backend(model_type), sharding_config(model_type)
    mesh = Mesh(jax.devices()[:1], ("fsdp",))   # a mesh lacking an axis replicates that dim
    for scanned in (False, True):
        sh = backend.param_shardings(backend.abstract_params(cfg, scanned), mesh)
        flat = flatten(sh)
        assert set(flat) == set(backend.flat_shapes(cfg, scanned))
        assert all(isinstance(s, NamedSharding) for s in flat.values())
        assert {a for s in flat.values() for a in s.spec} <= {"fsdp", None}


@pytest.mark.parametrize("model_type, path", [("gpt_oss", "decoder/layers_0/GptOssMlp/wi_2"),
                                              ("qwen3_moe", "decoder/layers_0/GptOssMlp/wi_0")])
def test_unknown_leaf_is_an_error(model_type, path):
    with pytest.raises(ValueError, match="no sharding rule"):
        get_backend(model_type).partition_spec(path, (5, 64, 96), AbstractMesh((8,), ("fsdp",)))


if __name__ == "__main__":
    print(json.dumps(_worker()))

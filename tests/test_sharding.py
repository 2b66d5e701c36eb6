"""The forward under a ("fsdp", "tensor", "expert") mesh of 8 simulated CPU devices equals one device.

XLA's device count is fixed when jax initialises, and this test process may already hold a
1-device jax, so the sharded runs happen in a subprocess: this file run as a script
(`python tests/test_sharding.py`) prints one JSON line of results.
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

from gptoss_convert.backends.gpt_oss import model as M
from gptoss_convert.backends.gpt_oss import params as P
from gptoss_convert.testing import tiny_config
from gptoss_convert.testing.tiny import dequantized, hf_tensors
from hf_reference import hf_to_maxtext

ROOT = Path(__file__).resolve().parents[1]
AXES = ("fsdp", "tensor", "expert")
# Mesh shapes and the MoE strategies run on each. megablox runs in Pallas interpret mode off TPU
# (slow): one mesh, scanned layout only.
MESHES = {(8, 1, 1): ["ragged_dot"], (2, 2, 2): ["ragged_dot", "dense", "megablox"], (1, 2, 4): ["ragged_dot", "dense"]}


# ---- worker (subprocess) ------------------------------------------------------------------------


def _worker() -> list[dict]:
    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_config(num_local_experts=8)   # 8 experts so the expert axis really splits them
    hf = {k: v.astype(np.float32) for k, v in dequantized(hf_tensors(cfg, seed=4)).items()}
    tokens = np.random.default_rng(4).integers(0, cfg.V, (4, 13))
    results = []
    for scanned in (False, True):
        tree = P.unflatten(hf_to_maxtext(hf, cfg, scanned))
        one = jax.device_put(tree, jax.devices()[0])
        refs = {}
        for shape, strategies in MESHES.items():
            mesh = Mesh(np.array(jax.devices()).reshape(shape), AXES)
            placed = jax.device_put(tree, M.param_shardings(tree, mesh))
            batch_axis = "fsdp" if tokens.shape[0] % mesh.shape["fsdp"] == 0 else None
            toks = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(batch_axis)))
            wi0 = P.flatten(placed)[("decoder/layers/layers_0" if scanned else "decoder/layers_0") + "/GptOssMlp/wi_0"]
            for strategy in strategies:
                if strategy == "megablox" and not scanned:
                    continue
                if strategy not in refs:
                    refs[strategy] = np.asarray(M.forward(one, jnp.asarray(tokens), cfg, moe=strategy))
                out = M.forward(placed, toks, cfg, moe=strategy)
                results.append({"mesh": list(shape), "scanned": scanned, "strategy": strategy,
                                "max_abs": float(np.abs(np.asarray(out) - refs[strategy]).max()),
                                "wi_0_spec": list(wi0.sharding.spec),
                                "wi_0_shard": list(wi0.addressable_shards[0].data.shape)})
    results.append(_restored_into_sharding(cfg, tokens))
    return results


def _restored_into_sharding(cfg, tokens) -> dict:
    """to-orbax output restored straight into the (2, 2, 2) mesh's shardings (each device reads
    its own slice; no full host copy), then the forward: equals the in-memory one-device run."""
    import tempfile
    from gptoss_convert.converters.to_orbax import to_orbax
    from gptoss_convert.io.orbax_reader import load_params
    from gptoss_convert.testing import write_checkpoint
    with tempfile.TemporaryDirectory() as d:
        src = write_checkpoint(Path(d) / "src", cfg, fmt="mxfp4", seed=4, tokenizer=False)
        root = to_orbax(src, Path(d) / "o", scanned=True, dtype="fp32", progress=False, log=lambda *_: None)
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), AXES)
        abstract = P.abstract_params(cfg, scanned=True, dtype=jnp.float32)
        restored = load_params(root / "0", abstract, sharding=M.param_shardings(abstract, mesh))
        hf = {k: v.astype(np.float32) for k, v in dequantized(hf_tensors(cfg, seed=4)).items()}
        ref = np.asarray(M.forward(P.unflatten(hf_to_maxtext(hf, cfg, True)), jnp.asarray(tokens), cfg))
        out = M.forward(restored, jnp.asarray(tokens), cfg)
        wi0 = P.flatten(restored)["decoder/layers/layers_0/GptOssMlp/wi_0"]
        return {"mesh": [2, 2, 2], "scanned": True, "strategy": "restored-sharded", "max_abs": float(np.abs(np.asarray(out) - ref).max()),
                "wi_0_spec": list(wi0.sharding.spec), "wi_0_shard": list(wi0.addressable_shards[0].data.shape)}


# ---- tests (parent process) ---------------------------------------------------------------------


def _run_worker() -> list[dict]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _expected_wi0_spec(scanned):
    # E=8, H=64, I=96 are divisible by every axis size used, so no dimension falls back.
    return ["expert", None, "fsdp", "tensor"] if scanned else ["expert", "fsdp", "tensor"]


@pytest.mark.slow
def test_sharded_forward_equals_one_device():
    results = _run_worker()
    expected = {(tuple(shape), scanned, s) for shape, strategies in MESHES.items() for s in strategies
                for scanned in (False, True) if s != "megablox" or scanned} | {((2, 2, 2), True, "restored-sharded")}
    assert {(tuple(r["mesh"]), r["scanned"], r["strategy"]) for r in results} == expected
    for r in results:
        shape = r["mesh"]
        assert r["max_abs"] < 1e-5, r
        assert r["wi_0_spec"] == _expected_wi0_spec(r["scanned"]), r
        # The experts really are split: each device holds E/expert × H/fsdp × I/tensor.
        e, h, i = (8 // shape[2], 64 // shape[0], 96 // shape[1])
        assert r["wi_0_shard"] == ([e, 3, h, i] if r["scanned"] else [e, h, i]), r


def test_partition_specs_follow_the_rules(tiny_cfg):
    mesh = AbstractMesh((2, 2, 4), AXES)
    specs = {p: M.partition_spec(p, s, mesh) for p, s in P.flat_shapes(tiny_cfg, scanned=True).items()}
    L0 = "decoder/layers/layers_0/"
    assert specs[L0 + "GptOssMlp/wi_0"] == PartitionSpec(None, None, "fsdp", "tensor")    # E=5: not divisible by 4
    assert specs[L0 + "GptOssMlp/wo"] == PartitionSpec(None, None, "tensor", "fsdp")
    assert specs[L0 + "GptOssAttention/query/kernel"] == PartitionSpec("fsdp", None, "tensor", None)
    assert specs[L0 + "GptOssAttention/out/kernel"] == PartitionSpec("tensor", None, None, "fsdp")
    assert specs[L0 + "GptOssAttention/sinks"] == PartitionSpec("tensor", None)
    assert specs["token_embedder/embedding"] == PartitionSpec("tensor", "fsdp")
    assert specs["decoder/logits_dense/kernel"] == PartitionSpec("fsdp", "tensor")
    unscanned = P.flat_shapes(tiny_config(num_local_experts=8), scanned=False)
    assert M.partition_spec("decoder/layers_3/GptOssMlp/wi_1", unscanned["decoder/layers_3/GptOssMlp/wi_1"],
                            mesh) == PartitionSpec("expert", "fsdp", "tensor")


def test_param_shardings_tree_matches_params(tiny_cfg):
    mesh = Mesh(jax.devices()[:1], ("fsdp",))   # a mesh lacking an axis replicates that dim
    for scanned in (False, True):
        abstract = P.abstract_params(tiny_cfg, scanned)
        sh = M.param_shardings(abstract, mesh)
        flat = P.flatten(sh)
        assert set(flat) == set(P.flat_shapes(tiny_cfg, scanned))
        assert all(isinstance(s, NamedSharding) for s in flat.values())
        assert {a for s in flat.values() for a in s.spec} <= {"fsdp", None}


def test_unknown_leaf_is_an_error(tiny_cfg):
    with pytest.raises(ValueError, match="no sharding rule"):
        M.partition_spec("decoder/layers_0/GptOssMlp/wi_2", (5, 64, 96), AbstractMesh((8,), ("fsdp",)))


if __name__ == "__main__":
    print(json.dumps(_worker()))

"""`to-orbax` from an Orbax SRC: scanned <-> unscanned relayout, bit-exact against a direct
conversion, from this tool's checkpoints and from an Orbax-saved training state; resumable;
and `to-hf` resumable too. Also the Qwen3-MoE BF16 round trip through the generic inverse."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import run_env
from gptoss_convert.converters.check import check
from gptoss_convert.converters.to_hf import to_hf
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.io.orbax_source import open_orbax
from gptoss_convert.tree import unflatten
from helpers import maxtext_load as _maxtext_load
from helpers import stored, tree_digest

QUIET = dict(progress=False, log=lambda *_: None)


def leaves(root) -> dict[str, np.ndarray]:
    src = open_orbax(root)
    return {p: src.read(p, ()) for p in src.leaves}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for p in a:
        assert a[p].dtype == b[p].dtype and a[p].tobytes() == b[p].tobytes(), p


@pytest.fixture(scope="module")
def direct(bf16_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    return {s: to_orbax(bf16_dir, root / str(s), scanned=s, **QUIET) for s in (True, False)}


@pytest.mark.parametrize("scanned", [True, False], ids=["to-scanned", "to-unscanned"])
def test_relayout_is_bit_exact_against_direct_conversion(direct, scanned, tmp_path):
    src = direct[not scanned]
    before = tree_digest(src)
    out = to_orbax(src, tmp_path / "out", scanned=scanned, **QUIET)
    assert_same(leaves(out), leaves(direct[scanned]))
    assert open_orbax(out).custom_metadata["scan_layers"] is scanned
    assert check(out, log=lambda *_: None)["command"] == "to-orbax"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert tree_digest(src) == before


def test_relayout_of_an_orbax_training_state_restores_through_maxtexts_call(direct, bf16_dir, tiny_cfg, tmp_path):
    """Params/params beside opt_state and step, OCDBT + zarr3, saved by Orbax itself; params only out."""
    params = leaves(direct[True])
    run = tmp_path / "run"
    mgr = ocp.CheckpointManager(run, item_names=("items",), item_handlers={
        "items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)})
    state = {"params": {"params": unflatten(params)}, "step": np.int32(3),
             "opt_state": {"nu": unflatten({p: np.ones(a.shape, np.float32) for p, a in params.items()})}}
    mgr.save(3, args=ocp.args.Composite(items=ocp.args.PyTreeSave(state)))
    mgr.wait_until_finished()
    out = to_orbax(run, tmp_path / "unscanned", scanned=False, like=bf16_dir, **QUIET)
    assert_same(leaves(out), leaves(direct[False]))
    got = _maxtext_load(out / "0", tiny_cfg, False, jax.numpy.bfloat16)
    want = leaves(direct[False])
    assert sorted(got) == sorted(want) and all(np.array_equal(got[p], want[p]) for p in want)
    assert json.loads((out / "conversion.json").read_text())["source_other_leaves_dropped"] == len(params) + 1


def test_dry_run_writes_nothing(direct, tmp_path):
    lines: list[str] = []
    moves = to_orbax(direct[True], tmp_path / "out", scanned=False, dry_run=True, log=lines.append)
    assert moves and "layout items:params/params" in lines[0]        # the source's layout, found, comes first
    assert "relayout scanned -> unscanned: 117 leaves" in lines[1]
    assert not (tmp_path / "out").exists()


def _cli(*args, kill=None):
    env = run_env() | ({"GPTOSS_CONVERT_KILL_AT": kill} if kill else {})
    return subprocess.run([sys.executable, "-m", "gptoss_convert", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("cmd", ["to-orbax", "to-hf"])
def test_killed_run_resumes_to_the_same_output(direct, tmp_path, cmd):
    src = direct[True] / "0"
    args = ["--unscanned"] if cmd == "to-orbax" else ["--mxfp4", "--max-shard-size", "200KB"]
    r = _cli(cmd, src, tmp_path / "out", *args, kill="journal:3")
    assert r.returncode == -9 and not (tmp_path / "out").exists()
    r = _cli(cmd, src, tmp_path / "out", *args, "--resume")
    assert r.returncode == 0 and "resuming" in r.stdout + r.stderr, r.stderr
    ref = _cli(cmd, src, tmp_path / "ref", *args)
    assert ref.returncode == 0
    if cmd == "to-orbax":
        assert_same(leaves(tmp_path / "out"), leaves(tmp_path / "ref"))
    else:
        a, b = stored(tmp_path / "out"), stored(tmp_path / "ref")
        assert sorted(a) == sorted(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)
        rec = json.loads((tmp_path / "out" / "conversion.json").read_text())["requantization"]
        assert rec == json.loads((tmp_path / "ref" / "conversion.json").read_text())["requantization"]
    assert check(tmp_path / "out", log=lambda *_: None)


def test_qwen3_bf16_round_trip_through_the_generic_inverse(tmp_path):
    """HF per-expert Qwen3-MoE -> Orbax (both layouts) -> HF: byte-identical tensors."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from test_qwen3_moe import TINY

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY)).to(torch.bfloat16)
    src = tmp_path / "qwen"
    model.save_pretrained(src)
    want = stored(src)
    for scanned in (True, False):
        orbax = to_orbax(src, tmp_path / f"orbax-{scanned}", scanned=scanned, **QUIET)
        hf = to_hf(orbax, tmp_path / f"hf-{scanned}", **QUIET)
        got = stored(hf)
        assert sorted(got) == sorted(want)
        assert all(got[n].tobytes() == want[n].tobytes() for n in want)
    with pytest.raises(Exception, match="gpt-oss only"):
        to_hf(orbax, tmp_path / "mx", mxfp4=True, **QUIET)
    assert os.path.isdir(src)


def test_relayout_refuses_nan_unless_allowed(direct, tmp_path):
    from helpers import write_orbax

    params = leaves(direct[True])
    a = params["decoder/layers/layers_0/GptOssAttention/sinks"].copy()
    a.reshape(-1)[1] = np.inf
    params["decoder/layers/layers_0/GptOssAttention/sinks"] = a
    src = write_orbax(tmp_path / "inf", params, direct[True], True)
    with pytest.raises(Exception,
                       match=r"layers_0/GptOssAttention/sinks \(rows 0:4, slot 1\).*NaN or inf.*--allow-nonfinite"):
        to_orbax(src, tmp_path / "out", scanned=False, **QUIET)
    assert not (tmp_path / "out").exists()
    out = to_orbax(src, tmp_path / "out", scanned=False, allow_nonfinite=True, **QUIET)
    assert np.isinf(leaves(out)["decoder/layers_2/GptOssAttention/sinks"].astype(np.float32)).sum() == 1


@pytest.mark.parametrize("scanned", [True, False], ids=["to-scanned", "to-unscanned"])
def test_relayout_blocks_are_whole_source_chunks_read_without_tensorstore(bf16_dir, scanned, tmp_path, monkeypatch):
    """A source written in small chunks (row blocks of the LM head and embedding, one expert per
    chunk): each relayout block is one whole chunk file, read with O_DIRECT, never through
    TensorStore (which reads every chunk a block touches whole, for every block), and nothing is
    counted for TensorStore's buffers; the output is the direct conversion's, bit for bit."""
    from gptoss_convert.converters.relayout import relayout_job
    from gptoss_convert.converters.sources import dtype_of
    from gptoss_convert.io.orbax_source import OrbaxSource
    src = to_orbax(bf16_dir, tmp_path / "src", scanned=not scanned, block_bytes=2048, **QUIET)
    want = to_orbax(bf16_dir, tmp_path / "want", scanned=scanned, block_bytes=2048, **QUIET)
    _, target = relayout_job(src, scanned=scanned, dtype=dtype_of("bf16"), block_bytes=4096)
    moves = target.plan.blocks
    assert target.plan.transient_blocks == 0 and target.memory.transient == 0
    assert len({m.src for m in moves}) < len(moves)                  # leaves in several blocks
    assert any(r.start > 0 for m in moves for r in m.region[1:])       # split along an axis other than the first
    ts_reads = []
    monkeypatch.setattr(OrbaxSource, "read_whole_chunk", _counted(OrbaxSource.read_whole_chunk, whole := []))
    monkeypatch.setattr(OrbaxSource, "_verify_read", lambda self, path, index: ts_reads.append(path))
    from gptoss_convert.converters import provenance
    hashed_apart = []
    monkeypatch.setattr(provenance, "file_digest", _counted(provenance.file_digest, hashed_apart, arg=True))
    out = to_orbax(src, tmp_path / "out", scanned=scanned, block_bytes=4096, **QUIET)
    assert ts_reads == [] and len(whole) == len(moves)
    assert hashed_apart and not [f for f in hashed_apart if "/c/" in str(f)]      # metadata only: chunks read once
    assert_same(leaves(out), leaves(want))
    # each chunk file's recorded hash came from its one O_DIRECT read: the file's own digest
    from gptoss_convert.io.files import file_digest
    recorded = json.loads((out / "conversion.json").read_text())["source"]["files"]
    step = tmp_path / "src" / "0"
    assert sorted(recorded) == sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert all(h["xxh3_128"] == file_digest(step / f) for f, h in recorded.items())


def _counted(fn, calls: list, arg: bool = False):
    """`fn`, noting each call (its first argument with `arg`, else that it returned something)."""
    def wrapped(*args, **kwargs):
        got = fn(*args, **kwargs)
        calls.append(args[0] if arg else got is not None)
        assert got is not None
        return got
    return wrapped

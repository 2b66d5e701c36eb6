"""`to-hf`: Orbax -> HF BF16 / MXFP4, checked against the source bytes, against transformers'
own loading and logits, and against this project's forward on a changed checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch

from conftest import run_env
from helpers import stored, tree_digest, write_orbax
from gptoss_convert.converters.check import check
from gptoss_convert.converters.to_hf import to_hf
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.errors import InputError, PlanError
from gptoss_convert.io.hf_checkpoint import SIDECAR_FILES
from gptoss_convert.io.orbax_reader import load_params
from gptoss_convert.io.safetensors import save_file
from gptoss_convert.mxfp4.codec import FP4_VALUES, dequantize, quantize
from gptoss_convert.tree import unflatten

QUIET = dict(progress=False, log=lambda *_: None)
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
BF16 = np.dtype(ml_dtypes.bfloat16)






def rule_fixture(root: Path, bf16_dir: Path, rule: str) -> Path:
    """An MXFP4 checkpoint whose expert weights were quantized with `rule` from fresh random
    BF16 weights (so the scales are that rule's), with one all-zero group per row of expert 0."""
    out = root / f"mx-{rule}"
    shutil.copytree(bf16_dir, out)
    tensors = stored(bf16_dir)
    rng = np.random.default_rng(5)
    for name in [n for n in tensors if n.endswith(EXPERTS)]:
        x = rng.normal(0, 0.05, tensors.pop(name).shape).astype(BF16)     # [E, in, out]
        x[0, :32, :] = 0
        tensors[name + "_blocks"], tensors[name + "_scales"] = quantize(np.swapaxes(x, -1, -2), rule)
    for f in list(out.glob("*.safetensors")) + [out / "model.safetensors.index.json"]:
        f.unlink()
    save_file(tensors, out / "model.safetensors", {"format": "pt"})
    conf = json.loads((out / "config.json").read_text())
    conf.pop("torch_dtype", None)
    published = Path(__file__).parents[1] / "gptoss_convert/testing/data/gpt-oss-20b.config.json"
    conf["quantization_config"] = json.loads(published.read_text())["quantization_config"]
    (out / "config.json").write_text(json.dumps(conf))
    return out


@pytest.fixture(scope="module")
def bf16_round(bf16_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16round")
    out = {}
    for scanned in (True, False):
        orbax = to_orbax(bf16_dir, root / f"orbax-{scanned}", scanned=scanned, **QUIET)
        out[scanned] = (orbax, to_hf(orbax, root / f"hf-{scanned}", max_shard_size="300KB", **QUIET))
    return out


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_bf16_round_trip_is_byte_identical(bf16_dir, bf16_round, scanned):
    orbax, hf = bf16_round[scanned]
    want, got = stored(bf16_dir), stored(hf)
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].tobytes() == want[n].tobytes(), n
    assert len(list(hf.glob("model-*.safetensors"))) > 1 and (hf / "model.safetensors.index.json").is_file()
    conf = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in conf and conf["dtype"] == "bfloat16"
    for f in SIDECAR_FILES:
        assert (hf / f).is_file() == (bf16_dir / f).is_file(), f
    assert check(hf, log=lambda *_: None)["command"] == "to-hf"


def _load(d: Path, mxfp4: bool):
    from transformers import GptOssForCausalLM, Mxfp4Config
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if mxfp4 else {}
    model, info = GptOssForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


TOKENS = np.random.default_rng(3).integers(0, 300, (2, 9))


def test_bf16_export_loads_in_transformers_with_every_key(bf16_dir, bf16_round):
    got = _logits(_load(bf16_round[True][1], False), TOKENS)
    want = _logits(_load(bf16_dir, False), TOKENS)
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def rule_round(bf16_dir, tmp_path_factory):
    """{(fixture rule, layout, export rule): (fixture dir, export dir)}."""
    root = tmp_path_factory.mktemp("mxround")
    out = {}
    for made in ("ocp", "triton"):
        src = rule_fixture(root, bf16_dir, made)
        for scanned in (True, False):
            orbax = to_orbax(src, root / f"orbax-{made}-{scanned}", scanned=scanned, **QUIET)
            for rule in ("ocp", "triton"):
                out[made, scanned, rule] = (src, to_hf(orbax, root / f"hf-{made}-{scanned}-{rule}", mxfp4=True,
                                                       scale_rule=rule, **QUIET))
    return out


def _expected_group_diffs(blocks: np.ndarray, scales: np.ndarray, made: str, rule: str) -> np.ndarray:
    """Groups whose bytes cannot survive a requantization of their values, read off the fixture's
    bytes: the all-zero groups when the rules differ (OCP writes scale 127, triton 0), and groups
    whose largest magnitude is code 3.0 (only triton's round-up makes them: amax in (3, 3.5)x the
    scale); either rule re-encodes those at half the scale (the same values, codes doubled)."""
    codes = np.stack([blocks & 0xF, blocks >> 4], -1).reshape(*scales.shape, 32)
    mag = np.abs(FP4_VALUES[codes]).max(-1)
    return ((mag == 0) & (made != rule)) | (mag == 3.0)


@pytest.mark.parametrize("made", ["ocp", "triton"])
@pytest.mark.parametrize("rule", ["ocp", "triton"])
@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_mxfp4_round_trip_value_exact_and_byte_exact_where_possible(rule_round, made, rule, scanned):
    src, hf = rule_round[made, scanned, rule]
    want, got = stored(src), stored(hf)
    assert sorted(got) == sorted(want)
    for n in want:
        if not n.endswith(("_blocks", "_scales")):
            assert got[n].tobytes() == want[n].tobytes(), n
            continue
        if n.endswith("_scales"):
            continue
        base = n[:-len("_blocks")]
        wb, ws, gb, gs = want[n], want[base + "_scales"], got[n], got[base + "_scales"]
        assert gb.shape == wb.shape and gs.shape == ws.shape and gb.dtype == gs.dtype == np.uint8
        np.testing.assert_array_equal(dequantize(gb, gs, np.float32).view(np.uint32),
                                      dequantize(wb, ws, np.float32).view(np.uint32), err_msg=n)
        differ = (gs != ws) | (gb != wb).any(-1)
        np.testing.assert_array_equal(differ, _expected_group_diffs(wb, ws, made, rule), err_msg=n)
    if made == "ocp":       # OCP's scales are canonical: its own rule gives every byte back
        assert all(got[n].tobytes() == want[n].tobytes() for n in want) == (rule == "ocp")
    conf = json.loads((hf / "config.json").read_text())
    assert conf["quantization_config"]["quant_method"] == "mxfp4"
    rep = json.loads((hf / "conversion.json").read_text())["requantization"]
    assert rep["rel_rms"] == 0 and rep["saturated"] == 0 and rep["clamped_groups"] == 0
    assert len(rep["tensors"]) == 2 * 6


def test_mxfp4_export_loads_in_transformers_and_gives_the_sources_logits(rule_round):
    src, hf = rule_round["triton", True, "triton"]
    np.testing.assert_array_equal(_logits(_load(hf, True), TOKENS), _logits(_load(src, True), TOKENS))


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_chunk_files_are_exactly_the_files_a_read_needs(bf16_round, bf16_dir, scanned, tmp_path):
    """OrbaxSource.chunk_files (what to-hf's read-ahead hash reads before each block, and what
    whole_chunk reads itself) against TensorStore's own reads: in a copy of the checkpoint where
    the leaves' other chunk files are gone, each block reads the same values; without any one
    of the files named, the read fails."""
    from gptoss_convert.converters.sources import OrbaxSrc, open_source
    from gptoss_convert.converters.to_hf import _index, export_plan, read_parts

    orbax = bf16_round[scanned][0]
    src = open_source(orbax, None)
    s = OrbaxSrc(src)
    backend, cfg = s.backend, s.cfg
    tensors = export_plan(backend, cfg, src, mxfp4=False, itemsize=2, block_bytes=4096)
    picks = [(t, rows) for t in tensors for rows in t.row_blocks()
             if t.name.endswith(("embed_tokens.weight", "lm_head.weight", "layers.1.mlp.experts.gate_up_proj",
                                 "layers.0.mlp.experts.down_proj", "layers.1.self_attn.q_proj.weight"))]
    assert len({t.name for t, _ in picks}) == 5 and len(picks) > 8      # row blocks of several chunks
    everything = set(src.files())
    whole = 0
    for k, (t, rows) in enumerate(picks[::3]):
        indices = [(p, _index(src, p, slot, t.expert, t.row_axis, rows)) for p, slot in t.sources]
        files = [f for p, i in indices for f in src.chunk_files(p, i)]
        whole += sum(src.whole_chunk(p, i) is not None for p, i in indices)
        assert files and set(files) <= everything and len(set(files)) == len(files)
        copy = tmp_path / f"c{k}"
        shutil.copytree(orbax, copy)
        step = copy / src.step_dir.name
        chunk_dirs = {(step / f).parent.as_posix().split("/c/")[0] for f in files}
        for f in everything - set(files):              # every other chunk of the leaves read
            if (step / f).as_posix().split("/c/")[0] in chunk_dirs and "/c/" in f:
                (step / f).unlink()
        want = [src.read(p, i) for p, i in indices]    # TensorStore's reads of the original
        got = read_parts(open_source(copy, None), t, rows)
        assert all(np.array_equal(a.view(np.uint16), b.view(np.uint16)) for a, b in zip(want, got)), t.name
        for f in files:
            data = (step / f).read_bytes()
            (step / f).unlink()
            with pytest.raises(Exception):
                read_parts(open_source(copy, None), t, rows)
            (step / f).write_bytes(data)
    assert whole > 2                                   # the expert blocks: whole chunks, read by us


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_whole_chunk_reads_equal_tensorstore_and_hash_their_file(bf16_round, scanned, tmp_path):
    """OrbaxSource.read_whole_chunk (to-hf's O_DIRECT read of this tool's chunk files) against
    TensorStore's read of the same index, on every expert of every expert leaf, and its digest
    against the file's; a shard index that is not a whole chunk's goes to TensorStore, which
    refuses it."""
    from gptoss_convert.io.files import file_digest
    from gptoss_convert.io.orbax_source import open_orbax

    orbax = bf16_round[scanned][0]
    src = open_orbax(orbax)
    n = 0
    for path, (shape, _) in src.leaves.items():
        if not path.endswith(("wi_0", "wi_1", "wo")):
            continue
        for e in range(shape[0]):
            index = (slice(e, e + 1), 1) if scanned else (e,)
            file = src.whole_chunk(path, index)
            assert file is not None, (path, index)
            arr, digest = src.read_whole_chunk(path, index, file)
            ref = src.read(path, index)
            assert arr.shape == ref.shape and np.array_equal(arr.view(np.uint16), ref.view(np.uint16))
            assert digest == file_digest(src.step_dir / file)
            n += 1
            last = path, index, file
    assert n >= 3 * 4
    path, index, file = last
    assert src.whole_chunk(path, (slice(0, 2),)) is None                  # two chunks: TensorStore's
    copy = tmp_path / "c"
    shutil.copytree(orbax, copy)
    (copy / "conversion.json").unlink()          # else the record's hash refuses the damage first (issue 22 §5)
    bad = open_orbax(copy)
    f = bad.step_dir / file
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF                                                       # the index's crc32c
    f.write_bytes(bytes(data))
    assert bad.read_whole_chunk(path, index, file) is None
    with pytest.raises(Exception, match="(?i)digest mismatch"):
        bad.read(path, index)


def test_block_files_none_where_chunks_are_not_files():
    """MaxText's own training checkpoint is OCDBT: no file per chunk, so nothing to read ahead
    (to-hf then hashes in the background)."""
    from gptoss_convert.io.orbax_source import open_orbax

    src = open_orbax(Path(__file__).parent / "data" / "maxtext_train" / "checkpoints")
    path = next(iter(src.leaves))
    assert src.chunk_files(path, ()) is None


def test_export_records_the_hash_of_every_source_file(bf16_round):
    """The read-ahead hash (a file per block, then the rest) gives every source file's digest,
    the same as hashing each file on its own."""
    from gptoss_convert.io.files import file_digest

    orbax, hf = bf16_round[True]
    rec = json.loads((hf / "conversion.json").read_text())["source"]
    step = Path(rec["path"])
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert sorted(rec["files"]) == files and len(files) > 50
    for f in files:
        assert rec["files"][f] == {"size": (step / f).stat().st_size, "xxh3_128": file_digest(step / f)}, f




@pytest.fixture(scope="module")
def changed(bf16_round, tmp_path_factory):
    """(params, root): every leaf of the converted checkpoint moved by noise, in BF16."""
    orbax = bf16_round[True][0]
    rng = np.random.default_rng(11)
    params = {}
    for p, a in _flat(load_params(orbax / "0")).items():
        a = a.astype(np.float32)
        params[p] = (a + rng.normal(0, 0.1 * (a.std() + 1e-3), a.shape)).astype(BF16)
    return params, write_orbax(tmp_path_factory.mktemp("changed") / "ckpt", params, orbax, True)


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": np.asarray(v)}
    return out


def test_changed_weights_export_equals_our_forward(changed, bf16_dir, tmp_path):
    from gptoss_convert.backends.gpt_oss.model import forward
    from gptoss_convert.testing import tiny_config

    params, root = changed
    hf = to_hf(root, tmp_path / "hf", **QUIET)
    ours = np.asarray(forward(unflatten({p: a.astype(np.float32) for p, a in params.items()}),
                              TOKENS.astype(np.int32), tiny_config(), moe="dense"))
    theirs = _logits(_load(hf, False), TOKENS)
    assert np.abs(ours - theirs).max() < 1e-4


def test_changed_weights_mxfp4_report_and_kl(changed, tmp_path):
    from gptoss_convert.verify.verify import verify

    _, root = changed
    lines: list[str] = []
    hf = to_hf(root, tmp_path / "mx", mxfp4=True, progress=False, log=lines.append)
    rep = json.loads((hf / "conversion.json").read_text())["requantization"]
    assert 0.01 < rep["rel_rms"] < 0.3 and rep["saturated"] == 0 and rep["clamped_groups"] == 0
    assert all(0 < t["rel_rms"] < 0.3 for t in rep["tensors"].values())
    assert any(line.startswith("requantized 12 expert tensors (triton scales)") for line in lines)
    ocp_rep = json.loads((to_hf(root, tmp_path / "mx-ocp", mxfp4=True, scale_rule="ocp", **QUIET)
                          / "conversion.json").read_text())["requantization"]
    assert ocp_rep["saturated"] > 0            # OCP's floor rule clips the groups' largest values
    # the KL between the BF16 model (SRC) and its MXFP4 export: verify SRC against the export
    report = verify(root, hf=hf, moe="dense", max_kl=10.0, atol=100, rtol=100, log=lambda *_: None)
    kl = max(r["max_kl"] for r in report["prompts"])
    assert 0 < kl < 1.0


def test_training_state_saved_by_orbax_exports(changed, bf16_dir, tmp_path, monkeypatch):
    """MaxText's training checkpoint: params/params beside opt_state and step, OCDBT + zarr3,
    saved by Orbax's CheckpointManager, no config beside it and no scan_layers metadata."""
    params, root = changed
    run = tmp_path / "run"
    mgr = ocp.CheckpointManager(run, item_names=("items",), item_handlers={
        "items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)})
    state = {"params": {"params": unflatten(params)},
             "opt_state": {"mu": unflatten({p: np.zeros(a.shape, np.float32) for p, a in params.items()})},
             "step": np.int32(7)}
    for step in (5, 7):
        mgr.save(step, args=ocp.args.Composite(items=ocp.args.PyTreeSave(state)))
    mgr.wait_until_finished()
    assert (run / "7" / "items" / "manifest.ocdbt").is_file()
    shutil.copytree(run / "7", run / "9")           # a save cut short: no commit marker
    (run / "9" / "commit_success.txt").unlink()
    meta = json.loads((run / "9" / "_CHECKPOINT_METADATA").read_text())
    meta.pop("commit_timestamp_nsecs")
    (run / "9" / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    before = tree_digest(run)

    with pytest.raises(InputError, match="pass --like"):
        to_hf(run, tmp_path / "x", **QUIET)
    with pytest.raises(InputError, match=r"9: Orbax step without its commit marker"):
        to_hf(run, tmp_path / "x", step=9, like=bf16_dir, **QUIET)
    lines: list[str] = []
    hf = to_hf(run, tmp_path / "hf", like=bf16_dir, progress=False, log=lines.append)   # latest committed: 7
    assert "from step 7 (scanned)" in lines[-1]
    ref = to_hf(root, tmp_path / "ref", **QUIET)
    want, got = stored(ref), stored(hf)
    assert sorted(want) == sorted(got) and all(want[n].tobytes() == got[n].tobytes() for n in want)
    assert json.loads((hf / "conversion.json").read_text())["source_other_leaves"] == len(params) + 1
    monkeypatch.setattr("gptoss_convert.converters.sources.SMALL_FILE", 2000)   # the blobs count as big
    hf5 = to_hf(run / "5" / "items", tmp_path / "hf5", like=bf16_dir, **QUIET)
    files = json.loads((hf5 / "conversion.json").read_text())["source"]["files"]
    assert all(("xxh3_128" in m) == (m["size"] < 2000) for m in files.values())
    assert "xxh3_128" in files["_CHECKPOINT_METADATA"] and any("xxh3_128" not in m for m in files.values())
    assert stored(hf5).keys() == got.keys()
    assert tree_digest(run) == before and not (tmp_path / "x").exists()


def test_non_gpt_oss_tree_names_missing_and_unexpected_leaves(changed, tmp_path):
    params, root = changed
    bad = dict(params)
    bad.pop("decoder/decoder_norm/scale")
    bad["decoder/extra_norm/scale"] = params["decoder/decoder_norm/scale"]
    src = write_orbax(tmp_path / "bad", bad, root, True)
    with pytest.raises(PlanError, match=r"(?s)missing leaves: decoder/decoder_norm/scale.*"
                                        r"unexpected leaves: decoder/extra_norm/scale"):
        to_hf(src, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


def test_shapes_disagreeing_with_like_config_are_named(changed, bf16_dir, tmp_path):
    _, root = changed
    like = tmp_path / "like"
    like.mkdir()
    conf = json.loads((bf16_dir / "config.json").read_text()) | {"intermediate_size": 128}
    (like / "config.json").write_text(json.dumps(conf))
    with pytest.raises(PlanError, match=r"GptOssMlp/wi_0 is \[5, 3, 64, 96\], config needs \[5, 3, 64, 128\]"):
        to_hf(root, tmp_path / "out", like=like, **QUIET)
    assert not (tmp_path / "out").exists()


def test_nan_refused_unless_allowed_and_never_requantized(changed, tmp_path):
    params, root = changed
    bad = dict(params)
    a = bad["decoder/layers/layers_1/GptOssMlp/wi_1"].copy()
    a.reshape(-1)[7] = np.nan
    bad["decoder/layers/layers_1/GptOssMlp/wi_1"] = a
    src = write_orbax(tmp_path / "nan", bad, root, True)
    before = tree_digest(src)
    with pytest.raises(InputError, match=r"model.layers.1.mlp.experts.gate_up_proj.*NaN or inf.*--allow-nonfinite"):
        to_hf(src, tmp_path / "a", **QUIET)
    with pytest.raises(InputError, match=r"gate_up_proj.*MXFP4 cannot encode them"):
        to_hf(src, tmp_path / "b", mxfp4=True, allow_nonfinite=True, **QUIET)
    hf = to_hf(src, tmp_path / "c", allow_nonfinite=True, **QUIET)
    assert np.isnan(stored(hf)["model.layers.1.mlp.experts.gate_up_proj"].astype(np.float32)).sum() == 1
    assert tree_digest(src) == before and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_to_hf_and_its_errors(bf16_round, tmp_path):
    orbax = bf16_round[False][0]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "gptoss_convert", "to-hf", *map(str, args), "--no-progress"],
                              capture_output=True, text=True, env=run_env(), timeout=300)
    r = cli(orbax, tmp_path / "dry", "--mxfp4", "--dry-run")
    assert r.returncode == 0 and "model.layers.0.mlp.experts.gate_up_proj [5, 64, 192] <- " in r.stdout
    assert "-> MXFP4 blocks+scales" in r.stdout and not (tmp_path / "dry").exists()
    r = cli(orbax / "0" / "items", tmp_path / "out", "--mxfp4", "--scale-rule", "ocp")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "model.layers.0.mlp.experts.down_proj_blocks" in stored(tmp_path / "out")
    r = cli(tmp_path / "nothing", tmp_path / "out2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nothing: not a directory" in r.stderr


@pytest.mark.parametrize("rule", ["ocp", "triton", "triton-rtne"])
def test_bf16_fast_path_equals_the_float_path_on_every_bf16_pattern(rule):
    """The integer path quantize() takes for bf16 against its float32 path (the rule's
    arithmetic step by step), on every finite bf16 value that keeps the scale in range, in
    shuffled groups, plus all-zero and -0 groups."""
    from gptoss_convert.mxfp4.codec import _quantize_bf16

    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = ((bits & 0x7FFF) < 0x7F80) & (((bits >> 7) & 0xFF) >= 12)
    vals = np.random.default_rng(0).permutation(bits[finite])
    vals = np.concatenate([vals[: len(vals) // 32 * 32], np.zeros(32, np.uint16), np.full(32, 0x8000, np.uint16)])
    for arr in (vals.view(BF16).reshape(-1, 64), np.sort(vals).view(BF16).reshape(-1, 32)):
        fast = _quantize_bf16(arr, rule)
        slow = quantize(arr.astype(np.float32), rule)
        assert fast is not None
        np.testing.assert_array_equal(fast[0], slow[0])
        np.testing.assert_array_equal(fast[1], slow[1])


@pytest.mark.parametrize("amax, ocp_scale, triton_scale, ocp_code, triton_code", [
    (6.0, 0, 0, 7, 7),        # 6 = 1.5 * 2**2: both rules scale 2**0, code 6.0
    (4.0, 0, 0, 6, 6),
    (7.0, 0, 1, 7, 6),        # OCP saturates 7 -> 6; triton scales 2**1: 3.5 -> 4.0 (tie to even code)
    (3.25, -1, 0, 7, 5),      # triton rounds 3.25 -> 3.0 (code 5) at 2**0; OCP 6.5 -> 6 at 2**-1
    (1.0, -2, -2, 6, 6),
])
def test_scale_rules_by_hand(amax, ocp_scale, triton_scale, ocp_code, triton_code):
    w = np.zeros(32, np.float32)
    w[5] = amax
    for rule, scale, code in (("ocp", ocp_scale, ocp_code), ("triton", triton_scale, triton_code)):
        blocks, scales = quantize(w, rule)
        assert int(scales[0]) - 127 == scale and (int(blocks[0, 2]) >> 4) == code, rule
        b16, s16 = quantize(w.astype(BF16), rule)
        assert b16.tobytes() == blocks.tobytes() and s16.tobytes() == scales.tobytes()
    assert quantize(np.zeros(32, np.float32), "triton")[1][0] == 0
    assert quantize(np.zeros(32, np.float32), "ocp")[1][0] == 127


# Every midpoint between two E2M1 magnitudes, at scale 2**0 (the group's 6.0 fixes it under every
# rule): "triton" (triton_kernels as vLLM ships it, and as it was when gpt-oss was published)
# rounds each tie up; "triton-rtne" and "ocp" round it to the even code (triton PR #8110 made
# triton_kernels do that). An exact tie is common in bf16: 18% of the groups of normal weights
# differ between the two (checks/triton_scale_rule.py).
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
TIES_UP = [1, 2, 3, 4, 5, 6, 7]          # the code above each midpoint
TIES_EVEN = [0, 2, 2, 4, 4, 6, 6]


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
@pytest.mark.parametrize("rule, codes", [("triton", TIES_UP), ("triton-rtne", TIES_EVEN), ("ocp", TIES_EVEN)])
def test_element_ties_by_rule(rule, codes, dtype):
    w = np.zeros(32, np.float32)
    w[0] = 6.0
    w[1:1 + len(TIES)] = TIES
    w[16:16 + len(TIES)] = -np.asarray(TIES)
    blocks, scales = quantize(w.astype(dtype), rule)
    assert int(scales[0]) == 127
    got = np.stack([blocks[0] & 0xF, blocks[0] >> 4], -1).reshape(-1)
    assert got[1:1 + len(TIES)].tolist() == codes
    assert got[16:16 + len(TIES)].tolist() == [c | 8 for c in codes]


@pytest.mark.parametrize("rule", ["ocp", "triton", "triton-rtne"])
def test_one_pass_report_equals_the_report_from_dequantized_values(rule):
    """quantize_with_report's table-driven figures (bf16) against quantize_report, which
    dequantizes the result and compares it with the weights."""
    from gptoss_convert.mxfp4.codec import quantize_report, quantize_with_report

    w = (np.random.default_rng(4).standard_t(3, (96, 256)) * 0.02).astype(BF16)
    w[3, :32] = 0
    blocks, scales, fast = quantize_with_report(w, rule)
    slow = quantize_report(w, blocks, scales, rule)
    assert fast["saturated"] == slow["saturated"] and fast["clamped_groups"] == slow["clamped_groups"] == 0
    assert (fast["saturated"] > 0) == (rule == "ocp")
    for key in ("err2", "ref2"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-5)


@pytest.mark.parametrize("rule", ["ocp", "triton", "triton-rtne"])
def test_column_quantizer_equals_transpose_then_quantize(rule):
    """quantize_with_report_transposed (groups down the columns: to-hf --mxfp4's XLA kernel,
    mxfp4/columns.py) against transposing and quantize_with_report (numpy, row groups), on
    every bf16 pattern the fast path takes, and on inputs that fall back: a group too small for
    E8M0's range, a NaN, and float32."""
    from gptoss_convert.mxfp4.codec import _quantize_bf16_columns, quantize_with_report, quantize_with_report_transposed

    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = ((bits & 0x7FFF) < 0x7F80) & (((bits >> 7) & 0xFF) >= 12)
    vals = np.random.default_rng(1).permutation(bits[finite])
    vals = np.concatenate([vals, np.zeros(-len(vals) % 960 + 32, np.uint16), np.full(32, 0x8000, np.uint16)])
    stored_rows = vals[: len(vals) // 960 * 960].view(BF16).reshape(3, -1, 64)          # [M, out, in] as stored
    tiny = (np.random.default_rng(2).normal(0, 0.02, (2, 5, 64))).astype(BF16)
    tiny[1, 3, 32:] = np.float32(1e-37)                                                   # scale below E8M0: float path
    for rows, fast in ((tiny, False), (stored_rows, True)):       # which path each input takes
        assert (_quantize_bf16_columns([np.swapaxes(rows, -1, -2).copy()], rule) is not None) == fast
    for rows in (stored_rows, tiny, tiny.astype(np.float32)):
        want = quantize_with_report(rows, rule)
        got = quantize_with_report_transposed(np.ascontiguousarray(np.swapaxes(rows, -1, -2)), rule)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[2]["saturated"] == want[2]["saturated"] and got[2]["clamped_groups"] == want[2]["clamped_groups"]
        assert (got[2]["saturated"] > 0) == (rule == "ocp")
        for key in ("err2", "ref2"):        # float32 sums of 32 (the kernel's) against float64 ones
            assert got[2][key] == pytest.approx(want[2][key], rel=1e-6)
    nan = stored_rows.copy()
    nan[1, 7, 40] = np.nan
    assert _quantize_bf16_columns([np.swapaxes(nan, -1, -2).copy()], rule) is None
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_with_report_transposed(np.swapaxes(nan, -1, -2).copy(), rule)


@pytest.mark.parametrize("rule", ["ocp", "triton"])
def test_interleaved_parts_quantize_as_the_interleaved_tensor(rule):
    """quantize_columns([gate, up]) (to-hf's gate_up_proj from wi_0 and wi_1, never interleaved
    as bf16) gives the bytes of quantizing interleave([gate, up]), bf16 and float32 alike."""
    from gptoss_convert.mapping.transforms import interleave
    from gptoss_convert.mxfp4.codec import quantize_columns, quantize_with_report_transposed

    rng = np.random.default_rng(5)
    for dtype in (BF16, np.float32):
        parts = [(rng.standard_t(3, (3, 96, 40)) * 0.02).astype(dtype) for _ in range(2)]
        got = quantize_columns(parts, rule)
        want = quantize_with_report_transposed(interleave(parts), rule)
        assert got[0].shape == (3, 80, 3, 16) and got[1].shape == (3, 80, 3)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[2]["saturated"] == want[2]["saturated"]
        assert got[2]["err2"] == pytest.approx(want[2]["err2"], rel=1e-6)


@pytest.mark.parametrize("ties_up", [False, True])
def test_computed_codes_equal_the_code_table_on_every_magnitude(ties_up):
    """The XLA kernel computes each E2M1 code from the bits (mxfp4/columns.codes); numpy's path
    looks it up in a table built by searchsorted over the midpoints. All 32640 finite bf16
    magnitudes, both tie rules."""
    import jax
    import jax.numpy as jnp

    from gptoss_convert.mxfp4.codec import _bf16_code_table
    from gptoss_convert.mxfp4.columns import codes

    idx = np.arange(0x7F80, dtype=np.int32)
    got = np.asarray(jax.jit(lambda i: codes(i, ties_up))(jnp.asarray(idx)))
    np.testing.assert_array_equal(got, _bf16_code_table(ties_up)[idx])


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=["bf16", "f16"])
def test_finiteness_on_bits_equals_isfinite_on_every_pattern(dtype):
    """The one NaN/inf check (finite.py) reads the bits; against np.isfinite on each of the 65536
    16-bit patterns, and the count and first index it reports."""
    from gptoss_convert.finite import all_finite, nonfinite

    vals = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    want = np.isfinite(vals.astype(np.float32))
    got = np.array([all_finite(vals[i:i + 1].reshape(1, 1)) for i in range(len(vals))])
    np.testing.assert_array_equal(got, want)
    first = tuple(int(i) for i in np.unravel_index(np.argmin(want), (256, 256)))
    assert nonfinite(vals.reshape(256, 256)) == (int((~want).sum()), first)
    assert all_finite(vals[:0]) and all_finite(np.float32([1, 2])) and not all_finite(np.float32([1, np.inf]))
    assert not all_finite(np.float64([np.nan])) and all_finite(np.int32([1]))

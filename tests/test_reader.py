"""The HF checkpoint reader: index validation, virtual MXFP4 tensors, hub cache resolution."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_env
from gptoss_convert import mxfp4
from gptoss_convert.errors import CorruptTensorError, InputError
from gptoss_convert.io.hf_checkpoint import HFCheckpoint
from gptoss_convert.io.safetensors import read_header
from gptoss_convert.testing.tiny import hf_tensors


def test_virtual_tensors_are_dequantized_in_hf_orientation(mxfp4_dir, tiny_cfg):
    ck = HFCheckpoint(mxfp4_dir)
    raw = hf_tensors(tiny_cfg, seed=0)
    name = "model.layers.2.mlp.experts.down_proj"
    vt = ck.tensors[name]
    assert vt.is_mxfp4 and vt.shape == (5, 96, 64)        # [E, I, H]; stored [E, H, I/32, 16]
    full = ck.read(name, dtype=np.float32)
    ref = np.swapaxes(mxfp4.dequantize(raw[name + "_blocks"], raw[name + "_scales"], np.float32), 1, 2)
    np.testing.assert_array_equal(full, ref)
    np.testing.assert_array_equal(ck.read(name, rows=slice(3, 4), dtype=np.float32), ref[3:4])
    assert name + "_blocks" not in ck.tensors and name + "_scales" not in ck.tensors
    emb = ck.read("model.embed_tokens.weight", rows=slice(10, 20))
    np.testing.assert_array_equal(emb.view(np.uint16), raw["model.embed_tokens.weight"][10:20].view(np.uint16))


def test_index_must_agree_with_shards(mxfp4_dir, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(mxfp4_dir, src)
    idx = src / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["model.layers.99.extra"] = next(iter(data["weight_map"].values()))
    name = next(iter(data["weight_map"]))
    del data["weight_map"][name]
    idx.write_text(json.dumps(data))
    with pytest.raises(InputError) as e:
        HFCheckpoint(src)
    assert "model.layers.99.extra" in str(e.value) and name in str(e.value)


def test_missing_shard_and_symlink_escape(mxfp4_dir, tmp_path):
    src = tmp_path / "s"
    shutil.copytree(mxfp4_dir, src)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    with pytest.raises(InputError, match="do not exist"):
        HFCheckpoint(src)
    os.symlink(outside, shard)
    with pytest.raises(InputError, match="outside the checkpoint directory"):
        HFCheckpoint(src)


def test_overlapping_offsets_rejected(tmp_path):
    import struct
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    blob = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(24))
    with pytest.raises(CorruptTensorError, match="overlap"):
        read_header(tmp_path / "x.safetensors")


def test_hub_id_resolved_offline_from_cache(mxfp4_dir, tmp_path):
    """A pre-populated cache in huggingface_hub's own layout serves a repo id with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    snap = cache / "models--openai--gpt-oss-tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(mxfp4_dir, snap)                                 # with the published original/ decoy
    assert (snap / "original" / "model.safetensors").is_file()
    (cache / "models--openai--gpt-oss-tiny" / "refs").mkdir()
    (cache / "models--openai--gpt-oss-tiny" / "refs" / "main").write_text("a" * 40)
    code = ("from gptoss_convert.io.hf_checkpoint import open_checkpoint;"
            "ck = open_checkpoint('openai/gpt-oss-tiny'); print(ck.dir); print(len(ck.tensors))")
    env = run_env() | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    path, n = r.stdout.split()
    assert path == str(snap) and int(n) == len(HFCheckpoint(mxfp4_dir).tensors)
    r = subprocess.run([sys.executable, "-m", "gptoss_convert", "dequantize", "openai/not-cached", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "not in the local HF cache" in r.stderr and "Traceback" not in r.stderr


def test_read_parts_decodes_each_interleaved_part_from_its_own_rows(mxfp4_dir, bf16_dir, tiny_cfg):
    """gate/up split: read_parts(name, 2) == [read(name)[..., 0::2], read(name)[..., 1::2]], each contiguous,
    for the MXFP4 pair (decoded from stored rows 0::2 / 1::2), a stored BF16 tensor and a stored bias."""
    raw = hf_tensors(tiny_cfg, seed=0)
    gu = "model.layers.1.mlp.experts.gate_up_proj"
    stored = np.swapaxes(mxfp4.dequantize(raw[gu + "_blocks"], raw[gu + "_scales"], np.float32), 1, 2)  # [E, H, 2I]
    for src, name, rows in [(mxfp4_dir, gu, slice(2, 4)), (mxfp4_dir, gu, None), (bf16_dir, gu, slice(4, 5)),
                            (mxfp4_dir, gu + "_bias", slice(0, 3))]:
        ck = HFCheckpoint(src)
        whole = ck.read(name, rows, dtype=np.float32)
        parts = ck.read_parts(name, 2, rows, dtype=np.float32)
        assert len(parts) == 2
        for p, part in enumerate(parts):
            assert part.flags.c_contiguous and part.shape == whole[..., p::2].shape
            np.testing.assert_array_equal(part, whole[..., p::2])
        outs = [np.full_like(part, -1) for part in parts]              # into given buffers: the same values
        given = iter(outs)
        got = ck.read_parts(name, 2, rows, dtype=np.float32, alloc=lambda shape, dt: next(given))
        assert all(a is b for a, b in zip(got, outs))
        for p, out in enumerate(outs):
            np.testing.assert_array_equal(out, parts[p])
        if name == gu and src == mxfp4_dir:                           # and against the codec directly
            np.testing.assert_array_equal(parts[1], stored[rows or slice(None), :, 1::2])
    with pytest.raises(ValueError, match="does not split into 7"):
        HFCheckpoint(mxfp4_dir).read_parts(gu, 7)

"""Bad input to `dequantize`/`to-orbax`: one-line error naming the culprit, non-zero exit,
no OUT (not even half-written), SRC untouched."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gptoss_convert.cli import main
from gptoss_convert.io.safetensors import read_header, save_file

GU = "model.layers.0.mlp.experts.gate_up_proj"


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _shard_of(src: Path, tensor: str) -> Path:
    wm = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    return src / wm[tensor]


def _rewrite_tensor(src: Path, name: str, new_name_to_array: dict[str, np.ndarray | None]) -> None:
    """Rewrite the shard holding `name`, replacing/removing tensors (keeps the index in sync)."""
    shard = _shard_of(src, name)
    from gptoss_convert.io.safetensors import read_tensor
    header, meta = read_header(shard)
    tensors = {n: read_tensor(t) for n, t in header.items()}
    for n, arr in new_name_to_array.items():
        if arr is None:
            tensors.pop(n)
        else:
            tensors[n] = arr
    save_file(tensors, shard, meta)
    idx = src / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"] = {n: f for n, f in data["weight_map"].items() if n in tensors or f != shard.name}
    data["weight_map"] |= {n: shard.name for n in tensors}
    idx.write_text(json.dumps(data))


def truncated_shard(src):
    shard = _shard_of(src, GU + "_blocks")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    return shard.name


def header_too_long(src):
    shard = _shard_of(src, GU + "_blocks")
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    shard.write_bytes(bytes(data))
    return shard.name


def blocks_wrong_dtype(src):
    shard = _shard_of(src, GU + "_blocks")
    from gptoss_convert.io.safetensors import read_tensor
    arr = read_tensor(read_header(shard)[0][GU + "_blocks"])
    _rewrite_tensor(src, GU + "_blocks", {GU + "_blocks": arr.astype(np.int16)})
    return GU + "_blocks"


def blocks_scales_mismatch(src):
    from gptoss_convert.io.safetensors import read_tensor
    shard = _shard_of(src, GU + "_scales")
    arr = read_tensor(read_header(shard)[0][GU + "_scales"])
    _rewrite_tensor(src, GU + "_scales", {GU + "_scales": arr[:, :, :1].copy()})
    return GU + "_scales"


def missing_scales(src):
    _rewrite_tensor(src, GU + "_scales", {GU + "_scales": None})
    return GU + "_scales"


def scale_255(src):
    from gptoss_convert.io.safetensors import read_tensor
    shard = _shard_of(src, GU + "_scales")
    arr = read_tensor(read_header(shard)[0][GU + "_scales"]).copy()
    arr[3, 17, 1] = 255
    _rewrite_tensor(src, GU + "_scales", {GU + "_scales": arr})
    return "(3, 17, 1)"


def index_escapes(src):
    idx = src / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../x.safetensors"
    idx.write_text(json.dumps(data))
    return "../x.safetensors"


def missing_config(src):
    (src / "config.json").unlink()
    return "config.json"


def unknown_quant(src):
    conf = json.loads((src / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "gptq"}
    (src / "config.json").write_text(json.dumps(conf))
    return "gptq"


def shapes_disagree_with_config(src):
    conf = json.loads((src / "config.json").read_text())
    conf["intermediate_size"] = 64
    (src / "config.json").write_text(json.dumps(conf))
    return "shapes disagree with config.json"


def other_model_type(src):
    conf = json.loads((src / "config.json").read_text())
    conf["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(conf))
    return "known model types: gpt_oss"


CASES = [truncated_shard, header_too_long, blocks_wrong_dtype, blocks_scales_mismatch, missing_scales,
         scale_255, index_escapes, missing_config, unknown_quant, shapes_disagree_with_config, other_model_type]


@pytest.mark.parametrize("command", ["dequantize", "to-orbax"])
@pytest.mark.parametrize("corrupt", CASES, ids=lambda f: f.__name__)
def test_bad_source(mxfp4_dir, tmp_path, corrupt, command):
    src = tmp_path / "src"
    shutil.copytree(mxfp4_dir, src)
    needle = corrupt(src)
    before = _snapshot(src)
    out = tmp_path / "out"
    args = [command, str(src), str(out), "--no-progress"] + (["--scanned"] if command == "to-orbax" else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    err = r.stderr if hasattr(r, "stderr") else r.output
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # one line, or (several problems, issue 22 §8) a header line and one `  - ` line per problem
    assert lines[0].startswith("error: ") and all(ln.startswith(("  - ", "  ... and ")) for ln in lines[1:]), err
    assert needle in " ".join(lines), (needle, lines)
    assert "Traceback" not in err
    assert not out.exists()
    assert _snapshot(src) == before


def test_read_only_out(mxfp4_dir, tmp_path):
    ro = Path("/sys/gptoss-convert-out")  # root ignores mode bits; sysfs refuses new entries even to root
    try:
        ro.mkdir()
        ro.rmdir()
        pytest.skip("no read-only location available on this machine")
    except OSError:
        pass
    r = CliRunner().invoke(main, ["dequantize", str(mxfp4_dir), str(ro), "--no-progress"])
    assert r.exit_code != 0
    assert "error: " in r.output and str(ro) in r.output and "choose another OUT" in r.output


def test_scale_overflowing_to_inf_is_refused(mxfp4_dir, tmp_path):
    """Scale 254 with an element of magnitude >= 2 is 2^128+: inf in bf16/fp32 (transformers emits inf)."""
    from gptoss_convert.io.safetensors import read_tensor
    src = tmp_path / "src"
    shutil.copytree(mxfp4_dir, src)
    shard = _shard_of(src, GU + "_scales")
    scales = read_tensor(read_header(shard)[0][GU + "_scales"]).copy()
    blocks = read_tensor(read_header(_shard_of(src, GU + "_blocks"))[0][GU + "_blocks"]).copy()
    scales[2, 5, 0] = 254
    blocks[2, 5, 0, :] = 0x44                                   # every element +2.0: 2 * 2^127 = 2^128
    _rewrite_tensor(src, GU + "_scales", {GU + "_scales": scales})
    _rewrite_tensor(src, GU + "_blocks", {GU + "_blocks": blocks})
    r = CliRunner().invoke(main, ["dequantize", str(src), str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 2 and "scale byte 254 at index (2, 5, 0)" in r.output and "inf" in r.output
    scales[2, 5, 0] = 253                                       # 2.0 * 2^126 is finite: accepted
    _rewrite_tensor(src, GU + "_scales", {GU + "_scales": scales})
    r = CliRunner().invoke(main, ["dequantize", str(src), str(tmp_path / "out2"), "--no-progress"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("layer_types", [True, False])
def test_odd_layer_count_under_scanned_is_refused_naming_unscanned(tmp_path, layer_types):
    """gpt-oss's scanned layout stacks (sliding, full) pairs: 3 layers cannot be scanned. One line
    naming the count and --unscanned, exit 2, nothing written; --unscanned converts it."""
    from gptoss_convert.testing.tiny import tiny_config, write_checkpoint

    src = write_checkpoint(tmp_path / "src", tiny_config(num_hidden_layers=3), fmt="mxfp4", seed=0)
    if not layer_types:
        raw = json.loads((src / "config.json").read_text())
        del raw["layer_types"]
        (src / "config.json").write_text(json.dumps(raw))
    before = _snapshot(src)
    r = CliRunner().invoke(main, ["to-orbax", str(src), str(tmp_path / "out"), "--scanned", "--no-progress"])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == ("error: num_hidden_layers=3 is not a multiple of 2: MaxText's scanned layout stacks "
                                "the layers in groups of 2 (one per attention kind); convert with --unscanned")
    assert not (tmp_path / "out").exists() and _snapshot(src) == before
    r = CliRunner().invoke(main, ["to-orbax", str(src), str(tmp_path / "out"), "--unscanned", "--no-progress"])
    assert r.exit_code == 0, r.output

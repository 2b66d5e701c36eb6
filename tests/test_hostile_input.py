"""Hostile and malformed input across the commands: one line naming the offender, a non-zero
exit, no traceback (unless --debug); nothing read outside SRC, nothing written outside OUT.

Extends tests/test_bad_input.py (truncation, MXFP4 pairing, scale 255, '..' in the index,
config/model mismatches) with random headers (Hypothesis), links out of SRC, config types and
sizes, NaN/inf weights and malformed golden files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_env
from gptoss_convert.cli import main
from gptoss_convert.converters.common import check_against_backend
from gptoss_convert.converters.dequantize import dequantize
from gptoss_convert.errors import ConvertError, CorruptTensorError, InputError
from gptoss_convert.io.hf_checkpoint import INDEX, HFCheckpoint
from gptoss_convert.io.safetensors import DTYPES, read_header, read_tensor, save_file

QUIET = dict(progress=False, log=lambda *_: None)
HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- helpers ------------------------------------------------------------------------------------
def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _copy_src(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _first_shard(src: Path) -> Path:
    return src / sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))[0]


def _one_line_error(r, *needles: str, code: int | None = None) -> str:
    """The CLI (run in-process) printed exactly one `error: ` line holding every needle."""
    assert isinstance(r.exception, SystemExit), f"unhandled {r.exception!r}\n{r.output}"   # no traceback path
    assert r.exit_code != 0 and (code is None or r.exit_code == code), (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _refused(src: Path, tmp_path: Path, *needles: str, command: str = "dequantize", code: int | None = 2,
             extra: tuple[str, ...] = (), mid_stream: bool = False) -> str:
    """Run `command` on `src`: refused with one line, SRC untouched, no OUT. Errors found before
    any output is staged leave nothing at all beside OUT; errors found while streaming
    (`mid_stream`) leave only the documented, resumable `.out.partial/` and `.out.lock`."""
    outs = tmp_path / "outs"
    outs.mkdir(exist_ok=True)
    before = _snapshot(src)
    args = [command, str(src), str(outs / "out"), "--no-progress", *extra]
    args += ["--scanned"] if command == "to-orbax" else []
    line = _one_line_error(CliRunner().invoke(main, args), *needles, code=code)
    assert sorted(os.listdir(outs)) == ([".out.lock", ".out.partial"] if mid_stream else [])
    assert _snapshot(src) == before
    return line


def _header_file(path: Path, header, data: bytes = b"", *, n: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if n is None else n) + blob + data)
    return path


# -- safetensors headers: explicit hostile cases through the CLI ----------------------------------
F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
HEADERS = {
    "bad_json": (b'{"w": {"dtype": ', 16, "not valid JSON"),
    "non_object": (b"[1, 2, 3]", 0, "not a JSON object"),
    "string_header": (b'"model"', 0, "not a JSON object"),
    "deeply_nested": (b'{"w": ' + b"[" * 200_000, 0, "not valid JSON"),
    "not_utf8": (b'{"\xff\xfe": 1}', 0, "not valid JSON"),
    "duplicate_names": (b'{"w": ' + json.dumps(F32_4).encode() + b', "w": ' + json.dumps(F32_4).encode() + b"}", 16,
                        "duplicate tensor names ['w']"),
    "offsets_past_end": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8,
                         "'w': data ends at byte 16"),
    "offsets_overlap": ({"a": F32_4, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24, "overlap"),
    "negative_offset": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, 16, "'w': data_offsets"),
    "reversed_offsets": ({"w": {"dtype": "U8", "shape": [0], "data_offsets": [8, 0]}}, 16, "'w': data_offsets"),
    "offsets_not_pair": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}, 32, "'w': data_offsets"),
    "float_offsets": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, 16, "'w': data_offsets"),
    "huge_shape": ({"w": {"dtype": "BF16", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, 16,
                   "'w': data_offsets span 16"),
    "huge_everything": ({"w": {"dtype": "F64", "shape": [2**61], "data_offsets": [0, 2**64]}}, 16,
                        "'w': data ends at byte"),
    "negative_shape": ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, "'w': shape [-4]"),
    "bool_shape": ({"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, 16, "'w': shape [True, 4]"),
    "float_shape": ({"w": {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}}, 16, "'w': shape [2.0, 2]"),
    "nan_shape": (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}', 16, "'w': shape [nan]"),
    "shape_not_list": ({"w": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, 16, "'w': shape 4"),
    "unknown_dtype": ({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, 16, "'w': unknown dtype 'F128'"),
    "dtype_not_string": ({"w": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, 16, "'w': unknown dtype"),
    "entry_not_object": ({"w": 5}, 0, "'w': header entry"),
    "entry_missing_keys": ({"w": {"dtype": "F32"}}, 0, "'w': header entry"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_hostile_safetensors_header(mxfp4_dir, tmp_path, case):
    src = _copy_src(mxfp4_dir, tmp_path)
    header, ndata, needle = HEADERS[case]
    shard = _header_file(_first_shard(src), header, bytes(ndata))
    _refused(src, tmp_path, shard.name, needle)


@pytest.mark.parametrize("n", [2**20, 2**63 + 5, 2**64 - 1], ids=["past_file", "huge", "max_u64"])
def test_header_length_beyond_file(mxfp4_dir, tmp_path, n):
    src = _copy_src(mxfp4_dir, tmp_path)
    shard = _header_file(_first_shard(src), {"w": F32_4}, bytes(16), n=n)
    _refused(src, tmp_path, shard.name, f"header length {n} exceeds the file size", command="to-orbax")


def test_file_shorter_than_length_prefix(mxfp4_dir, tmp_path):
    src = _copy_src(mxfp4_dir, tmp_path)
    shard = _first_shard(src)
    shard.write_bytes(b"\x10\x00\x00")
    _refused(src, tmp_path, shard.name, "too short")


# -- safetensors headers: property-based, against the parser directly -----------------------------
def _check_parsed(path: Path, tensors: dict, n_header: int) -> None:
    """What a successful parse promises: every tensor lies in the data section, none overlap,
    sizes agree with shape x dtype, and each can be read back with its own shape."""
    size = path.stat().st_size
    spans = []
    for name, t in tensors.items():
        assert t.nbytes == math.prod(t.shape) * DTYPES[t.dtype].itemsize
        assert 8 + n_header <= t.offset and t.offset + t.nbytes <= size
        spans.append((t.offset, t.offset + t.nbytes))
        assert read_tensor(t).shape == t.shape
    spans = sorted(s for s in spans if s[0] != s[1])
    assert all(e0 <= b1 for (_, e0), (b1, _) in zip(spans, spans[1:]))


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                       st.text(max_size=6))
_json = st.recursive(_json_leaf,
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                     max_leaves=8)
_dim = st.one_of(st.integers(0, 6), st.integers(-3, 2**65), st.booleans(), st.floats(0, 8))
_entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), st.sampled_from(["F128", "bf16", "", "Q4_0"]), _json),
    "shape": st.one_of(st.lists(_dim, max_size=3), _json),
    "data_offsets": st.one_of(st.lists(st.integers(-8, 96), min_size=2, max_size=2),
                              st.lists(st.integers(0, 2**66), max_size=3), _json),
})


@HYPO
@given(header=st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), st.one_of(_entry, _json), max_size=4),
       ndata=st.integers(0, 96), delta=st.sampled_from([0, 0, 0, -1, 1, 7, 10**6]))
def test_random_headers_parse_or_raise_corrupt(tmp_path, header, ndata, delta):
    blob = json.dumps(header).encode()
    path = _header_file(tmp_path / "x.safetensors", blob, bytes(ndata), n=max(0, len(blob) + delta))
    try:
        tensors, meta = read_header(path)
    except CorruptTensorError as e:
        assert str(path) in str(e)
        return
    assert isinstance(meta, dict)
    _check_parsed(path, tensors, len(blob) + delta)


@HYPO
@given(raw=st.binary(max_size=64))
def test_random_bytes_parse_or_raise_corrupt(tmp_path, raw):
    path = tmp_path / "y.safetensors"
    path.write_bytes(raw)
    try:
        tensors, _ = read_header(path)
    except CorruptTensorError:
        return
    _check_parsed(path, tensors, struct.unpack("<Q", raw[:8])[0])


@HYPO
@given(field=st.sampled_from(["dtype", "shape", "data_offsets"]), value=_json, victim=st.integers(0, 2))
def test_one_field_of_a_real_header_replaced(tmp_path, field, value, victim):
    """Start from a valid 3-tensor file and replace one field with arbitrary JSON."""
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, ml_dtypes.bfloat16),
              "c": np.arange(8, dtype=np.uint8)}
    path = tmp_path / "z.safetensors"
    save_file(arrays, path)
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + n])
    header[sorted(arrays)[victim]][field] = value
    blob = json.dumps(header).encode()
    _header_file(path, blob, path.read_bytes()[8 + n:])
    try:
        tensors, _ = read_header(path)
    except CorruptTensorError as e:
        assert repr(sorted(arrays)[victim]) in str(e) or "overlap" in str(e)
        return
    _check_parsed(path, tensors, len(blob))


# -- the index file -------------------------------------------------------------------------------
def _edit_index(src: Path, fn) -> None:
    data = json.loads((src / INDEX).read_text())
    fn(data)
    (src / INDEX).write_text(json.dumps(data))


def _first_name(data) -> str:
    return next(iter(data["weight_map"]))


INDEX_CASES = {
    "absolute": (lambda d: d["weight_map"].__setitem__(_first_name(d), "/etc/passwd"), "'/etc/passwd' points outside"),
    "dotdot_inside_name": (lambda d: d["weight_map"].__setitem__(_first_name(d), "a/../../x.safetensors"),
                           "'a/../../x.safetensors' points outside"),
    "empty_name": (lambda d: d["weight_map"].__setitem__(_first_name(d), ""), "'' points outside"),
    "list_value": (lambda d: d["weight_map"].__setitem__(_first_name(d), ["model-00001-of-00002.safetensors"]),
                   "model.embed_tokens.weight"),
    "null_value": (lambda d: d["weight_map"].__setitem__(_first_name(d), None), "model.embed_tokens.weight"),
    "weight_map_list": (lambda d: d.__setitem__("weight_map", [1, 2]), "needs a 'weight_map' object"),
    "no_weight_map": (lambda d: d.pop("weight_map"), "needs a 'weight_map' object"),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_hostile_index(mxfp4_dir, tmp_path, case):
    src = _copy_src(mxfp4_dir, tmp_path)
    edit, needle = INDEX_CASES[case]
    _edit_index(src, edit)
    _refused(src, tmp_path, INDEX, needle)


def test_index_not_json_or_not_object(mxfp4_dir, tmp_path):
    src = _copy_src(mxfp4_dir, tmp_path)
    for text in ("{not json", "[1, 2]", '"x"', "\udcff"):
        (src / INDEX).write_text(text, errors="surrogateescape")
        _refused(src, tmp_path, INDEX, "not a valid index")


# -- links out of SRC: refused, and never followed -------------------------------------------------
AUDIT = r"""
import os, sys
log = open(os.environ["AUDIT_LOG"], "w", buffering=1)
EVENTS = {"open": 1, "os.listdir": 1, "os.scandir": 1, "os.mkdir": 1, "os.remove": 1, "os.rmdir": 1,
          "shutil.rmtree": 1, "os.rename": 2, "os.replace": 2, "shutil.copyfile": 2, "os.symlink": 2, "os.link": 2}
def hook(event, args):
    if event in EVENTS:
        for a in args[:EVENTS[event]]:
            if isinstance(a, (str, bytes, os.PathLike)):
                p = os.fsdecode(a)
                log.write(event + "\t" + (p if os.path.isabs(p) else os.path.join(os.getcwd(), p)) + "\n")
sys.addaudithook(hook)
from gptoss_convert.cli import main
main(prog_name="gptoss-convert")
"""


def _audited(tmp_path: Path, *args: str):
    """Run the CLI in a subprocess recording every path Python opens, lists, copies or renames."""
    log = tmp_path / "audit.log"
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = run_env() | {"AUDIT_LOG": str(log)}
    r = subprocess.run([sys.executable, "-c", AUDIT, *args], capture_output=True, text=True, env=env, cwd=cwd)
    touched = [ln.split("\t", 1) for ln in log.read_text().splitlines()]
    return r, [(ev, Path(os.path.realpath(p))) for ev, p in touched]


def _touched_only(touched, tmp_path: Path, allowed: list[Path], fsynced: Path | None = None) -> None:
    """Every path under tmp_path that was touched lies in `allowed` (`fsynced`: a directory that
    may only be opened, to fsync the rename of OUT into it)."""
    root = tmp_path.resolve()
    allowed = [a.resolve() for a in (*allowed, tmp_path / "audit.log", tmp_path / "cwd")]
    stray = [(ev, p) for ev, p in touched
             if (p == root or root in p.parents) and not any(p == a or a in p.parents for a in allowed)
             and not (fsynced is not None and ev == "open" and p == fsynced.resolve())]
    assert not stray, stray


def _outside_copy(src: Path, name: str, tmp_path: Path) -> Path:
    """Move SRC/name out of SRC and leave a link to it in its place."""
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir(exist_ok=True)
    shutil.move(src / name, target)
    os.symlink(target, src / name)
    return target


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", INDEX, "model-00002-of-00002.safetensors"])
def test_link_out_of_src_is_refused_and_not_read(mxfp4_dir, tmp_path, name):
    src = _copy_src(mxfp4_dir, tmp_path)
    _outside_copy(src, name, tmp_path)
    outs = tmp_path / "outs"
    outs.mkdir()
    r, touched = _audited(tmp_path, "dequantize", str(src), str(outs / "out"), "--no-progress")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src / name}: is a link pointing outside"), r.stderr
    _touched_only(touched, tmp_path, [src])
    assert os.listdir(outs) == []


def test_links_inside_src_are_fine_and_copied_as_files(mxfp4_dir, tmp_path):
    src = _copy_src(mxfp4_dir, tmp_path)
    (src / "original").mkdir(exist_ok=True)      # the published decoy folder
    shutil.move(src / "tokenizer.json", src / "original" / "tokenizer.json")
    os.symlink("original/tokenizer.json", src / "tokenizer.json")
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "out"
    r, touched = _audited(tmp_path, "dequantize", str(src), str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (src / "original" / "tokenizer.json").read_bytes()
    # Read only inside SRC; written only to OUT and its documented siblings, which are gone now.
    _touched_only(touched, tmp_path, [src, out, outs / ".out.partial", outs / ".out.lock"], fsynced=outs)
    assert os.listdir(outs) == ["out"]


def _hub_cache(mxfp4_dir: Path, root: Path, repo: str = "models--openai--gpt-oss-tiny") -> Path:
    """A snapshot in huggingface_hub's cache layout: every file a link to ../../blobs/<hash>."""
    snap = root / repo / "snapshots" / ("a" * 40)
    blobs = root / repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in mxfp4_dir.rglob("*") if p.is_file()):     # original/, metal/ too
        link = snap / f.relative_to(mxfp4_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        blob = blobs / f"{abs(hash(str(f.relative_to(mxfp4_dir)))):x}"
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snap


def test_hub_cache_snapshot_links_into_its_blobs_are_accepted(mxfp4_dir, tmp_path):
    snap = _hub_cache(mxfp4_dir, tmp_path / "hub")
    out = tmp_path / "out"
    dequantize(snap, out, **QUIET)
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()
    assert HFCheckpoint(out).tensors


def test_hub_cache_link_into_another_repo_is_refused(mxfp4_dir, tmp_path):
    snap = _hub_cache(mxfp4_dir, tmp_path / "hub")
    other = _hub_cache(mxfp4_dir, tmp_path / "hub", "models--someone--else")
    (snap / "config.json").unlink()
    os.symlink(os.path.realpath(other / "config.json"), snap / "config.json")
    with pytest.raises(InputError, match="config.json: is a link pointing outside"):
        HFCheckpoint(snap)


# -- config.json ----------------------------------------------------------------------------------
def _edit_config(src: Path, **changes) -> None:
    conf = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            conf.pop(k)
        else:
            conf[k] = v
    (src / "config.json").write_text(json.dumps(conf))


CONFIG_CASES = {
    "vocab_string": ({"vocab_size": "300"}, "vocab_size must be an integer, got '300'"),
    "hidden_float": ({"hidden_size": 64.5}, "hidden_size must be an integer, got 64.5"),
    "layers_bool": ({"num_hidden_layers": True}, "num_hidden_layers must be an integer, got True"),
    "experts_negative": ({"num_local_experts": -5}, "num_local_experts=-5 is out of the supported range"),
    "experts_null": ({"num_local_experts": None}, "num_local_experts must be an integer, got None"),
    "layers_missing": ({"num_hidden_layers": ...}, "missing required field num_hidden_layers"),
    "eps_string": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a finite number"),
    "rope_not_object": ({"rope_parameters": [1, 2]}, "rope_parameters/rope_scaling must be objects"),
    "quant_method_list": ({"quantization_config": {"quant_method": ["mxfp4"]}},
                          "quant_method ['mxfp4'] is not supported"),
    "model_type_list": ({"model_type": ["gpt_oss"]}, "model_type ['gpt_oss'] is not supported"),
    "rope_inf_int": ({"rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": float("inf")}},
                     "config.json"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_hostile_config(mxfp4_dir, tmp_path, case):
    src = _copy_src(mxfp4_dir, tmp_path)
    changes, needle = CONFIG_CASES[case]
    _edit_config(src, **changes)
    _refused(src, tmp_path, "config.json", needle)


def test_config_not_an_object(mxfp4_dir, tmp_path):
    src = _copy_src(mxfp4_dir, tmp_path)
    for text, needle in (("[1]", "must hold a JSON object"), ("{", "not valid JSON"), ("", "not valid JSON"),
                         ('{"a": ' + "[" * 200_000, "not valid JSON"), ("\udcff", "not valid JSON")):
        (src / "config.json").write_text(text, errors="surrogateescape")
        _refused(src, tmp_path, "config.json", needle, command="to-orbax")


def test_absurd_vocab_refused_before_allocating(mxfp4_dir, tmp_path):
    """vocab_size 10^12 (a 2.6 PB embedding at H=1280) is refused from config.json alone."""
    src = _copy_src(mxfp4_dir, tmp_path)
    _edit_config(src, vocab_size=10**12)
    tracemalloc.start()
    try:
        _refused(src, tmp_path, "config.json", "vocab_size=1000000000000 is out of the supported range",
                 command="to-orbax")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["vocab_size", "hidden_size", "num_hidden_layers", "num_local_experts", "head_dim",
                            "num_experts_per_tok", "num_key_value_heads", "sliding_window", "rms_norm_eps",
                            "layer_types", "rope_parameters", "quantization_config", "model_type", "swiglu_limit",
                            "tie_word_embeddings"]),
       value=st.one_of(_json, st.sampled_from([float("inf"), float("-inf"), 10**30, -1, 0]),
                       st.fixed_dictionaries({}, optional={"rope_type": _json, "factor": _json, "truncate": _json,
                                                           "original_max_position_embeddings": _json,
                                                           "quant_method": _json})))
def test_random_config_values_never_crash(mxfp4_dir, tmp_path, key, value):
    """Any JSON value in any field: the checkpoint opens and plans, or a ConvertError says why."""
    src = tmp_path / "src"
    if not src.exists():
        shutil.copytree(mxfp4_dir, src)
    conf = json.loads((mxfp4_dir / "config.json").read_text())
    conf[key] = value
    (src / "config.json").write_text(json.dumps(conf))
    try:
        check_against_backend(HFCheckpoint(src))
    except ConvertError as e:      # one line, or (several problems) a header and one line per problem
        first, *rest = e.one_line().split("\n")
        assert first and all(ln.startswith(("  - ", "  ... and ")) for ln in rest), e.one_line()


# -- NaN / inf in stored BF16 weights ----------------------------------------------------------------
def _poison(src: Path, name: str, index: tuple, value: float) -> Path:
    """Set one element of a stored tensor (rewriting its shard, index unchanged)."""
    shard = src / json.loads((src / INDEX).read_text())["weight_map"][name]
    header, meta = read_header(shard)
    arrays = {n: read_tensor(t) for n, t in sorted(header.items(), key=lambda kv: kv[1].offset)}
    arrays[name] = arrays[name].copy()
    arrays[name][index] = value
    save_file(arrays, shard, meta)
    return shard


NONFINITE = [("model.layers.3.self_attn.q_proj.weight", (5, 7), np.nan),
             ("model.embed_tokens.weight", (250, 3), np.inf),
             ("model.layers.0.self_attn.sinks", (2,), -np.inf)]


@pytest.mark.parametrize("command", ["dequantize", "to-orbax"])
@pytest.mark.parametrize("name,index,value", NONFINITE, ids=["nan", "inf", "-inf"])
def test_nonfinite_weight_refused_with_its_name(mxfp4_dir, tmp_path, command, name, index, value):
    src = _copy_src(mxfp4_dir, tmp_path)
    _poison(src, name, index, value)
    _refused(src, tmp_path, repr(name), f"first at index {index}", "--allow-nonfinite", command=command,
             mid_stream=True)


def test_nonfinite_index_is_global_when_read_in_row_blocks(mxfp4_dir, tmp_path):
    src = _copy_src(mxfp4_dir, tmp_path)
    _poison(src, "model.embed_tokens.weight", (250, 3), np.nan)
    with pytest.raises(CorruptTensorError, match=r"first at index \(250, 3\)"):
        dequantize(src, tmp_path / "o", block_bytes=1024, **QUIET)    # 8 rows per block


@pytest.mark.parametrize("command", ["dequantize", "to-orbax"])
def test_allow_nonfinite_converts_and_keeps_the_values(mxfp4_dir, tmp_path, command):
    src = _copy_src(mxfp4_dir, tmp_path)
    name, index, _ = NONFINITE[0]
    _poison(src, name, index, np.nan)
    _poison(src, "model.embed_tokens.weight", (250, 3), -np.inf)
    out = tmp_path / "out"
    args = [command, str(src), str(out), "--no-progress", "--allow-nonfinite"]
    r = CliRunner().invoke(main, args + (["--unscanned"] if command == "to-orbax" else []))
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(main, ["check", str(out)]).exit_code == 0
    if command == "dequantize":
        ck = HFCheckpoint(out)
        ck.allow_nonfinite = True
        assert np.isnan(ck.read(name)[index].astype(np.float32))
        assert ck.read("model.embed_tokens.weight")[250, 3] == -np.inf
    else:
        from gptoss_convert.io.orbax_reader import open_leaf
        q = open_leaf(out / "0", "decoder/layers_3/GptOssAttention/query/kernel").read().result()   # [H, Nq, D]
        assert np.isnan(np.asarray(q, np.float32)[index[1], index[0] // 8, index[0] % 8])


# -- golden files for verify --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def orbax_out(mxfp4_dir, tmp_path_factory):
    from gptoss_convert.converters.to_orbax import to_orbax
    return to_orbax(mxfp4_dir, tmp_path_factory.mktemp("golden") / "ckpt", scanned=False, **QUIET)


def _good_record(vocab: int = 300, tokens=(1, 5, 7)) -> dict:
    return {"prompt": "x", "tokens": list(tokens), "logits": [[0.0] * vocab for _ in tokens]}


GOLDEN_CASES = {
    "token_equal_vocab": (json.dumps(_good_record(tokens=(1, 300))), ":1: golden vocab 300 / token ids up to 300"),
    "token_negative": (json.dumps(_good_record(tokens=(-1, 4))), ":1: golden vocab"),
    "logits_too_narrow": (json.dumps(_good_record(vocab=299)), ":1: golden vocab 299"),
    "logits_rows_vs_tokens": (json.dumps({**_good_record(), "tokens": [1, 2]}),
                              ":1: logits shape [3, 300] does not match 2 tokens"),
    "logits_ragged": (json.dumps({**_good_record(), "logits": [[0.0] * 300, [0.0]]}), ":1: not a golden record"),
    "logits_1d": (json.dumps({**_good_record(), "logits": [0.0] * 3}), ":1: logits shape [3]"),
    "nan_logits": (json.dumps({**_good_record(), "logits": [[float("nan")] * 300] * 3}), ":1: logits contain NaN"),
    "no_tokens_key": (json.dumps({"prompt": "x", "logits": [[0.0]]}), ":1: not a golden record"),
    "tokens_not_ints": (json.dumps({**_good_record(), "tokens": ["a", "b", "c"]}), ":1: not a golden record"),
    "second_line_bad": (json.dumps(_good_record()) + "\n{oops", ":2: not a golden record"),
    "not_json": ("hello", ":1: not a golden record"),
    "record_is_list": ("[1, 2, 3]", ":1: not a golden record"),
    "empty": ("\n\n", "no golden records"),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_hostile_golden_file_for_verify(orbax_out, tmp_path, case):
    text, needle = GOLDEN_CASES[case]
    golden = tmp_path / "golden.jsonl"
    golden.write_text(text)
    before = _snapshot(orbax_out)
    r = CliRunner().invoke(main, ["verify", str(orbax_out), "--golden", str(golden)])
    _one_line_error(r, str(golden), needle, code=2)
    assert _snapshot(orbax_out) == before and sorted(os.listdir(tmp_path)) == ["golden.jsonl"]


# Golden-file problems the parser once let through (int() casts) or crashed on.
GOLDEN_OPEN = {
    "fractional_token_ids": json.dumps({**_good_record(), "tokens": [1.7, True, 3]}),   # int(): 1.7 -> 1, True -> 1
    "token_id_1e400": json.dumps(_good_record()).replace("[1, 5, 7]", "[1, 5, 1e400]"),  # int(inf): OverflowError
    "deeply_nested": '{"tokens": ' + "[" * 200_000,                                      # RecursionError
}


@pytest.mark.parametrize("case", sorted(GOLDEN_OPEN))
def test_golden_open_problems(tmp_path, case):
    from gptoss_convert.verify.golden import read_golden
    golden = tmp_path / "g.jsonl"
    golden.write_text(GOLDEN_OPEN[case])
    with pytest.raises(InputError, match="g.jsonl:1"):
        read_golden(golden, 300)


# -- tracebacks only with --debug ------------------------------------------------------------------------
def test_debug_shows_the_traceback_and_plain_run_does_not(mxfp4_dir, tmp_path):
    src = _copy_src(mxfp4_dir, tmp_path)
    _header_file(_first_shard(src), b"[1]")
    cmd = [sys.executable, "-m", "gptoss_convert"]
    plain = subprocess.run(cmd + ["dequantize", str(src), str(tmp_path / "o")], capture_output=True, text=True,
                           env=run_env())
    debug = subprocess.run(cmd + ["--debug", "dequantize", str(src), str(tmp_path / "o")], capture_output=True,
                           text=True, env=run_env())
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "CorruptTensorError" in debug.stderr and "not a JSON object" in debug.stderr
    assert not (tmp_path / "o").exists()

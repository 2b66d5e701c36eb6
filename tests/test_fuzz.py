"""Property-based fuzzing of every parser that takes a checkpoint's untrusted bytes (issue 22 §9).

The property, for each: an input either parses into something consistent with its file, or
raises one of the project's errors (a ConvertError subclass) — never another exception, and
never more than bounded time (Hypothesis' deadline) and memory (a tracemalloc peak per example).

Short by default (the whole file in well under 30 s). For a long run:

    GPTOSS_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py -q     # or: make fuzz
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss_convert.errors import ConvertError

EXAMPLES = int(os.environ.get("GPTOSS_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=list(HealthCheck),
                derandomize=EXAMPLES <= 40)
PEAK = 64 << 20          # no example may allocate more than this (the inputs are a few KB)

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8))
JSON = st.recursive(_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=12)


def _bounded(fn, *args):
    """fn(*args) -> (result, None) or (None, the ConvertError it raised); any other exception
    fails the test, as does a tracemalloc peak over PEAK."""
    tracemalloc.start()
    try:
        return fn(*args), None
    except ConvertError as e:
        assert "\n" not in e.one_line() or hasattr(e, "problems"), e.one_line()
        return None, e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < PEAK, peak


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for at, value in edits:
        if b:
            b[at % len(b)] = value
    return bytes(b[:cut] if cut is not None else b)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# -- safetensors headers ----------------------------------------------------------------------------
def _shard(tensors: dict[str, np.ndarray]) -> bytes:
    header, off = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": {"uint8": "U8", "float32": "F32"}[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(a.tobytes() for a in tensors.values())


_GOOD = _shard({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b_blocks": np.zeros((2, 1, 16), np.uint8),
                "b_scales": np.full((2, 1), 127, np.uint8)})


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(_GOOD))))
def test_fuzz_safetensors_header_bytes(work, edits, cut):
    """A valid shard with random bytes changed and/or cut short: parsed consistently or refused."""
    from gptoss_convert.errors import CorruptTensorError
    from gptoss_convert.io.safetensors import read_header, read_tensor
    path = work / "h.safetensors"
    path.write_bytes(_mutate(_GOOD, edits, cut))
    got, err = _bounded(read_header, path)
    if err is not None:
        assert isinstance(err, CorruptTensorError) and str(path) in str(err)
        return
    tensors, _ = got
    size = path.stat().st_size
    for t in tensors.values():
        assert t.offset + t.nbytes <= size and t.nbytes == math.prod(t.shape) * t.np_dtype.itemsize
        assert read_tensor(t).shape == t.shape


@FUZZ
@given(header=st.dictionaries(st.text(max_size=5), JSON, max_size=4), tail=st.binary(max_size=64))
def test_fuzz_safetensors_header_json(work, header, tail):
    from gptoss_convert.io.safetensors import read_header
    raw = json.dumps(header).encode()
    path = work / "j.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + tail)
    got, err = _bounded(read_header, path)
    if got is not None:
        assert all(t.offset + t.nbytes <= path.stat().st_size for t in got[0].values())


# -- MXFP4 blocks and scales --------------------------------------------------------------------------
@FUZZ
@given(e=st.integers(1, 3), out=st.integers(1, 4), g=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
       special=st.lists(st.sampled_from([0, 1, 126, 127, 200, 253, 254, 255]), max_size=3))
def test_fuzz_mxfp4_blocks_and_scales(work, e, out, g, seed, special):
    """Random codes and scale bytes (with the special ones: 253/254 may overflow, 255 is NaN) in a
    real shard, read through HFCheckpoint: a finite [e, g*32, out] array, or refused naming the tensor."""
    from gptoss_convert.io.hf_checkpoint import HFCheckpoint
    from gptoss_convert.testing.tiny import tiny_raw_config
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (e, out, g, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, (e, out, g), dtype=np.uint8)
    for i, s in enumerate(special):
        scales.reshape(-1)[(seed + i) % scales.size] = s
    d = work / "mx"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(tiny_raw_config()))
    (d / "model.safetensors").write_bytes(_shard({"w_blocks": blocks, "w_scales": scales}))
    got, err = _bounded(lambda: HFCheckpoint(d).read("w", dtype=np.float32))
    if err is None:
        assert got.shape == (e, g * 32, out) and np.isfinite(got).all()
    else:
        assert "'w_scales'" in str(err) and ({253, 254, 255} & set(special))


# -- config policy -----------------------------------------------------------------------------------
def _configs():
    from gptoss_convert.testing.qwen3 import published_qwen3
    from gptoss_convert.testing.tiny import tiny_raw_config
    return [tiny_raw_config(), published_qwen3()]


@FUZZ
@given(which=st.integers(0, 1), changes=st.dictionaries(st.text(max_size=30), JSON, max_size=3),
       field=st.integers(0, 100), value=JSON)
def test_fuzz_config_policy(which, changes, field, value):
    """A real config.json (gpt-oss, Qwen3-MoE) with one known field and a few others replaced by
    arbitrary JSON: a typed config whose sizes are positive ints, or a ConfigError naming the file."""
    from gptoss_convert.backends.policy import parse_config
    raw = _configs()[which]
    raw[sorted(raw)[field % len(raw)]] = value
    raw |= changes
    got, err = _bounded(parse_config, raw, "fuzz/config.json")
    if err is not None:
        assert type(err).__name__ == "ConfigError" and "fuzz/config.json" in str(err)
        return
    _, cfg = got
    assert all(isinstance(v, int) and v > 0 for v in (cfg.L, cfg.E, cfg.H, cfg.V))


# -- index maps -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(work) -> Path:
    from gptoss_convert.testing.tiny import tiny_raw_config
    d = work / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny_raw_config()))
    (d / "model-1.safetensors").write_bytes(_GOOD)
    return d


@FUZZ
@given(index=st.one_of(JSON, st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.sampled_from(["a", "b_blocks", "b_scales", "c", ""]),
    st.one_of(st.sampled_from(["model-1.safetensors", "../x", "/etc/hostname", "", "model-2.safetensors"]), JSON),
    max_size=4)})))
def test_fuzz_index_map(hf_dir, index):
    """Random index maps over one real shard: opened (every listed tensor stored in its listed shard)
    or refused naming the index; never a path outside the directory."""
    from gptoss_convert.io.hf_checkpoint import INDEX, HFCheckpoint
    (hf_dir / INDEX).write_text(json.dumps(index))
    got, err = _bounded(HFCheckpoint, hf_dir)
    if err is not None:
        assert str(hf_dir) in str(err)
        return
    assert got.files == ["model-1.safetensors"]
    assert all(got.stored[n].file.name == f for n, f in got.weight_map.items())


# -- Orbax metadata ------------------------------------------------------------------------------------
@FUZZ
@given(meta=st.one_of(JSON, st.fixed_dictionaries({"tree_metadata": st.dictionaries(st.text(max_size=4), st.one_of(
    JSON, st.fixed_dictionaries({"key_metadata": st.lists(st.one_of(JSON, st.fixed_dictionaries({"key": JSON})),
                                                           max_size=3)})), max_size=3), "use_zarr3": JSON})))
def test_fuzz_orbax_tree_metadata(work, meta):
    """Random `_METADATA`: leaf keys that are plain names, or an InputError naming the file."""
    from gptoss_convert.io.orbax_reader import _item_leaves
    item = work / "items"
    item.mkdir(exist_ok=True)
    (item / "_METADATA").write_text(json.dumps(meta))
    got, err = _bounded(_item_leaves, item, ())
    if err is not None:
        assert "_METADATA" in str(err)
        return
    keys, _ = got
    assert all(k and all(isinstance(p, str) and p not in ("", ".", "..") and "/" not in p for p in k)
               for k in keys.values())


@FUZZ
@given(raw=st.one_of(st.binary(max_size=64), JSON.map(lambda j: json.dumps(j).encode())))
def test_fuzz_orbax_step_metadata(work, raw):
    """Random `_CHECKPOINT_METADATA`: a step is committed or not; nothing raises."""
    from gptoss_convert.io.orbax_source import _committed
    step = work / "7"
    step.mkdir(exist_ok=True)
    (step / "_CHECKPOINT_METADATA").write_bytes(raw)
    got, err = _bounded(_committed, step)
    assert err is None and isinstance(got, bool)


# -- conversion.json -------------------------------------------------------------------------------------
_RECORDS = st.one_of(JSON, st.fixed_dictionaries(
    {"outputs": st.dictionaries(st.sampled_from(["0/a", "/abs", "../x", "0/../y", "", "config.json", "0/items/c/0"]),
                                st.one_of(JSON, st.fixed_dictionaries({"size": JSON, "xxh3_128": JSON})), max_size=4)},
    optional={"maxtext_item": JSON, "leaves": JSON, "options": JSON, "command": st.sampled_from(["to-orbax", "x"])}))


@FUZZ
@given(rec=_RECORDS, raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzz_conversion_record(work, rec, raw):
    """Random records (or bytes): read as a record whose every path is relative and inside the
    checkpoint, or refused naming conversion.json; the record's accessors never raise."""
    from gptoss_convert.io.record import RecordedFiles, read_record, relative_inside, step_outputs
    path = work / "conversion.json"
    path.write_bytes(raw if raw is not None else json.dumps(rec).encode())
    got, err = _bounded(read_record, path)
    if err is not None:
        assert str(path) in str(err)
        return
    assert all(relative_inside(rel) for rel in got["outputs"]) and relative_inside(got.get("maxtext_item", "0/items"))
    files = RecordedFiles(work, step_outputs(got, "0"))
    assert all(files.expected(f) is None or len(files.expected(f)) == 2 for f in files.outputs)


@pytest.fixture(scope="module")
def small_orbax(work, mxfp4_dir) -> Path:
    from gptoss_convert.converters.to_orbax import to_orbax
    return to_orbax(mxfp4_dir, work / "orbax", scanned=False, progress=False, log=lambda *_: None)


@settings(FUZZ, max_examples=max(5, EXAMPLES // 4), deadline=10000)
@given(rec=_RECORDS)
def test_fuzz_check_with_a_random_record(small_orbax, work, rec):
    """`check` on a real output under a random record: passes, or fails/refuses with a ConvertError."""
    from gptoss_convert.converters.check import check
    out = work / "checked"
    if not out.exists():
        shutil.copytree(small_orbax, out)
    (out / "conversion.json").write_text(json.dumps(rec))
    got, err = _bounded(check, out, lambda *_: None)
    assert err is not None or isinstance(got, dict)

"""Issue 22, hostile checkpoints: every file of a downloaded checkpoint is attacker-controlled.

Each test here failed on the code before issue 22 (7ec050a) and names the case it covers:
plans bounded by the files, linear duplicate checks, paths from conversion.json contained, no
symlink out of an Orbax SRC, reads verified against the record, size limits on whole-file reads,
and clean failures (RELIABILITY.md, "Hostile checkpoints").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import run_env
from gptoss_convert.cli import main
from gptoss_convert.errors import MAX_PROBLEMS, InputError, PlanError
from gptoss_convert.testing.qwen3 import published_qwen3
from gptoss_convert.testing.tiny import tiny_raw_config

QUIET = dict(progress=False, log=lambda *_: None)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _error_lines(r) -> list[str]:
    assert isinstance(r.exception, SystemExit), f"unhandled {r.exception!r}\n{r.output}"
    assert "Traceback" not in r.output
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


# -- 1. plans bounded by the files ---------------------------------------------------------------
# Runs the CLI as its only child (under a 4 GiB address-space limit: a regression dies there,
# not the machine) and prints the child's peak RSS in KiB, then its exit status.
_MEASURE = """
import resource, subprocess, sys
limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
r = subprocess.run([sys.executable, "-m", "gptoss_convert", *sys.argv[1:]], preexec_fn=limit)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)
"""


def test_huge_config_over_tiny_files_refused_fast_in_little_memory(mxfp4_dir, tmp_path):
    """A 1 KB Qwen3-MoE config.json declaring 1024 layers x 4096 experts over the tiny gpt-oss
    files: before, `to-orbax --dry-run` built 12.6 M edges (171 s, 23.2 GB). Now the sizes
    alone refuse it: exit 2, the counts named, well under 10 s and 200 MB for the whole process."""
    src = _copy(mxfp4_dir, tmp_path / "src")
    (src / "config.json").write_text(json.dumps(published_qwen3() | {"num_hidden_layers": 1024, "num_experts": 4096}))
    assert (src / "config.json").stat().st_size < 1024
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _MEASURE, "to-orbax", str(src), str(tmp_path / "out"), "--scanned",
                        "--dry-run"], capture_output=True, text=True, env=run_env(), timeout=120)
    elapsed = time.perf_counter() - t0
    peak_kib, code = map(int, r.stdout.split())
    assert code == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "need 12,592,131 source tensors but the checkpoint holds 105" in r.stderr
    assert "parameters but the checkpoint's tensors hold 639,478" in r.stderr
    assert elapsed < 10, elapsed
    assert peak_kib < 200 * 1024, peak_kib
    assert not (tmp_path / "out").exists()


def test_plan_bound_is_checked_before_expanding_edges(tiny_cfg):
    """build_plan compares the arithmetic counts first: the edges of a 10^6-layer table are never built."""
    from gptoss_convert.backends import get_backend
    from gptoss_convert.converters.plan import build_plan, edges_from_rules
    from gptoss_convert.testing.tiny import dequantized, hf_tensors
    b = get_backend("gpt_oss")
    edges = edges_from_rules(b.rules(tiny_cfg), 10**6, None)
    assert len(edges) > 10**7 and edges._edges is None
    src = {n: (a.shape, "BF16") for n, a in dequantized(hf_tensors(tiny_cfg)).items()}
    with pytest.raises(PlanError, match="source tensors but the checkpoint holds"):
        build_plan(src, b.flat_shapes(tiny_cfg, False), edges, itemsize=2)
    assert edges._edges is None


def test_plan_errors_are_capped_one_per_line(mxfp4_dir, tmp_path):
    """A config with 4 layers more than the files (within the bound, so checked tensor by tensor):
    76 problems, printed one per line, the first MAX_PROBLEMS and `... and 56 more` (before: one
    line of every problem joined by '; ')."""
    src = _copy(mxfp4_dir, tmp_path / "src")
    raw = tiny_raw_config()
    raw["num_hidden_layers"] += 4
    raw.pop("layer_types", None)
    (src / "config.json").write_text(json.dumps(raw))
    r = CliRunner().invoke(main, ["to-orbax", str(src), str(tmp_path / "out"), "--scanned", "--dry-run"])
    lines = _error_lines(r)
    assert r.exit_code == 2
    assert lines[0] == "error: conversion plan is inconsistent (76 problem(s)):"
    assert len(lines) == MAX_PROBLEMS + 2 and lines[-1] == "  ... and 56 more"
    assert all(ln.startswith("  - HF tensor 'model.layers.") and "is missing" in ln for ln in lines[1:-1])


# -- 2. duplicate tensor names: linear -----------------------------------------------------------
def test_duplicate_name_in_a_huge_header_refused_in_linear_time(tmp_path):
    """20 000 entries and one repeated name: refused naming it in well under a second (before:
    every key counted against every other, ~13 s on the 2-core VM; 40 000 keys took 20 s)."""
    from benchmarks.bench_header import hostile_shard
    from gptoss_convert.errors import CorruptTensorError
    from gptoss_convert.io.safetensors import read_header
    path = hostile_shard(tmp_path / "h.safetensors", 20000)
    t0 = time.perf_counter()
    with pytest.raises(CorruptTensorError,
                       match=r"h.safetensors: header is not valid JSON \(duplicate tensor names \['t0'\]\)"):
        read_header(path)
    assert time.perf_counter() - t0 < 2


# -- shared Orbax outputs ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def scanned_out(mxfp4_dir, tmp_path_factory):
    """A to-orbax --scanned output of the tiny model (with its conversion.json)."""
    from gptoss_convert.converters.to_orbax import to_orbax
    return to_orbax(mxfp4_dir, tmp_path_factory.mktemp("h22") / "ckpt", scanned=True, **QUIET)


def _chunk(out: Path, leaf: str = "layers_1.GptOssMlp.wi_0") -> Path:
    folder = out / "0" / "items" / f"params.params.decoder.layers.{leaf}"
    return next(p for p in sorted(folder.rglob("*")) if p.is_file() and p.name.isdigit())


def _flip(path: Path, at: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _cli(*args: str):
    return CliRunner().invoke(main, [*args])


def _refused(r, *needles: str, code: int = 2) -> str:
    lines = _error_lines(r)
    assert r.exit_code == code, (r.exit_code, r.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _golden(tmp_path: Path) -> Path:
    g = tmp_path / "golden.jsonl"
    g.write_text(json.dumps({"prompt": "x", "tokens": [1, 2], "logits": [[0.0] * 300] * 2}) + "\n")
    return g


# -- 3. check: paths from conversion.json contained, no links followed ----------------------------
def _edit_record(out: Path, fn) -> None:
    rec = json.loads((out / "conversion.json").read_text())
    fn(rec)
    (out / "conversion.json").write_text(json.dumps(rec))


@pytest.mark.parametrize("item", ["/abs/elsewhere/0/items", "../other/0/items", "0/../../other", 7])
def test_check_refuses_maxtext_item_outside_out(scanned_out, tmp_path, item):
    """Before: `maxtext_item` was joined to OUT as it was, so an absolute path made check validate
    another checkpoint's tree (and an int crashed). Now the record is refused, naming the field."""
    out = _copy(scanned_out, tmp_path / "out")
    _edit_record(out, lambda rec: rec.__setitem__("maxtext_item", item))
    _refused(_cli("check", str(out)), "conversion.json: not a valid conversion record (maxtext_item")


def test_check_refuses_an_output_path_outside_out(scanned_out, tmp_path):
    out = _copy(scanned_out, tmp_path / "out")
    _edit_record(out, lambda rec: rec["outputs"].__setitem__("/etc/hostname", {"size": 1, "xxh3_128": "0" * 32}))
    _refused(_cli("check", str(out)), "not a valid conversion record (output '/etc/hostname' is not a relative path")


def test_check_does_not_follow_a_recorded_link_out_of_out(scanned_out, tmp_path):
    """A chunk replaced by a link to an identical file outside OUT, recorded with that file's hash:
    before, check followed it and passed. Now it fails (exit 5), naming the link."""
    out = _copy(scanned_out, tmp_path / "out")
    chunk = _chunk(out)
    outside = tmp_path / "outside-chunk"
    shutil.copyfile(chunk, outside)
    chunk.unlink()
    chunk.symlink_to(outside)
    r = _cli("check", str(out))
    assert r.exit_code == 5, r.output
    line = " ".join(_error_lines(r))
    assert f"{chunk.relative_to(out).as_posix()}: is a symbolic link" in line


def test_check_does_not_read_the_tree_through_a_linked_item(scanned_out, tmp_path):
    """OUT/0 replaced by a link to another (valid, identical) checkpoint's step: every recorded
    file, and the Orbax tree, would be read out of OUT. Now each is named as under a link."""
    other = _copy(scanned_out, tmp_path / "other")
    out = _copy(scanned_out, tmp_path / "out")
    shutil.rmtree(out / "0")
    (out / "0").symlink_to(other / "0", target_is_directory=True)
    r = _cli("check", str(out))
    assert r.exit_code == 5, r.output
    assert "maxtext_item 0/items: is a symbolic link" in r.stderr


@pytest.mark.parametrize("text, needle", [
    ('{"outputs": {"a": 1}}', "output 'a': its entry is not an object"),
    ('{"outputs": {}, "leaves": [1]}', "'leaves' must map"),
    ('{"outputs": {}, "options": "x", "command": "to-orbax"}', "'options' must be an object"),
])
def test_check_malformed_record_fields_are_named_not_crashes(scanned_out, tmp_path, text, needle):
    """Before: an entry that is not an object crashed (AttributeError: exit 1, 'rerun with --debug')."""
    out = _copy(scanned_out, tmp_path / "out")
    (out / "conversion.json").write_text(text)
    _refused(_cli("check", str(out)), needle)


# -- 4. Orbax SRC: no link out, nothing opened before its path is checked -------------------------
def test_orbax_src_with_a_chunk_linked_out_is_refused(scanned_out, tmp_path):
    src = _copy(scanned_out, tmp_path / "src")
    chunk = _chunk(src)
    outside = tmp_path / "outside-chunk"
    shutil.copyfile(chunk, outside)
    chunk.unlink()
    chunk.symlink_to(outside)
    _refused(_cli("to-hf", str(src), str(tmp_path / "hf"), "--no-progress"), f"{chunk}: is a link pointing outside")
    assert not (tmp_path / "hf").exists()


def test_orbax_src_with_a_leaf_folder_linked_out_is_refused(scanned_out, tmp_path):
    src = _copy(scanned_out, tmp_path / "src")
    other = _copy(scanned_out, tmp_path / "other")
    leaf = next((src / "0" / "items").glob("*layers_1.GptOssMlp.wi_0"))
    shutil.rmtree(leaf)
    leaf.symlink_to(other / "0" / "items" / leaf.name, target_is_directory=True)
    for args in (["to-hf", str(src), str(tmp_path / "hf")], ["to-orbax", str(src), str(tmp_path / "o"), "--unscanned"]):
        _refused(_cli(*args, "--no-progress"), f"{leaf}: is a link pointing outside")
    _refused(_cli("verify", str(src), "--golden", str(_golden(tmp_path))), f"{leaf}: is a link pointing outside")


@pytest.mark.parametrize("key", ["/etc/hostname", "..", "a/../../b", ""])
def test_metadata_key_naming_a_path_out_is_refused_before_opening(scanned_out, tmp_path, key):
    """A `_METADATA` leaf key that is a path: before, TensorStore opened `items/<key>` (an absolute
    key: a file outside SRC) before anything refused it. Now the key is refused as read."""
    from gptoss_convert.io.orbax_source import open_orbax
    src = _copy(scanned_out, tmp_path / "src")
    meta_path = src / "0" / "items" / "_METADATA"
    meta = json.loads(meta_path.read_text())
    entry = next(iter(meta["tree_metadata"].values()))
    entry["key_metadata"][-1]["key"] = key
    meta_path.write_text(json.dumps(meta))
    (src / "conversion.json").unlink()           # a checkpoint from elsewhere: no record to catch the edit
    with pytest.raises(InputError, match=r"_METADATA: leaf key .* is not a list of plain names"):
        open_orbax(src)


# -- 5. reads verified against the record; the commit marker required -----------------------------
def _flipped(scanned_out: Path, tmp_path: Path) -> tuple[Path, Path]:
    src = _copy(scanned_out, tmp_path / "src")
    chunk = _chunk(src)
    _flip(chunk)
    return src, chunk


@pytest.mark.parametrize("command", ["to-hf", "to-orbax", "verify"])
def test_one_bit_flip_in_an_expert_chunk_is_refused_by_every_reader(scanned_out, tmp_path, command):
    """Before: `check` caught the flip but `verify` passed and `to-hf` exported it. Now each reader
    refuses it, naming the chunk and the record, and writes nothing."""
    src, chunk = _flipped(scanned_out, tmp_path)
    out = tmp_path / "o"
    args = {"to-hf": ["to-hf", str(src), str(out), "--no-progress"],
            "to-orbax": ["to-orbax", str(src), str(out), "--unscanned", "--no-progress"],
            "verify": ["verify", str(src), "--golden", str(_golden(tmp_path))]}[command]
    _refused(_cli(*args), f"{chunk}: xxh3_128 differs from its conversion.json", "gptoss-convert check")
    assert not out.exists()


def test_whole_chunk_read_compares_its_digest_with_the_record(scanned_out, tmp_path):
    """OrbaxSource.read's whole-chunk path: the digest it computes is the one compared; and the
    record is exposed as expected(file) / verify_hashes({file: {algo: digest}})."""
    from gptoss_convert.io.files import file_digest
    from gptoss_convert.io.orbax_source import open_orbax
    src = open_orbax(scanned_out)
    path = next(p for p in src.leaves if p.endswith("moe_block/wi_0") or p.endswith("GptOssMlp/wi_0"))
    index = (slice(0, 1), 1)
    file = src.whole_chunk(path, index)
    assert src.expected(file) == ("xxh3_128", file_digest(src.step_dir / file))
    src.verify_hashes({file: {"xxh3_128": file_digest(src.step_dir / file)}})
    with pytest.raises(InputError, match=f"{file}: xxh3_128 differs from its conversion.json"):
        src.verify_hashes({file: {"xxh3_128": "0" * 32}})
    bad = open_orbax(_copy(scanned_out, tmp_path / "src"))
    _flip(bad.step_dir / file)
    assert bad.read_whole_chunk(path, index, file) is not None           # the read itself succeeds...
    with pytest.raises(InputError, match=f"{file}: xxh3_128 differs from its conversion.json"):
        bad.read(path, index)                                            # ...and its digest is refused


@pytest.mark.parametrize("command", ["to-hf", "to-orbax", "verify", "check"])
def test_removed_commit_marker_is_refused_unless_allowed(scanned_out, tmp_path, command):
    """Before: a checkpoint whose commit_success.txt was removed was still verified and exported
    (the timestamp in _CHECKPOINT_METADATA counted instead). Now, where the record lists the
    marker, every reader refuses it; --allow-uncommitted reads it anyway."""
    src = _copy(scanned_out, tmp_path / "src")
    (src / "0" / "commit_success.txt").unlink()
    out = tmp_path / "o"
    args = {"to-hf": ["to-hf", str(src), str(out), "--no-progress"],
            "to-orbax": ["to-orbax", str(src), str(out), "--unscanned", "--no-progress"],
            "verify": ["verify", str(src), "--golden", str(_golden(tmp_path))],
            "check": ["check", str(src)]}[command]
    if command == "check":
        _refused(_cli(*args), "0/commit_success.txt: missing (the step's commit marker", code=5)
    else:
        _refused(_cli(*args), "Orbax step without its commit marker", "--allow-uncommitted")
    assert not out.exists()
    if command in ("to-hf", "check"):
        r = _cli(*args, "--allow-uncommitted")
        assert r.exit_code == 0, r.output


def test_generate_refuses_a_flipped_chunk(scanned_out, tmp_path):
    src, chunk = _flipped(scanned_out, tmp_path)
    _refused(_cli("generate", str(src), "--prompt", "hi", "--max-new-tokens", "1"), f"{chunk}: xxh3_128 differs")


def test_verify_refuses_a_modified_hf_output(mxfp4_dir, tmp_path):
    """A dequantize output carries conversion.json too: verify hashes its shards before loading."""
    from gptoss_convert.converters.dequantize import dequantize
    out = tmp_path / "hf"
    dequantize(mxfp4_dir, out, **QUIET)
    shard = sorted(out.glob("model*.safetensors"))[-1]
    _flip(shard, -3)
    _refused(_cli("verify", str(out), "--golden", str(_golden(tmp_path))), f"{shard}: xxh3_128 differs")


# -- 7. size limits on files read whole --------------------------------------------------------------
def _grow(path: Path, size: int) -> None:
    """Make `path` `size` bytes of valid JSON (an object padded with spaces): only its size is wrong."""
    text = path.read_text() if path.suffix == ".json" else "{}"
    path.write_text(text + " " * (size - len(text.encode())))


@pytest.mark.parametrize("name, limit_name", [("config.json", "MAX_CONFIG_BYTES"),
                                              ("model.safetensors.index.json", "MAX_INDEX_BYTES"),
                                              ("tokenizer.json", "MAX_TOKENIZER_BYTES"),
                                              ("generation_config.json", "MAX_SIDECAR_BYTES")])
def test_oversized_json_in_an_hf_source_is_refused_by_size(mxfp4_dir, tmp_path, name, limit_name):
    """Before: a 100 MB config.json was parsed, a 1.5 GB tokenizer.json read whole. Now a file
    over its named limit is refused by its size (stat), before it is read."""
    from gptoss_convert.io import files
    limit = getattr(files, limit_name)
    src = _copy(mxfp4_dir, tmp_path / "src")
    with open(src / name, "r+b") as f:          # sparse: the size without the bytes
        f.truncate(limit + 1)
    line = _refused(_cli("dequantize", str(src), str(tmp_path / "o"), "--no-progress"),
                    f"{src / name}: {limit + 1:,} bytes, over the {limit:,}-byte limit")
    assert "Traceback" not in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("which", ["conversion.json", "0/items/_METADATA", "0/_CHECKPOINT_METADATA"])
def test_oversized_orbax_metadata_or_record_is_refused_by_size(scanned_out, tmp_path, which):
    from gptoss_convert.io.files import MAX_ORBAX_METADATA_BYTES, MAX_RECORD_BYTES
    limit = MAX_RECORD_BYTES if which == "conversion.json" else MAX_ORBAX_METADATA_BYTES
    src = _copy(scanned_out, tmp_path / "src")
    if which != "conversion.json":
        (src / "conversion.json").unlink()      # else the record's hash refuses the edit first
    with open(src / which, "r+b") as f:
        f.truncate(limit + 1)
    cmd = ["check", str(src)] if which == "conversion.json" else \
        ["to-hf", str(src), str(tmp_path / "o"), "--no-progress"]
    _refused(_cli(*cmd), f"over the {limit:,}-byte limit")


def test_read_small_reads_no_further_than_the_limit_from_an_object():
    """On an object store there is no stat: read_small asks for limit + 1 bytes, no more."""
    from gptoss_convert.io.files import read_small

    class Obj:
        asked = []

        def read_bytes(self, byte_range=None):
            self.asked.append(byte_range)
            return b"x" * min(10**6, byte_range.stop)

        def __str__(self):
            return "gs://b/tokenizer.json"
    with pytest.raises(InputError, match="gs://b/tokenizer.json: over the 1,000-byte limit for tokenizer"):
        read_small(Obj(), 1000, "tokenizer")
    assert Obj.asked == [slice(0, 1001)]
    assert read_small(type("Small", (Obj,), {"read_bytes": lambda self, byte_range=None: b"{}"})(), 1000, "x") == b"{}"


# -- 8. clean failures ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["--in-memory", "--streamed"])
def test_verify_on_a_truncated_chunk_is_one_line_without_event_loop_tracebacks(scanned_out, tmp_path, mode):
    """A checkpoint without a record (from elsewhere) with a chunk cut short: before, verify printed
    the error as `ValueError: DATA_LOSS ...` (exit 1) amid a dozen `RuntimeError: Event loop is
    closed` tracebacks from Orbax's reads still in flight (and `--streamed`, which reads leaf by
    leaf, as a bare ValueError). Now: exit 2 and one line naming the chunk (and, streamed, the leaf)."""
    src = _copy(scanned_out, tmp_path / "src")
    (src / "conversion.json").unlink()
    chunk = _chunk(src)
    with open(chunk, "r+b") as f:
        f.truncate(100)
    r = subprocess.run([sys.executable, "-m", "gptoss_convert", "verify", str(src), "--golden", str(_golden(tmp_path)),
                        mode, "--no-progress"], capture_output=True, text=True, env=run_env(), timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr
    assert len(lines) == 1
    where = (f"{src / '0' / 'items'}: cannot read the checkpoint (" if mode == "--in-memory"
             else f"{src / '0'}: cannot read ")
    assert lines[0].startswith(f"error: {where}") and "DATA_LOSS" in lines[0], lines[0]
    assert str(chunk) in lines[0] and "gptoss-convert check" in lines[0], lines[0]


def test_generate_refuses_an_oversized_tokenizer_and_a_bad_eos(scanned_out, tmp_path):
    """generate read tokenizer.json whole (1.5 GB accepted) and trusted generation_config.json's
    eos ids; both are refused now, named."""
    from gptoss_convert.io.files import MAX_TOKENIZER_BYTES
    tok = tmp_path / "tok"
    tok.mkdir()
    with open(tok / "tokenizer.json", "wb") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)
    args = ["generate", str(scanned_out), "--prompt", "hi", "--max-new-tokens", "1"]
    _refused(_cli(*args, "--tokenizer", str(tok)), f"{tok / 'tokenizer.json'}: {MAX_TOKENIZER_BYTES + 1:,} bytes, over")
    src = _copy(scanned_out, tmp_path / "src")
    (src / "conversion.json").unlink()
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
    _refused(_cli("generate", str(src), "--prompt", "hi", "--max-new-tokens", "1"),
             "generation_config.json: eos_token_id ['x'] is not a token id")


def test_to_hf_refuses_an_oversized_sidecar_beside_the_step(scanned_out, tmp_path):
    from gptoss_convert.io.files import MAX_SIDECAR_BYTES
    src = _copy(scanned_out, tmp_path / "src")
    (src / "conversion.json").unlink()
    with open(src / "chat_template.jinja", "r+b") as f:
        f.truncate(MAX_SIDECAR_BYTES + 1)
    _refused(_cli("to-hf", str(src), str(tmp_path / "o"), "--no-progress"),
             f"chat_template.jinja: {MAX_SIDECAR_BYTES + 1:,} bytes, over")

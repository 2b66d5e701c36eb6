"""The one conversion protocol (converters/job.py), as every converting command gets it:
resume only onto the same source bytes, checks before the first byte, bucket OUTs, relayout
on several processes, and the CLI's uniform behaviour (exit codes, --debug, --json, progress)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import run_env
from gptoss_convert.cli import main
from gptoss_convert.converters.dequantize import dequantize
from gptoss_convert.converters.to_hf import to_hf
from gptoss_convert.converters.to_orbax import to_orbax

QUIET = {"progress": False, "log": lambda *a: None}
WAIT_S = 300


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gptoss_convert", *map(str, args)], capture_output=True, text=True,
                          env=run_env() | (env or {}), timeout=WAIT_S)


def _files(root) -> dict[str, bytes]:
    """Every file under `root` but the record (whose paths and times differ)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("conversion.json", "_CHECKPOINT_METADATA", "commit_success.txt")}


def _flip_one_byte(shard: Path, offset_from_end: int = 100) -> None:
    """Change one byte inside the tensor data (same size, same header)."""
    data = bytearray(shard.read_bytes())
    data[-offset_from_end] ^= 0x01
    shard.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def orbax_src(mxfp4_dir, tmp_path_factory):
    return to_orbax(mxfp4_dir, tmp_path_factory.mktemp("orbsrc") / "orb", scanned=True, **QUIET)


CASES = {   # command line after SRC OUT; the kill point leaves at least one unit journaled
    "to-orbax": (["to-orbax"], ["--scanned"], "journal:3"),
    "dequantize": (["dequantize"], ["--max-shard-size", "200KB"], "journal:2"),
    "to-hf": (["to-hf"], ["--max-shard-size", "200KB"], "journal:1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CASES))
def test_resume_onto_a_source_differing_in_one_byte_is_refused(kind, mxfp4_dir, orbax_src, tmp_path):
    """Interrupt a run, change one byte of a source file (same size), --resume: refused naming the
    file, nothing more written; with the original bytes back, --resume finishes byte-identical."""
    cmd, opts, kill = CASES[kind]
    src = tmp_path / "src"
    shutil.copytree(orbax_src if kind == "to-hf" else mxfp4_dir, src)
    out = tmp_path / "out"
    r = _cli(*cmd, src, out, *opts, "--no-progress", env={"GPTOSS_CONVERT_KILL_AT": kill})
    assert r.returncode == -9, r.stderr
    journal = (tmp_path / ".out.partial" / ".gptoss-progress" / "journal").read_text()
    assert "source\t" in journal and any(not line.startswith("source\t") for line in journal.splitlines()), journal
    victim = max((p for p in src.rglob("*") if p.is_file() and p.suffix != ".json"), key=lambda p: p.stat().st_size)
    original = victim.read_bytes()
    _flip_one_byte(victim)
    before = journal
    r = _cli(*cmd, src, out, *opts, "--no-progress", "--resume")
    assert r.returncode == 2 and not out.exists(), r.stderr
    line = r.stderr.strip().splitlines()[-1]
    name = victim.relative_to(src / "0" if kind == "to-hf" else src).as_posix()     # to-hf reads the step
    assert "splice" in line and name in line and "without --resume" in line, line
    assert (tmp_path / ".out.partial" / ".gptoss-progress" / "journal").read_text() == before
    victim.write_bytes(original)
    r = _cli(*cmd, src, out, *opts, "--no-progress", "--resume")
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    fresh = tmp_path / "fresh"
    assert _cli(*cmd, src, fresh, *opts, "--no-progress").returncode == 0
    assert _files(out) == _files(fresh)


def test_resume_onto_a_changed_bucket_source_is_refused(mxfp4_dir, gcs, tmp_path):
    """The same for a gs:// OUT: the journal objects record the source hashes."""
    src = tmp_path / "src"
    shutil.copytree(mxfp4_dir, src)
    url = "gs://bkt/protocol/resume"
    r = _cli("to-orbax", src, url, "--scanned", "--no-progress", env={"GPTOSS_CONVERT_KILL_AT": "journal:3"})
    assert r.returncode == -9, r.stderr
    victim = max(src.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    _flip_one_byte(victim)
    r = _cli("to-orbax", src, url, "--scanned", "--no-progress", "--resume")
    assert r.returncode == 2 and "splice" in r.stderr and victim.name in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["dequantize", "to-hf"])
def test_bucket_out_reads_back_equal_to_the_local_one(command, mxfp4_dir, orbax_src, gcs, tmp_path):
    """dequantize and to-hf write gs:// too (the shards target, uploaded shard by shard)."""
    from gptoss_convert.converters.check import check
    from gptoss_convert.io.location import resolve

    fn, src = (dequantize, mxfp4_dir) if command == "dequantize" else (to_hf, orbax_src)
    local = fn(src, tmp_path / "local", max_shard_size="200KB", **QUIET)
    url = fn(src, f"gs://bkt/protocol/{command}", max_shard_size="200KB", **QUIET)
    loc = resolve(str(url))
    keys = sorted(loc.keys())
    want = _files(local)
    assert sorted(k for k in keys if k != "conversion.json") == sorted(want)
    assert all((loc / k).read_bytes() == want[k] for k in want)
    check(str(url), log=lambda *a: None)


@pytest.mark.slow
def test_relayout_distributed_equals_one_process(orbax_src, tmp_path):
    """Relayout on two processes (jax.distributed) writes the single-process checkpoint."""
    from helpers import free_port as _free_port

    one = to_orbax(orbax_src, tmp_path / "one", scanned=False, **QUIET)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "gptoss_convert", "to-orbax", str(orbax_src),
                               str(tmp_path / "two"),
                               "--unscanned", "--no-progress", "--coordinator-address", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), "--heartbeat-timeout", "5",
                               "--distributed-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=run_env()) for i in range(2)]
    results = [p.communicate(timeout=WAIT_S) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert "process 1 of 2: wrote" in results[1][0]
    assert _files(tmp_path / "two") == _files(one)


@pytest.mark.parametrize("command", ["to-orbax", "dequantize"])
def test_too_little_free_space_is_refused_before_writing(command, mxfp4_dir, tmp_path, monkeypatch):
    """Free space below the plan's bytes: exit 3 naming need and availability, nothing written;
    --no-space-check writes anyway."""
    import gptoss_convert.converters.output as output

    real = shutil.disk_usage
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    args = [command, str(mxfp4_dir), str(tmp_path / "out"), "--no-progress"]
    args += ["--scanned"] if command == "to-orbax" else []
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 3, r.output
    assert "GB of disk" in r.output and "0.00 GB available" in r.output and "--no-space-check" in r.output
    assert list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(main, args + ["--no-space-check"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("where", ["inside", "same"])
def test_out_overlapping_src_is_refused(where, mxfp4_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(mxfp4_dir, src)
    before = _files(src)
    out = src / "converted" if where == "inside" else src
    r = CliRunner().invoke(main, ["dequantize", str(src), str(out), "--no-progress", "--overwrite"])
    assert r.exit_code == 3 and "source checkpoint" in r.output, r.output
    assert _files(src) == before


def test_cli_usage_errors_exit_2_and_debug_anywhere(mxfp4_dir, tmp_path):
    r = CliRunner().invoke(main, ["to-orbax", str(mxfp4_dir), str(tmp_path / "o"), "--scanned", "--unscanned"])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(main, ["to-orbax", str(mxfp4_dir), str(tmp_path / "o")])
    assert r.exit_code == 2 and "choose one layout" in r.output
    r = _cli("dequantize", tmp_path / "missing", tmp_path / "o", "--debug")      # --debug after the command
    assert r.returncode == 1 and "Traceback" in r.stderr
    r = _cli("dequantize", tmp_path / "missing", tmp_path / "o", env={"GPTOSS_CONVERT_DEBUG": "1"})
    assert "Traceback" in r.stderr
    r = _cli("dequantize", tmp_path / "missing", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_every_converting_command_spells_its_options_the_same():
    """--dtype (long spellings too), --dry-run, --resume, --strict-config, --json, the distributed
    options and --s3-endpoint on every converting command."""
    shared = {"--dtype", "--dry-run", "--overwrite", "--resume", "--workers", "--no-progress", "--quiet",
              "--allow-nonfinite", "--strict-config", "--no-space-check", "--json", "--s3-endpoint", "--distributed",
              "--coordinator-address", "--num-processes", "--process-id"}
    for name in ("to-orbax", "dequantize", "to-hf"):
        opts = {o for p in main.commands[name].params for o in p.opts}
        assert shared <= opts, (name, shared - opts)
        dtype = next(p for p in main.commands[name].params if p.name == "dtype")
        assert set(dtype.type.choices) == {"bf16", "fp32", "bfloat16", "float32"}


def test_json_summary_and_its_path_checked_first(mxfp4_dir, tmp_path):
    summary = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["dequantize", str(mxfp4_dir), str(tmp_path / "o"), "--no-progress",
                                  "--json", str(summary)])
    assert r.exit_code == 0, r.output
    doc = json.loads(summary.read_text())
    assert doc["command"] == "dequantize" and doc["ok"] and doc["exit_code"] == 0
    assert doc["result"] == str(tmp_path / "o")
    r = CliRunner().invoke(main, ["dequantize", str(mxfp4_dir), str(tmp_path / "o2"), "--json", "/nonexistent/s.json"])
    assert r.exit_code == 3 and "--json" in r.output and not (tmp_path / "o2").exists()
    r = CliRunner().invoke(main, ["dequantize", str(tmp_path / "nope"), str(tmp_path / "o3"), "--json", str(summary)])
    doc = json.loads(summary.read_text())
    assert r.exit_code == 2 and doc["exit_code"] == 2 and not doc["ok"] and "nope" in doc["error"]


def test_golden_out_checked_before_any_work(tmp_path):
    r = _cli("golden", tmp_path / "not-a-model", "--out", "/nonexistent/dir/g.jsonl")
    assert r.returncode == 3 and "/nonexistent" in r.stderr, r.stderr


def test_converters_print_progress_lines_when_not_a_terminal(mxfp4_dir, tmp_path):
    """A run logged to a file shows it is alive: plain [progress] lines on stderr; none with --quiet."""
    env = {"GPTOSS_CONVERT_PROGRESS_EVERY": "0"}
    r = _cli("dequantize", mxfp4_dir, tmp_path / "a", env=env)
    assert r.returncode == 0 and "[progress] dequantize:" in r.stderr and "(done)" in r.stderr, r.stderr
    r = _cli("dequantize", mxfp4_dir, tmp_path / "b", "--quiet", env=env)
    assert r.returncode == 0 and "[progress]" not in r.stderr
    r = _cli("check", tmp_path / "a", env=env)
    assert r.returncode == 0 and "[progress] check:" in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["to-orbax", "dequantize", "to-hf"])
def test_more_memory_than_available_is_refused_before_writing(command, mxfp4_dir, orbax_src, tmp_path, monkeypatch):
    """A plan whose peak memory estimate exceeds MemAvailable: exit 3 with the figures, nothing
    written; --no-space-check runs it anyway."""
    from gptoss_convert.converters import job

    monkeypatch.setattr(job, "available_memory", lambda: 100 << 20)     # 0.1 GB: below the runtime alone
    src = orbax_src if command == "to-hf" else mxfp4_dir
    args = [command, str(src), str(tmp_path / "out"), "--no-progress"]
    args += ["--scanned"] if command == "to-orbax" else []
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 3, r.output
    assert "GB of memory at its peak" in r.output and "0.1 GB available" in r.output and "--no-space-check" in r.output
    assert list(tmp_path.iterdir()) == []
    assert CliRunner().invoke(main, args + ["--no-space-check"]).exit_code == 0


def test_an_interrupted_export_keeps_the_shards_it_finished(orbax_src, tmp_path):
    """to-hf journals each shard as soon as the source files it read are hashed (they are hashed
    just ahead of the reads), not only once the whole source is: killed after its second shard,
    the journal holds both and the later shards are not written yet; --resume writes only the
    rest, and the result is byte-identical to an uninterrupted export."""
    out, opts = tmp_path / "out", ["--max-shard-size", "200KB", "--no-progress"]
    r = _cli("to-hf", orbax_src, out, *opts, env={"GPTOSS_CONVERT_KILL_AT": "journal:2"})
    assert r.returncode == -9, r.stderr
    partial = tmp_path / ".out.partial"
    journal = (partial / ".gptoss-progress" / "journal").read_text().splitlines()
    units = [line for line in journal if not line.startswith("source\t")]
    written = sorted(p.name for p in partial.glob("model-*.safetensors"))
    total = int(written[0].split("-of-")[1].split(".")[0])
    assert units == written[:2] and len(written) < total, (units, written)
    r = _cli("to-hf", orbax_src, out, *opts, "--resume")
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    fresh = tmp_path / "fresh"
    assert _cli("to-hf", orbax_src, fresh, *opts).returncode == 0
    assert _files(out) == _files(fresh)


class _SlowJournal:
    """An output whose journal fsync takes a while: records each batch of keys it was given."""

    def __init__(self, fail_after: int | None = None):
        self.batches: list[list[str]] = []
        self.fail_after = fail_after

    def mark_done(self, key, fault=True):
        self.mark_done_many([key])

    def mark_done_many(self, keys, fault=True):
        import time
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise OSError("journal disk full")
        time.sleep(0.01)
        self.batches.append(list(keys))


class _Solo:
    def all_hashed(self):
        return True

    def wait_all_hashed(self):
        pass


class _Bar:
    def update(self, n):
        pass


def test_journal_group_commit_records_every_unit_in_order_in_fewer_fsyncs():
    """Units released one by one while the journal's fsync runs are all journaled, in order, by
    the final flush; the ones that came in meanwhile share an fsync; the source entries first."""
    from gptoss_convert.converters.job import Hashing, Journal, Unit
    out = _SlowJournal()
    journal = Journal(out, Hashing(known={"a.safetensors": {"size": 1}}), _Bar(), _Solo())
    for i in range(60):
        journal.done(Unit(f"u{i}", 1))
    journal.flush(wait=True)
    keys = [k for b in out.batches for k in b]
    assert keys[0].startswith("source\ta.safetensors") and keys[1:] == [f"u{i}" for i in range(60)]
    assert len(out.batches) < 30


def test_journal_writer_error_is_raised_not_lost():
    from gptoss_convert.converters.job import Hashing, Journal, Unit
    out = _SlowJournal(fail_after=0)
    journal = Journal(out, Hashing(known={}), _Bar(), _Solo())
    with pytest.raises(OSError, match="journal disk full"):
        for i in range(50):
            journal.done(Unit(f"u{i}", 1))
        journal.flush(wait=True)

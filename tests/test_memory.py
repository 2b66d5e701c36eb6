"""The memory ceiling (--max-memory, issue 24 §5): every converting command fits how many blocks
it holds at once under it, refuses before any work when one block cannot fit, records what it
chose and the peak it reached, and its peak does not grow with the model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import run_env
from helpers import PLACE_OR_TIME
from gptoss_convert import dequantize, to_hf, to_orbax
from gptoss_convert.cli import main
from gptoss_convert.converters import job
from gptoss_convert.converters.provenance import RECORD
from gptoss_convert.testing.tiny import tiny_config, write_checkpoint

COMMANDS = ("to-orbax", "relayout", "dequantize", "to-hf")


@pytest.fixture(scope="module")
def orbax_src(mxfp4_dir, tmp_path_factory):
    return to_orbax(mxfp4_dir, tmp_path_factory.mktemp("orbsrc") / "orb", scanned=True, progress=False)


def _record(out) -> dict:
    return json.loads((out / RECORD).read_text())


def _convert(command, src, out, **kw):
    """`command` through the library (the relayout is to-orbax from an Orbax SRC)."""
    if command in ("to-orbax", "relayout"):
        return to_orbax(src, out, scanned=command == "to-orbax", progress=False, **kw)
    if command == "dequantize":
        return dequantize(src, out, progress=False, **kw)
    return to_hf(src, out, progress=False, workers=3, **kw)


def _src(command, mxfp4_dir, orbax_src):
    return orbax_src if command in ("relayout", "to-hf") else mxfp4_dir


@pytest.mark.parametrize("command", COMMANDS)
def test_a_lower_ceiling_holds_fewer_blocks_and_writes_the_same_bytes(command, mxfp4_dir, orbax_src, tmp_path):
    """Under a ceiling just below the planned peak the command runs with less parallelism, its
    estimate under the ceiling, and writes exactly the bytes of the default run."""
    src = _src(command, mxfp4_dir, orbax_src)
    _convert(command, src, tmp_path / "default")
    default = _record(tmp_path / "default")
    mem = default["memory"]
    assert mem["parallel"] == mem["planned_parallel"] > 1 and mem["max_memory"] == 1.5e9
    assert mem["estimate"] <= mem["max_memory"]
    ceiling = mem["estimate"] - 1
    _convert(command, src, tmp_path / "low", max_memory=ceiling)
    low = _record(tmp_path / "low")
    assert low["memory"]["parallel"] < mem["parallel"] and low["memory"]["estimate"] <= ceiling
    same = {f: v for f, v in default["outputs"].items() if f not in PLACE_OR_TIME}
    assert same and {f: v for f, v in low["outputs"].items() if f not in PLACE_OR_TIME} == same


@pytest.mark.parametrize("command", COMMANDS)
def test_a_ceiling_below_one_block_is_refused_before_any_work(command, mxfp4_dir, orbax_src, tmp_path):
    """Exit 3, one line naming --max-memory and the least the plan needs; nothing written."""
    src = _src(command, mxfp4_dir, orbax_src)
    args = ["to-orbax" if command == "relayout" else command, str(src), str(tmp_path / "out"), "--no-progress",
            "--max-memory", "100MB"] + (["--scanned"] if command in ("to-orbax", "relayout") else [])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 3, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]       # (a relayout logs the layout first)
    assert len(errors) == 1, r.output
    assert "--max-memory 0.10 GB" in errors[0] and "needs at least 0.4" in errors[0], errors[0]
    assert list(tmp_path.iterdir()) == []


def test_every_converting_command_takes_the_same_ceiling_option():
    for command in ("dequantize", "to-orbax", "to-hf", "merge-lora"):
        r = CliRunner().invoke(main, [command, "--help"])
        assert "--max-memory SIZE" in r.output and "[default: 1.5GB]" in r.output, (command, r.output)
    assert job.memory_ceiling("1.5GB") == job.memory_ceiling(job.DEFAULT_MAX_MEMORY) == 1_500_000_000
    r = CliRunner().invoke(main, ["dequantize", "a", "b", "--max-memory", "lots"])
    assert r.exit_code == 2 and "Invalid value for '--max-memory': not a size; write e.g. 1.5GB" in r.output, r.output


# The converter in a fresh interpreter that reports its own VmHWM last: the high-water mark of its
# own address space (a forked child's ru_maxrss would include the parent's pages it started with).
_WITH_PEAK = """
import sys
from gptoss_convert.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
with open("/proc/self/status") as f:
    print("VmHWM", next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")), file=sys.stderr)
sys.exit(code)
"""


def _peak(src, out) -> dict:
    """to-orbax in a fresh process: its record's memory fields and its peak RSS (bytes)."""
    r = subprocess.run([sys.executable, "-c", _WITH_PEAK, "to-orbax", str(src), str(out), "--scanned", "--no-progress"],
                       capture_output=True, text=True, env=run_env(), timeout=600)
    assert r.returncode == 0, r.stderr
    kb = int(r.stderr.strip().splitlines()[-1].split()[1])
    return _record(out)["memory"] | {"peak_rss": kb * 1024}


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    """The same layer shapes (blocks of up to 64 MB: the embedding's row blocks) with 2 and 8
    layers: both peaks under the default ceiling, and the larger model's within 128 MB of the
    smaller's (a conversion that kept anything per layer would grow by each layer's blocks)."""
    sizes = dict(vocab_size=32_768, hidden_size=1024, intermediate_size=1536, num_local_experts=8,
                 num_experts_per_tok=2, num_attention_heads=16, num_key_value_heads=4, head_dim=64, sliding_window=128)
    peaks = {}
    for layers in (2, 8):
        src = write_checkpoint(tmp_path / f"src{layers}", tiny_config(num_hidden_layers=layers, **sizes),
                               fmt="mxfp4", seed=0, shards=1)
        peaks[layers] = _peak(src, tmp_path / f"out{layers}")
    for m in peaks.values():
        assert m["peak_rss"] <= m["max_memory"] and m["estimate"] <= m["max_memory"], peaks
    assert peaks[8]["peak_rss"] - peaks[2]["peak_rss"] < 128 << 20, peaks

"""Shared benchmark helpers: median timing, RSS readings, and snippets run in their own process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """(median, all timings) of `repeats` calls of fn() after `warmup` untimed ones; results dropped."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; 0.0 elsewhere)."""
    return status_mb("VmRSS:")


def status_mb(field: str, pid: int | str = "self") -> float:
    """`field` (e.g. "VmHWM:") of process `pid`'s /proc status, in MiB; 0.0 where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024                 # kB -> MiB
    except OSError:
        pass
    return 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM; since the last reset_peak_rss())."""
    return status_mb("VmHWM:")


def reset_peak_rss() -> bool:
    """Restart the peak at the current RSS (Linux >= 4.0), to measure one call; False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# Runs the snippet, then reports the child's own peak RSS. Not wait4()'s ru_maxrss: a child
# spawned by a large parent (vfork + exec) inherits the parent's peak there, so peaks would mix.
_WRAPPER = """
import json, sys
code = sys.argv.pop(1)
exec(compile(code, "<benchmark>", "exec"), {"__name__": "__main__"})
from benchmarks.common import peak_rss_mb
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""


def run_isolated(code: str, args: list[str] = (), env: dict[str, str | None] | None = None) -> tuple[dict, float]:
    """Run `code` with `args` in a fresh Python process; return (its result, its peak RSS in MiB).

    The snippet reports by printing one JSON object as its last stdout line. The peak is the
    child's own high-water mark (from its start, or from its last reset_peak_rss() call).
    `env` entries are added to the current environment (None removes a variable); the repo root
    is put on PYTHONPATH.
    """
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = str(ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, code, *args], stdout=subprocess.PIPE,
                          env=child_env, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {list(args)} exited with status {proc.returncode}")
    *_, result, peak = proc.stdout.strip().splitlines()
    return json.loads(result), json.loads(peak)["peak_rss_mb"]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """GitHub markdown table of `rows` restricted to `columns` (in that order)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> dict:
    """CPU model, core count and load average, to print beside figures from a shared machine."""
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"cpu": model, "cpus": os.cpu_count(), "loadavg_1m": round(load[0], 2), "python": sys.version.split()[0]}

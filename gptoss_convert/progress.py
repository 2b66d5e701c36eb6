"""Progress for long work: a tqdm bar on a terminal, a plain line every few seconds otherwise.

Every step that can take more than a few seconds (converting, hashing, golden, verify, check,
the model load inside golden/verify, each demo step) reports through `progress(...)`, so a run
logged to a file or a CI console shows that it is alive. `enabled=False` (`--no-progress`,
`--quiet`) silences it. The plain line goes to stderr:

    [progress] golden: 2/4 prompts (50%), 12.3 s elapsed
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

PLAIN_EVERY_S = float(os.environ.get("GPTOSS_CONVERT_PROGRESS_EVERY", "10"))


class PlainProgress:
    """tqdm's `update`/`set_postfix_str`/`close` interface, printing one line every `every_s`
    seconds (and one when done) instead of redrawing a bar: for logs, pipes and CI."""

    def __init__(self, total: int | None, desc: str, unit: str, every_s: float = PLAIN_EVERY_S, stream=None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.n = 0
        self.t0 = self._last = time.monotonic()
        self.postfix = ""
        self.disable = False

    def _amount(self, n: float) -> str:
        if self.unit == "B":
            return f"{n / 1e9:.2f} GB"
        return f"{n:g}" if self.unit in ("", "it") else f"{n:g} {self.unit}"

    def _line(self, final: bool = False) -> None:
        dt = time.monotonic() - self.t0
        done = self._amount(self.n)
        if self.total:
            done += f"/{self._amount(self.total)} ({100 * self.n / self.total:.0f}%)"
        rate = f", {self.n / 1e9 / dt:.2f} GB/s" if self.unit == "B" and dt > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"[progress] {self.desc}: {done}{rate}{extra}, {dt:.1f} s elapsed{' (done)' if final else ''}",
              file=self.stream, flush=True)
        self._last = time.monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.every_s:
            self._line()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        """A last line for work that took long enough to report on (short work stays silent)."""
        if time.monotonic() - self.t0 >= self.every_s:
            self._line(final=True)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress(total: int | None, desc: str, enabled: bool = True, unit: str = "B"):
    """A progress reporter over `total` units (`unit="B"`: bytes, shown as GB and GB/s): a tqdm
    bar when stderr is a terminal, PlainProgress lines otherwise, nothing when not `enabled`."""
    if not enabled:
        from tqdm import tqdm

        with tqdm(total=total, disable=True) as bar:
            yield bar
        return
    if not _is_terminal(sys.stderr):
        bar = PlainProgress(total, desc, unit)
        try:
            yield bar
        finally:
            bar.close()
        return
    from tqdm import tqdm

    scale = {"unit_scale": True, "unit_divisor": 1000} if unit == "B" else {}
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5, **scale) as bar:
        yield bar


@contextlib.contextmanager
def step(desc: str, enabled: bool = True):
    """A step with no measurable amount (loading a model, compiling): a start line and, when it
    took a while, an end line with its duration."""
    t0 = time.monotonic()
    if enabled:
        print(f"[progress] {desc} ...", file=sys.stderr, flush=True)
    yield
    if enabled and time.monotonic() - t0 >= 1.0:
        print(f"[progress] {desc}: done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)

"""Fault injection for the reliability tests: SIGKILL this process at a named point.

Set GPTOSS_CONVERT_KILL_AT="<point>:<n>" to die the n-th time `point` is reached (1-based).
Points: read (a source block was read), write (a block/shard was written), journal (a unit was
recorded done), commit (just before the staging directory is renamed into place).
Inert unless that variable is set.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("GPTOSS_CONVERT_KILL_AT")
    if not spec:
        return
    where, _, n = spec.partition(":")
    if where != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)

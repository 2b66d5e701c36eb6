"""Errors a user can hit: each says what was wrong, where, and what to do."""

from __future__ import annotations


class ConvertError(Exception):
    """Base class: the CLI prints `error: <message>` on one line and exits non-zero."""

    exit_code = 1

    def one_line(self) -> str:
        return " ".join(str(self).split())


class InputError(ConvertError):
    """The source checkpoint (or a file given to a command) is unusable as it is."""

    exit_code = 2


class ConfigError(InputError):
    """config.json is missing, malformed or holds values this tool does not support."""


class CorruptTensorError(InputError):
    """A tensor's bytes or header are inconsistent (truncated shard, bad scale byte, ...)."""


class PlanError(InputError):
    """The conversion plan does not close: lists every problem found, one per line."""

    def __init__(self, problems: list[str], header: str = "conversion plan is inconsistent"):
        self.problems = list(problems)
        super().__init__(f"{header} ({len(problems)} problem(s)): " + "; ".join(problems))


class OutputError(ConvertError):
    """The output location cannot be written as asked (exists, read-only, locked...)."""

    exit_code = 3


class VerifyFailed(ConvertError):
    """verify ran to the end and the checkpoint did not pass the thresholds."""

    exit_code = 4

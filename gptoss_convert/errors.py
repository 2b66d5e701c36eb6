"""Errors a user can hit: each says what was wrong, where, and what to do."""

from __future__ import annotations


class ConvertError(Exception):
    """Base class: the CLI prints `error: <message>` on one line and exits non-zero."""

    exit_code = 1
    result = None           # what the command found before failing (verify's FAIL report), for --json

    def one_line(self) -> str:
        return " ".join(str(self).split())


class InputError(ConvertError):
    """The source checkpoint (or a file given to a command) is unusable as it is."""

    exit_code = 2


class ConfigError(InputError):
    """config.json is missing, malformed or holds values this tool does not support."""


class CorruptTensorError(InputError):
    """A tensor's bytes or header are inconsistent (truncated shard, bad scale byte, ...)."""


# At most this many problems are printed by an error that lists several; the rest are counted.
MAX_PROBLEMS = 20


def problem_report(header: str, problems: list[str], limit: int = MAX_PROBLEMS) -> str:
    """`header (N problem(s)):` then one problem per line (each collapsed to one line), at most
    `limit` of them and then `... and K more`; a single problem stays on the header's line."""
    items = [" ".join(str(p).split()) for p in problems[:limit]]
    if len(problems) == 1:
        return f"{header} (1 problem): {items[0]}"
    more = [f"  ... and {len(problems) - limit} more"] if len(problems) > limit else []
    return "\n".join([f"{header} ({len(problems)} problem(s)):", *(f"  - {p}" for p in items), *more])


class ProblemList:
    """Mixin for errors listing several problems: printed one per line, capped (problem_report)."""

    problems: list[str]

    def one_line(self) -> str:
        """The report as the CLI prints it: one line per problem (not one long line)."""
        return str(self)


class PlanError(ProblemList, InputError):
    """The conversion plan does not close: lists every problem found, one per line (the first
    MAX_PROBLEMS, then a count)."""

    def __init__(self, problems: list[str], header: str = "conversion plan is inconsistent"):
        self.problems = list(problems)
        super().__init__(problem_report(header, self.problems))


class OutputError(ConvertError):
    """The output location cannot be written as asked (exists, read-only, locked...)."""

    exit_code = 3


class VerifyFailed(ConvertError):
    """verify ran to the end and the checkpoint did not pass the thresholds (`result`: its report)."""

    exit_code = 4

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result

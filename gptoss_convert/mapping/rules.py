"""One line of a backend's mapping table: HF tensor(s) -> MaxText leaf (leaves), through named transforms.

A rule reads in both directions: forward (HF -> MaxText, what to-orbax runs) and `inverse()`
(MaxText -> HF, for export). A rule may name several targets when its first transform fans one
tensor out (gate_up_proj -> wi_0, wi_1 by `Deinterleave`), or several sources when its last
transform joins them (`Interleave`, the inverse of that): one line, never a flag.
"""

from __future__ import annotations

import dataclasses

from gptoss_convert.mapping.transforms import Deinterleave, Transform


def _names(x: str | tuple[str, ...]) -> tuple[str, ...]:
    return (x,) if isinstance(x, str) else tuple(x)


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF name(s) ("{i}" = layer index) -> target path(s) (relative to layers_{i} when per layer)."""

    hf: str | tuple[str, ...]
    target: str | tuple[str, ...]
    transforms: tuple[Transform, ...] = ()
    rows_per_block: int | None = None        # stream axis 0 this many rows at a time (1 = per expert)

    def __post_init__(self):
        n_in, n_out, ts = len(self.sources), len(self.targets), self.transforms
        if n_in > 1 and n_out > 1:
            raise ValueError(f"rule {self.sources} -> {self.targets}: several sources and several targets at once")
        if n_out > 1 and not (ts and isinstance(ts[0], Deinterleave) and ts[0].parts == n_out):
            raise ValueError(f"rule -> {self.targets}: several targets need a first transform that splits "
                             f"into {n_out} parts")
        if n_in > 1 and not (ts and ts[-1].joins and getattr(ts[-1], "parts", None) == n_in):
            raise ValueError(f"rule {self.sources} ->: several sources need a last transform that joins {n_in} parts")

    @property
    def sources(self) -> tuple[str, ...]:
        return _names(self.hf)

    @property
    def targets(self) -> tuple[str, ...]:
        return _names(self.target)

    @property
    def per_layer(self) -> bool:
        return any("{i}" in s for s in self.sources)

    def per_target(self) -> list[tuple[str, str, tuple[Transform, ...]]]:
        """The rule as one (source, target, transforms) line per target, as a conversion plan
        streams it: a fan-out first transform becomes the op that takes target p's part alone."""
        if len(self.sources) > 1:
            raise ValueError(f"rule {self.sources} -> {self.target}: joining several sources into one "
                             "target is not supported by the conversion plan")
        if len(self.targets) == 1:
            return [(self.hf, self.target, self.transforms)]
        split, rest = self.transforms[0], self.transforms[1:]
        return [(self.hf, t, (split.take(p),) + rest) for p, t in enumerate(self.targets)]

    def inverse(self) -> Rule:
        """The same line run backwards (MaxText -> HF): targets become sources, transforms invert."""
        return Rule(self.target, self.hf, tuple(t.inverse() for t in reversed(self.transforms)), self.rows_per_block)

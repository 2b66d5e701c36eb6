"""Scanned vs unscanned parameter layouts: where per-layer leaves land in the decoder tree.

Applied after the name mapping, so mapping rules never mention scanning. Unscanned: layer i's
leaves live under `decoder/layers_{i}/`. Scanned (MaxText, `param_scan_axis: 1`): layers are
grouped by their position in the repeating attention pattern of length `period` — layer i goes
to `decoder/layers/layers_{i % period}/`, stack slot i // period, inserted at axis 1. A model whose
layers are all alike (period 1, e.g. Qwen3-MoE) scans them as one stack, `decoder/layers/`, with
no `layers_{j}` level (MaxText scans the decoder layer itself there).
"""

from __future__ import annotations

import dataclasses
import re

from gptoss_convert.errors import InputError

SCAN_AXIS = 1  # MaxText param_scan_axis
_LAYER_PATH = re.compile(r"^decoder/(layers_\d+|layers/layers_\d+|layers)/")


def layer_relative(path: str) -> tuple[str, bool] | None:
    """(path inside the layer, stacked?) of a per-layer leaf path in either layout; None for a
    global leaf. 'decoder/layers/layers_1/X/y' -> ('X/y', True); 'decoder/layers/X/y' (period 1)
    -> ('X/y', True)."""
    m = _LAYER_PATH.match(path)
    return None if m is None else (path[m.end():], not m.group(1).startswith("layers_"))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one layer's leaf goes: target path, stack slot (None = whole leaf), full shape."""

    path: str
    slot: int | None
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where layer i's leaves go; scanned stacks go at `axis`, grouping layers by `period`."""

    scanned: bool
    num_layers: int
    period: int = 2
    axis = SCAN_AXIS            # MaxText's fixed param_scan_axis (not a field: the plan assumes it)

    def __post_init__(self):
        if self.scanned and self.num_layers % self.period:
            raise InputError(f"num_hidden_layers={self.num_layers} is not a multiple of {self.period}: MaxText's "
                             f"scanned layout stacks the layers in groups of {self.period} (one per attention kind); "
                             "convert with --unscanned")

    @property
    def name(self) -> str:
        return "scanned" if self.scanned else "unscanned"

    @property
    def stack_size(self) -> int:
        return self.num_layers // self.period

    def place(self, layer: int, rel_path: str, layer_shape: tuple[int, ...]) -> Placement:
        """Target of leaf `rel_path` (e.g. 'GptOssMlp/wi_0') of HF layer `layer`."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        if not self.scanned:
            return Placement(f"decoder/layers_{layer}/{rel_path}", None, tuple(layer_shape))
        shape = tuple(layer_shape[:self.axis]) + (self.stack_size,) + tuple(layer_shape[self.axis:])
        return Placement(f"{self.stack_prefix(layer % self.period)}{rel_path}", layer // self.period, shape)

    def stack_prefix(self, position: int) -> str:
        """Scanned: where the stack of layers at `position` in the period lives."""
        return "decoder/layers/" if self.period == 1 else f"decoder/layers/layers_{position}/"

    def layer_of(self, path: str, slot: int | None) -> int:
        """Inverse of `place` for the layer index (used by readers of a checkpoint)."""
        parts = path.split("/")
        if not self.scanned:
            return int(parts[1].removeprefix("layers_"))
        return slot * self.period + (0 if self.period == 1 else int(parts[2].removeprefix("layers_")))

"""Leaf specs: each parameter-tree leaf as its dimensions and mesh axes, spelled once per backend.

One table per backend (path -> `Leaf`) drives the abstract tree (shapes), the sharding (axes) and
the expert list (leaves whose leading axis is "expert"), so no second list of leaf names exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from gptoss_convert.mapping.layout import Layout, layer_relative

EXPERT_AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class Leaf:
    """dims: the config attribute giving each dimension ("H", "E", ...); axes: the mesh axis that
    dimension is sharded over (None = replicated)."""

    dims: tuple[str, ...]
    axes: tuple[str | None, ...]

    def __post_init__(self):
        if len(self.dims) != len(self.axes):
            raise ValueError(f"leaf dims {self.dims} and axes {self.axes} differ in length")

    def shape(self, cfg: Any) -> tuple[int, ...]:
        return tuple(int(getattr(cfg, d)) for d in self.dims)

    @property
    def expert(self) -> bool:
        """One slice per routed expert along axis 0 (what a streamed forward reads on demand)."""
        return self.axes[:1] == (EXPERT_AXIS,)


def tree_shapes(cfg: Any, global_leaves: Mapping[str, Leaf], layer_leaves: Mapping[str, Leaf],
                layout: Layout) -> dict[str, tuple[int, ...]]:
    """Every leaf of the tree as {'a/b/c': shape}, layer leaves placed by `layout`, sorted."""
    out = {p: leaf.shape(cfg) for p, leaf in global_leaves.items()}
    for i in range(layout.period) if layout.scanned else range(layout.num_layers):
        for rel, leaf in layer_leaves.items():
            p = layout.place(i, rel, leaf.shape(cfg))
            out[p.path] = p.shape
    return dict(sorted(out.items()))


def leaf_axes(path: str, global_leaves: Mapping[str, Leaf],
              layer_leaves: Mapping[str, Leaf]) -> tuple[str | None, ...] | None:
    """Mesh axis per dimension of the leaf at `path` (either layout; None on a stack axis), or
    None when `path` is no leaf of the table."""
    rel = layer_relative(path)
    leaf = global_leaves.get(path) if rel is None else layer_leaves.get(rel[0])
    if leaf is None:
        return None
    axes = list(leaf.axes)
    if rel is not None and rel[1]:
        axes.insert(Layout.axis, None)
    return tuple(axes)

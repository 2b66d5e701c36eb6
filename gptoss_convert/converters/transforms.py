"""Named, invertible tensor transforms used by the mapping tables.

Each op knows its output shape, where an input axis lands (so a conversion can stream blocks of
rows through it), and its inverse (so the same table can run backwards, MaxText -> HF).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gptoss_convert.buffers import as_bits, empty


class Transform:
    name: str = "?"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def axis(self, axis: int, ndim: int) -> int | None:
        """Where input axis `axis` lands (None: it does not survive as one axis)."""
        raise NotImplementedError

    def inverse(self) -> "Transform":
        raise NotImplementedError


# Source rows per tile of a transposed copy: ~2 MB of them stay in cache while their columns are
# written out. [11650, 2880] bf16 -> [2880, 11650]: 0.15 G elements/s untiled (as
# np.ascontiguousarray or TensorStore's encoder walk the transposed view), 0.59 with 2 MB tiles
# (benchmarks/bench_tiles.py, docs/benchmarks-history.md §2).
TRANSPOSE_TILE_BYTES = 2 << 20


def transposed(x: np.ndarray) -> np.ndarray:
    """`np.ascontiguousarray(x.T)` for a 2-D C-contiguous `x`, copied in tiles of source rows so
    that each tile is read from cache while its columns are written (~5x faster on big blocks)."""
    out = empty(x.shape[::-1], x.dtype)
    src, dst = as_bits(x), as_bits(out)
    tile = max(16, TRANSPOSE_TILE_BYTES // max(1, x.shape[1] * x.itemsize))
    for r in range(0, x.shape[0], tile):
        np.copyto(dst[:, r:r + tile], src[r:r + tile].T)
    return out


@dataclasses.dataclass(frozen=True)
class Transpose(Transform):
    """np.transpose(x, perm); a 2-D C-contiguous input gives a C-contiguous copy (`transposed`),
    so that whoever consumes it (a chunk encoder, a split) reads it in order."""

    perm: tuple[int, ...]
    name = "transpose"

    def __call__(self, x):
        if self.perm == (1, 0) and x.ndim == 2 and x.flags.c_contiguous and x.size:
            return transposed(x)
        return np.transpose(x, self.perm)

    def shape(self, shape):
        if len(shape) != len(self.perm):
            raise ValueError(f"transpose{self.perm} needs {len(self.perm)} axes, got shape {list(shape)}")
        return tuple(shape[p] for p in self.perm)

    def axis(self, axis, ndim):
        return self.perm.index(axis)

    def inverse(self):
        return Transpose(tuple(int(i) for i in np.argsort(self.perm)))

    def __str__(self):
        return f"transpose{self.perm}"


@dataclasses.dataclass(frozen=True)
class SplitAxis(Transform):
    """Split axis `axis` of size a*b*... into axes `sizes` (e.g. Nq*D -> Nq, D)."""

    axis_: int
    sizes: tuple[int, ...]
    name = "split"

    def __call__(self, x):
        a = self.axis_ % x.ndim
        return x.reshape(x.shape[:a] + self.sizes + x.shape[a + 1:])

    def shape(self, shape):
        a = self.axis_ % len(shape)
        if shape[a] != math.prod(self.sizes):
            raise ValueError(f"split axis {a} of {list(shape)} into {list(self.sizes)}: sizes do not multiply to {shape[a]}")
        return shape[:a] + self.sizes + shape[a + 1:]

    def axis(self, axis, ndim):
        a = self.axis_ % ndim
        return axis if axis < a else (None if axis == a else axis + len(self.sizes) - 1)

    def inverse(self):
        return MergeAxes(self.axis_ if self.axis_ >= 0 else self.axis_ - len(self.sizes) + 1, len(self.sizes))

    def __str__(self):
        return f"split(axis={self.axis_}, {'x'.join(map(str, self.sizes))})"


@dataclasses.dataclass(frozen=True)
class MergeAxes(Transform):
    """Merge `count` consecutive axes starting at `axis_` into one."""

    axis_: int
    count: int
    name = "merge"

    def __call__(self, x):
        a = self.axis_ % x.ndim
        return x.reshape(x.shape[:a] + (-1,) + x.shape[a + self.count:])

    def shape(self, shape):
        a = self.axis_ % len(shape)
        return shape[:a] + (math.prod(shape[a:a + self.count]),) + shape[a + self.count:]

    def axis(self, axis, ndim):
        a = self.axis_ % ndim
        return axis if axis < a else (None if axis < a + self.count else axis - self.count + 1)

    def inverse(self):
        raise NotImplementedError("MergeAxes.inverse needs the split sizes; tables use SplitAxis forward")

    def __str__(self):
        return f"merge(axis={self.axis_}, {self.count})"


@dataclasses.dataclass(frozen=True)
class TakeInterleaved(Transform):
    """Every `parts`-th entry of the last axis starting at `part` (gate = 0::2, up = 1::2).

    Its inverse needs all parts: `interleave` below puts them back together.
    """

    part: int
    parts: int = 2
    name = "deinterleave"

    def __call__(self, x):
        return x[..., self.part::self.parts]

    def shape(self, shape):
        if shape[-1] % self.parts:
            raise ValueError(f"last axis {shape[-1]} of {list(shape)} is not a multiple of {self.parts}")
        return shape[:-1] + (shape[-1] // self.parts,)

    def axis(self, axis, ndim):
        return None if axis == ndim - 1 else axis

    def inverse(self):
        raise NotImplementedError("use interleave([part0, part1, ...])")

    def __str__(self):
        return f"take[{self.part}::{self.parts}] of last axis"


def interleave(parts: list[np.ndarray]) -> np.ndarray:
    """Inverse of TakeInterleaved over all parts: out[..., p::n] = parts[p]."""
    out = np.empty(parts[0].shape[:-1] + (parts[0].shape[-1] * len(parts),), parts[0].dtype)
    for p, x in enumerate(parts):
        out[..., p::len(parts)] = x
    return out


def apply(transforms: tuple[Transform, ...], x: np.ndarray) -> np.ndarray:
    for t in transforms:
        x = t(x)
    return x


def out_shape(transforms: tuple[Transform, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    for t in transforms:
        shape = t.shape(shape)
    return tuple(shape)


def out_axis(transforms: tuple[Transform, ...], axis: int, shape: tuple[int, ...]) -> int | None:
    """Where input axis `axis` of a `shape` tensor ends up (None if split or merged away)."""
    for t in transforms:
        if axis is None:
            return None
        axis = t.axis(axis, len(shape))
        shape = t.shape(shape)
    return axis

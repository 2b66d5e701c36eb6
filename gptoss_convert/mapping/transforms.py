"""Named, invertible tensor transforms used by the mapping tables.

Each op knows its output shape, where an input axis lands (so a conversion can stream blocks of
rows through it), and its inverse (so the same table can run backwards, MaxText -> HF). Most ops
take one array to one array; a fan-out op (`Deinterleave`) gives a tuple of arrays and its inverse,
a joining op (`Interleave`), takes one: `apply` runs one-array ops on each part in between.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gptoss_convert.buffers import as_bits, empty


class Transform:
    name: str = "?"
    joins: bool = False          # takes a tuple of arrays (the inverse of a fan-out op)

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


# L1 data cache geometry assumed for the tile cap below (x86 and most ARM cores: 64 sets of 8 ways of 64 B).
L1_LINE, L1_SETS, L1_WAYS = 64, 64, 8


def transpose_tile_rows(row_bytes: int) -> int:
    """Source rows per tile of `transposed`: TRANSPOSE_TILE_BYTES worth, capped so that the tile's
    rows stay in L1 while its columns are written. Rows whose stride is a multiple of 4 KiB
    (Qwen3's [768, 2048] and [V, 2048] bf16) all map to ONE L1 set, which holds 8 lines: a taller
    tile evicts each line before its next column is read (measured: 8 rows ~4x faster than 512)."""
    rows = max(16, TRANSPOSE_TILE_BYTES // max(1, row_bytes))
    sets_touched = L1_SETS // math.gcd(row_bytes // L1_LINE, L1_SETS) if row_bytes % L1_LINE == 0 else L1_SETS
    if sets_touched <= L1_SETS // 8:      # badly aliased strides only (gpt-oss's 5760 B rows touch 32 sets: unchanged)
        rows = min(rows, L1_WAYS * sets_touched)
    return rows


def transposed(x: np.ndarray) -> np.ndarray:
    """`np.ascontiguousarray(x.T)` for a 2-D C-contiguous `x`, copied in tiles of source rows so
    that each tile is read from cache while its columns are written (~5x faster on big blocks)."""
    out = empty(x.shape[::-1], x.dtype)
    src, dst = as_bits(x), as_bits(out)
    tile = transpose_tile_rows(x.shape[1] * x.itemsize)
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
            raise ValueError(f"split axis {a} of {list(shape)} into {list(self.sizes)}: "
                             f"sizes do not multiply to {shape[a]}")
        return shape[:a] + self.sizes + shape[a + 1:]

    def axis(self, axis, ndim):
        a = self.axis_ % ndim
        return axis if axis < a else (None if axis == a else axis + len(self.sizes) - 1)

    def inverse(self):
        return MergeAxes(self.axis_ if self.axis_ >= 0 else self.axis_ - len(self.sizes) + 1, self.sizes)

    def __str__(self):
        return f"split(axis={self.axis_}, {'x'.join(map(str, self.sizes))})"


@dataclasses.dataclass(frozen=True)
class MergeAxes(Transform):
    """Merge the consecutive axes of sizes `sizes` starting at `axis_` into one (Nq, D -> Nq*D)."""

    axis_: int
    sizes: tuple[int, ...]
    name = "merge"

    def __call__(self, x):
        a = self.axis_ % x.ndim
        return x.reshape(x.shape[:a] + (-1,) + x.shape[a + len(self.sizes):])

    def shape(self, shape):
        a = self.axis_ % len(shape)
        if tuple(shape[a:a + len(self.sizes)]) != tuple(self.sizes):
            raise ValueError(f"merge axes {a}.. of {list(shape)}: expected sizes {list(self.sizes)}")
        return shape[:a] + (math.prod(self.sizes),) + shape[a + len(self.sizes):]

    def axis(self, axis, ndim):
        a, n = self.axis_ % ndim, len(self.sizes)
        return axis if axis < a else (None if axis < a + n else axis - n + 1)

    def inverse(self):
        return SplitAxis(self.axis_ if self.axis_ >= 0 else self.axis_ + len(self.sizes) - 1, self.sizes)

    def __str__(self):
        return f"merge(axis={self.axis_}, {'x'.join(map(str, self.sizes))})"


@dataclasses.dataclass(frozen=True)
class InsertAxis(Transform):
    """A new axis of size 1 at `axis_` (one expert's [H, I] as the [1, H, I] slice of a stack)."""

    axis_: int
    name = "insert_axis"

    def __call__(self, x):
        return np.expand_dims(x, self.axis_)

    def shape(self, shape):
        return tuple(shape[:self.axis_]) + (1,) + tuple(shape[self.axis_:])

    def axis(self, axis, ndim):
        return axis if axis < self.axis_ else axis + 1

    def inverse(self):
        return DropAxis(self.axis_)

    def __str__(self):
        return f"insert_axis({self.axis_})"


@dataclasses.dataclass(frozen=True)
class DropAxis(Transform):
    """Remove the size-1 axis `axis_` (the inverse of InsertAxis)."""

    axis_: int
    name = "drop_axis"

    def __call__(self, x):
        return np.squeeze(x, self.axis_)

    def shape(self, shape):
        if shape[self.axis_] != 1:
            raise ValueError(f"drop axis {self.axis_} of {list(shape)}: it is not of size 1")
        return tuple(shape[:self.axis_]) + tuple(shape[self.axis_ + 1:])

    def axis(self, axis, ndim):
        return axis if axis < self.axis_ else (None if axis == self.axis_ else axis - 1)

    def inverse(self):
        return InsertAxis(self.axis_)

    def __str__(self):
        return f"drop_axis({self.axis_})"


@dataclasses.dataclass(frozen=True)
class TakeInterleaved(Transform):
    """Every `parts`-th entry of the last axis starting at `part` (gate = 0::2, up = 1::2).

    One part of a `Deinterleave`, as the conversion plan streams it (one target per part); alone
    it cannot be inverted: `Interleave` needs every part.
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
        raise NotImplementedError("one part cannot be inverted alone: invert the rule's Deinterleave (Interleave)")

    def __str__(self):
        return f"take[{self.part}::{self.parts}] of last axis"


@dataclasses.dataclass(frozen=True)
class Deinterleave(Transform):
    """One array -> a tuple of `parts` arrays, part p = x[..., p::parts] (gate/up of gate_up_proj).

    A rule naming several targets starts with it; `take(p)` is the op that makes target p alone.
    """

    parts: int = 2
    name = "deinterleave"

    def __call__(self, x):
        return tuple(self.take(p)(x) for p in range(self.parts))

    def take(self, part: int) -> TakeInterleaved:
        return TakeInterleaved(part, self.parts)

    def shape(self, shape):
        return self.take(0).shape(shape)      # the shape of each part

    def axis(self, axis, ndim):
        return self.take(0).axis(axis, ndim)

    def inverse(self):
        return Interleave(self.parts)

    def __str__(self):
        return f"deinterleave({self.parts}) of last axis"


@dataclasses.dataclass(frozen=True)
class Interleave(Transform):
    """A tuple of `parts` arrays -> one, out[..., p::parts] = x[p] (gate_up_proj from gate, up)."""

    parts: int = 2
    name = "interleave"
    joins = True

    def __call__(self, xs):
        if len(xs) != self.parts:
            raise ValueError(f"interleave({self.parts}) got {len(xs)} arrays")
        return interleave(list(xs))

    def shape(self, shape):
        return shape[:-1] + (shape[-1] * self.parts,)

    def axis(self, axis, ndim):
        return None if axis == ndim - 1 else axis

    def inverse(self):
        return Deinterleave(self.parts)

    def __str__(self):
        return f"interleave({self.parts}) on last axis"


def interleave(parts: list[np.ndarray]) -> np.ndarray:
    """Inverse of TakeInterleaved over all parts: out[..., p::n] = parts[p]."""
    out = np.empty(parts[0].shape[:-1] + (parts[0].shape[-1] * len(parts),), parts[0].dtype)
    for p, x in enumerate(parts):
        out[..., p::len(parts)] = x
    return out


def apply(transforms: tuple[Transform, ...], x):
    """Run `transforms` on x; between a fan-out and a join, one-array ops run on each part."""
    for t in transforms:
        x = tuple(t(a) for a in x) if isinstance(x, tuple) and not t.joins else t(x)
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

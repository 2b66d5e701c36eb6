"""The plan of `to-orbax` from an Orbax SRC: scanned <-> unscanned relayout of the params, bit-exact, streamed.

Params only (optimizer state and step dropped, as MaxText's generate_param_only_checkpoint
does). Each layer's leaf moves between `decoder/layers_{i}/X` and slot i // period of
`decoder/layers/layers_{i % period}/X` (the backend's Layout both ways), a block of rows of its
first axis at a time; values are copied, never recomputed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gptoss_convert.buffers import ALIGN_MIN_BYTES, PAGE, as_bits
from gptoss_convert.converters.orbax_target import OrbaxTarget, maxtext_flags
from gptoss_convert.converters.sources import DType, OrbaxSrc, open_source, write_sidecars
from gptoss_convert.errors import InputError
from gptoss_convert.finite import all_finite
from gptoss_convert.io.orbax_source import OrbaxSource
from gptoss_convert.mapping.layout import SCAN_AXIS, layer_relative


@dataclasses.dataclass(frozen=True)
class Move:
    """Rows `rows` of axis 0 of one layer's leaf: from (path, slot) in SRC to (path, slot) in OUT."""

    src: str
    src_slot: int | None
    dst: str
    dst_slot: int | None
    rows: slice
    nbytes: int

    @property
    def key(self) -> str:
        return f"{self.dst}@{self.dst_slot}[{self.rows.start}:{self.rows.stop}]"


def _index(ndim: int, slot: int | None, rows: slice, keep_slot: bool) -> tuple:
    index: list = [slice(None)] * ndim
    index[0] = rows
    if slot is not None:
        index[SCAN_AXIS] = slice(slot, slot + 1) if keep_slot else slot
    return tuple(index)


def _source_of(path: str, slot: int | None, in_layout, out_layout) -> tuple[str, int | None]:
    """Where OUT's leaf `path` (stack slot `slot`) is in SRC."""
    rel = layer_relative(path)
    if rel is None:
        return path, None
    p = in_layout.place(out_layout.layer_of(path, slot), rel[0], ())
    return p.path, p.slot


def plan_moves(targets: dict[str, tuple[int, ...]], out_layout, in_layout, itemsize: int,
               block_bytes: int = 64 << 20) -> list[Move]:
    """Every block to copy, target leaf by target leaf."""
    moves = []
    for path, shape in targets.items():
        stacked = layer_relative(path) is not None and out_layout.scanned
        local = shape[:SCAN_AXIS] + shape[SCAN_AXIS + 1:] if stacked else shape
        row = math.prod(local[1:]) * itemsize
        n = max(1, block_bytes // max(1, row))
        for slot in range(shape[SCAN_AXIS]) if stacked else [None]:
            src, src_slot = _source_of(path, slot, in_layout, out_layout)
            for r in range(0, local[0], n):
                rows = slice(r, min(r + n, local[0]))
                moves.append(Move(src, src_slot, path, slot, rows, (rows.stop - rows.start) * row))
    return moves


def _chunks(moves: list[Move], targets: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Per target, the shape of its largest block: one block is one chunk file."""
    out = {}
    for m in moves:
        shape = list(targets[m.dst])
        shape[0] = m.rows.stop - m.rows.start
        if m.dst_slot is not None:
            shape[SCAN_AXIS] = 1
        if m.dst not in out or math.prod(shape) > math.prod(out[m.dst]):
            out[m.dst] = tuple(shape)
    return out


@dataclasses.dataclass
class MoveBlocks:
    """The BlockPlan of a relayout: each Move's rows read from SRC and written to their place."""

    source: OrbaxSource
    blocks: list[Move]
    dtype: np.dtype
    allow_nonfinite: bool
    leaves: dict[str, tuple[int, ...]]
    # TensorStore's result and its source chunks' buffers, copied into pooled memory and freed:
    # uncounted (and kept by the heap) they took a relayout 0.45 GB over the --max-memory default
    transient_blocks = 3

    def read(self, m: Move, alloc=None) -> np.ndarray:
        """The block of `m`, in the output dtype; NaN/inf refused unless allowed (as to-orbax does).

        In memory from `alloc` (page-aligned from 64 KiB up, buffers.empty) where TensorStore's
        own array is not on a page boundary: the chunk writer writes an aligned block with
        O_DIRECT and any other through the page cache, which was 28% of the CPU samples of a
        Qwen3-30B-A3B relayout (each block spans 21 one-expert source chunks, so TensorStore
        reads it). One copy in memory instead of the page cache's copy and its writeback."""
        src = self.source
        x = src.read(m.src, _index(len(src.leaves[m.src][0]), m.src_slot, m.rows, keep_slot=False))
        if not self.allow_nonfinite and not all_finite(x):
            slot = "" if m.src_slot is None else f", slot {m.src_slot}"
            raise InputError(f"{m.src} (rows {m.rows.start}:{m.rows.stop}{slot}) "
                             f"in {src.item_dir}: NaN or inf weights; pass --allow-nonfinite to copy them anyway")
        x = np.ascontiguousarray(x.astype(self.dtype, copy=False))
        if alloc is not None and x.ctypes.data % PAGE and x.nbytes >= ALIGN_MIN_BYTES:
            out = alloc(x.shape, x.dtype)
            np.copyto(as_bits(out), as_bits(x))
            return out
        return x

    def _dst(self, m: Move) -> tuple[slice, ...]:
        shape = self.leaves[m.dst]
        index = _index(len(shape), m.dst_slot, m.rows, keep_slot=True)
        return tuple(slice(0, shape[a]) if s == slice(None) else s for a, s in enumerate(index))

    def emit(self, writer, m: Move, x: np.ndarray) -> list:
        if m.dst_slot is not None:
            x = np.expand_dims(x, SCAN_AXIS)
        return [writer.write_async(m.dst, self._dst(m), x, borrow=True)]

    def writes(self, m: Move) -> list[tuple[str, tuple[slice, ...]]]:
        return [(m.dst, self._dst(m))]


def relayout_job(src, *, scanned: bool, dtype: DType, like=None, step: int | None = None, strict_config: bool = False,
                 allow_nonfinite: bool = False, block_bytes: int = 64 << 20, compression: str | None = None,
                 item: str | None = None, log=None):
    """(source, target) writing the params of the Orbax checkpoint `src` (a run root, step or
    item; `step`, `item` pick one; any layout open_orbax reads) as a params-only checkpoint,
    scanned or not; see `to_orbax`."""
    source = OrbaxSrc(open_source(src, step, item, log), like, strict_config=strict_config)
    return source, relayout_target(source, scanned=scanned, dtype=dtype, allow_nonfinite=allow_nonfinite,
                                   block_bytes=block_bytes, compression=compression)


def relayout_target(source: OrbaxSrc, *, scanned: bool, dtype: DType, allow_nonfinite: bool = False,
                    block_bytes: int = 64 << 20, compression: str | None = None) -> OrbaxTarget:
    """The OrbaxTarget writing the params of the open Orbax source `source` (its `orbax` read
    leaf by leaf) as a params-only checkpoint, scanned or not."""
    orbax, backend, cfg = source.orbax, source.backend, source.cfg
    targets = backend.flat_shapes(cfg, scanned)
    out_layout, in_layout = backend.layout_for(cfg, scanned), backend.layout_for(cfg, orbax.scanned)
    moves = plan_moves(targets, out_layout, in_layout, dtype.itemsize, block_bytes)
    total = sum(m.nbytes for m in moves)
    layout, was = out_layout.name, in_layout.name

    def sidecars(out) -> None:      # config.json as to-orbax writes it: no quantization_config
        conf = {k: v for k, v in source.config_raw.items() if k != "quantization_config"}
        write_sidecars(out, conf, source.sidecars())

    def summary(result, seconds: float) -> str:
        return (f"to-orbax: relayout of step {orbax.step_dir.name} ({was}) -> {len(targets)} {layout} leaves "
                f"({total / 1e9:.2f} GB) at {result} in {seconds:.1f} s ({total / 1e9 / max(seconds, 1e-9):.2f} GB/s); "
                f"{orbax.other_leaves} non-param leaves dropped.\nMaxText flags: {maxtext_flags(result, scanned, cfg)}")

    target = OrbaxTarget(MoveBlocks(orbax, moves, dtype.np, allow_nonfinite, targets), targets, _chunks(moves, targets),
                         dtype.np,
                         {"scan_layers": scanned, "model_type": backend.model_type, "converter": "gptoss-convert"},
                         compression, {"layout": layout, "dtype": dtype.name, "compression": compression,
                                       "relayout_from": was},
                         {"source_step": orbax.step_dir.name, "source_other_leaves_dropped": orbax.other_leaves,
                          "source_layout": orbax.layout.record() if orbax.layout else None},
                         sidecars, summary, identity={"relayout": True, "block_bytes": block_bytes,
                                                      "source": str(orbax.step_dir)})
    target.describe = lambda: (f"relayout {was} -> {layout}: {len(targets)} leaves, {len(moves)} blocks, "
                               f"{total / 1e9:.2f} GB to write, from step {orbax.step_dir.name} "
                               f"of {orbax.step_dir.parent}")
    return target

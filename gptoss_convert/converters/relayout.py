"""The plan of `to-orbax` from an Orbax SRC: scanned <-> unscanned relayout of the params, bit-exact, streamed.

Params only (optimizer state and step dropped, as MaxText's generate_param_only_checkpoint
does). Each layer's leaf moves between `decoder/layers_{i}/X` and slot i // period of
`decoder/layers/layers_{i % period}/X` (the backend's Layout both ways), a block of rows of its
first axis at a time; values are copied, never recomputed.
"""

from __future__ import annotations

import dataclasses
import itertools
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
    """Region `region` (a slice per axis of one layer's leaf, the stack axis left out) of one
    leaf: from (path, slot) in SRC to (path, slot) in OUT."""

    src: str
    src_slot: int | None
    dst: str
    dst_slot: int | None
    region: tuple[slice, ...]
    nbytes: int

    @property
    def rows(self) -> slice:
        return self.region[0]

    def where(self, shape: tuple[int, ...], slot: int | None) -> str:
        """`rows a:b` where the block is whole rows of the leaf of shape `shape`, else `block [a:b, c:d, ..]`."""
        local = shape[:SCAN_AXIS] + shape[SCAN_AXIS + 1:] if slot is not None else shape
        if all(r.start == 0 and r.stop == n for r, n in zip(self.region[1:], local[1:])):
            return f"rows {self.rows.start}:{self.rows.stop}"
        return "block [" + ", ".join(f"{r.start}:{r.stop}" for r in self.region) + "]"

    @property
    def key(self) -> str:
        where = ",".join(f"{r.start}:{r.stop}" for r in self.region)
        return f"{self.dst}@{self.dst_slot}[{where}]"


def _index(ndim: int, slot: int | None, region: tuple[slice, ...], keep_slot: bool) -> tuple:
    index: list = list(region)
    if slot is not None:
        index.insert(SCAN_AXIS, slice(slot, slot + 1) if keep_slot else slot)
    return tuple(index + [slice(None)] * (ndim - len(index)))


def _source_of(path: str, slot: int | None, in_layout, out_layout) -> tuple[str, int | None]:
    """Where OUT's leaf `path` (stack slot `slot`) is in SRC."""
    rel = layer_relative(path)
    if rel is None:
        return path, None
    p = in_layout.place(out_layout.layer_of(path, slot), rel[0], ())
    return p.path, p.slot


GROUP_BELOW = 1 << 20      # source chunks smaller than this are grouped into blocks (bigger ones: a block each)


def block_shape(local: tuple[int, ...], chunk: tuple[int, ...] | None, itemsize: int,
                block_bytes: int) -> tuple[int, ...]:
    """The shape of the blocks a leaf of shape `local` is copied in, given its source's chunk
    shape (`local`'s axes; None when unknown): one whole source chunk where it fits in
    `block_bytes` (chunks under GROUP_BELOW grouped along the first axis where a chunk spans
    every other axis); else rows of the first axis, as many as fit. Grouped chunks come in equal
    blocks where a count near the most that fits divides the axis: the output's chunks are the
    blocks, and zarr stores an edge chunk whole (row blocks of 21 of Qwen3's 128 experts wrote
    147 expert slots per leaf).

    Whole chunks, because a block that cuts across chunks makes TensorStore read every chunk it
    touches whole for each block: the 20b's logits_dense, chunked by columns, was read 18 times
    over in row blocks, and the chunks TensorStore held beside the block took the peak over
    --max-memory. A block that is one chunk file of this tool's output is read with one O_DIRECT
    read into recycled memory (OrbaxSource.read_whole_chunk), which also gives its digest."""
    row = math.prod(local[1:]) * itemsize
    if chunk is None or math.prod(chunk) * itemsize > block_bytes:
        return (min(local[0], max(1, block_bytes // max(1, row))), *local[1:])
    block = [min(c, n) for c, n in zip(chunk, local)]
    if block[1:] == list(local[1:]) and math.prod(block) * itemsize < GROUP_BELOW:
        per = max(1, block_bytes // max(1, math.prod(block) * itemsize))        # source chunks per block
        n = -(-local[0] // block[0])
        even = max(d for d in range(1, min(per, n) + 1) if n % d == 0)
        block[0] = min(local[0], block[0] * (even if 2 * even >= per else per))
    return tuple(block)


def plan_moves(targets: dict[str, tuple[int, ...]], out_layout, in_layout, itemsize: int,
               block_bytes: int = 64 << 20, source_chunk=lambda path, slot: None) -> list[Move]:
    """Every block to copy, target leaf by target leaf; `source_chunk(path, slot)` gives the
    chunk shape of a source leaf as `block_shape` takes it (None: unknown)."""
    moves = []
    for path, shape in targets.items():
        stacked = layer_relative(path) is not None and out_layout.scanned
        local = shape[:SCAN_AXIS] + shape[SCAN_AXIS + 1:] if stacked else shape
        for slot in range(shape[SCAN_AXIS]) if stacked else [None]:
            src, src_slot = _source_of(path, slot, in_layout, out_layout)
            block = block_shape(local, source_chunk(src, src_slot), itemsize, block_bytes)
            for corner in itertools.product(*(range(0, n, b) for n, b in zip(local, block))):
                region = tuple(slice(c, min(c + b, n)) for c, b, n in zip(corner, block, local))
                moves.append(Move(src, src_slot, path, slot, region,
                                  math.prod(r.stop - r.start for r in region) * itemsize))
    return moves


def _chunks(moves: list[Move], targets: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Per target, the shape of its largest block: one block is one chunk file."""
    out = {}
    for m in moves:
        shape = [r.stop - r.start for r in m.region]
        if m.dst_slot is not None:
            shape.insert(SCAN_AXIS, 1)
        if m.dst not in out or math.prod(shape) > math.prod(out[m.dst]):
            out[m.dst] = tuple(shape)
    return out


def _source_chunk(source: OrbaxSource):
    """`plan_moves`' source_chunk for `source`: a leaf's read chunk shape, its stack axis left
    out for a slot of a stacked leaf (None where the chunk spans several slots)."""
    def chunk(path: str, slot: int | None) -> tuple[int, ...] | None:
        shape = source.chunk_shape(path)
        if shape is None or slot is None:
            return shape
        return None if shape[SCAN_AXIS] != 1 else shape[:SCAN_AXIS] + shape[SCAN_AXIS + 1:]
    return chunk


@dataclasses.dataclass
class MoveBlocks:
    """The BlockPlan of a relayout: each Move's rows read from SRC and written to their place."""

    source: OrbaxSource
    blocks: list[Move]
    dtype: np.dtype
    allow_nonfinite: bool
    leaves: dict[str, tuple[int, ...]]
    hashes: object = None       # provenance.ReadAheadHashes told each whole chunk's digest from its read

    def __post_init__(self):
        """What the plan's blocks read: `transient_blocks`, TensorStore's result and its source
        chunks' buffers (copied into pooled memory and freed; uncounted, and kept by the heap,
        they took a relayout 0.45 GB over the --max-memory default), 0 where every block is one
        whole chunk file read straight into recycled memory; and where every chunk is a file of
        its own, `block_reads` {block key: the files it reads} and `shared_reads`, the metadata
        every read depends on (a block is journaled once those are hashed)."""
        src = self.source
        self.transient_blocks = 0 if all(src.whole_chunk(m.src, self._src_index(m)) for m in self.blocks) else 3
        self.shared_reads, self.block_reads = None, None
        reads = [src.chunk_files(m.src, self._src_index(m)) for m in self.blocks]
        if all(r is not None for r in reads):
            chunks = frozenset().union(*reads)
            self.shared_reads = [f for f in src.files() if f not in chunks]
            self.block_reads = {m.key: frozenset(r).union(self.shared_reads) for m, r in zip(self.blocks, reads)}

    def hasher(self, files: list[str]):
        """job.run's hasher: the metadata hashed first, each whole chunk file from the bytes its
        block read (OrbaxSource.read_whole_chunk hashes them in hand), the rest at the end. The
        relayout hashed every chunk file from mapped pages beside its O_DIRECT read: the source
        read from disk twice, and the hash 36% of a relayout's CPU samples (BENCHMARKS.md)."""
        from gptoss_convert.converters.provenance import ReadAheadHashes
        self.hashes = ReadAheadHashes(self.source.step_dir, files, ahead=1, first=self.shared_reads or [])
        return self.hashes

    def _src_index(self, m: Move) -> tuple:
        return _index(len(self.source.leaves[m.src][0]), m.src_slot, m.region, keep_slot=False)

    def read(self, m: Move, alloc=None) -> np.ndarray:
        """The block of `m`, in the output dtype; NaN/inf refused unless allowed (as to-orbax does).

        In memory from `alloc` (page-aligned from 64 KiB up, buffers.empty) where TensorStore's
        own array is not on a page boundary: the chunk writer writes an aligned block with
        O_DIRECT and any other through the page cache, which was 28% of the CPU samples of a
        Qwen3-30B-A3B relayout (each block spans 21 one-expert source chunks, so TensorStore
        reads it). One copy in memory instead of the page cache's copy and its writeback."""
        src = self.source
        x = src.read(m.src, self._src_index(m), None if self.hashes is None else self.hashes.have)
        if not self.allow_nonfinite and not all_finite(x):
            slot = "" if m.src_slot is None else f", slot {m.src_slot}"
            raise InputError(f"{m.src} ({m.where(src.leaves[m.src][0], m.src_slot)}{slot}) "
                             f"in {src.item_dir}: NaN or inf weights; pass --allow-nonfinite to copy them anyway")
        x = np.ascontiguousarray(x.astype(self.dtype, copy=False))
        if alloc is not None and x.ctypes.data % PAGE and x.nbytes >= ALIGN_MIN_BYTES:
            out = alloc(x.shape, x.dtype)
            np.copyto(as_bits(out), as_bits(x))
            return out
        return x

    def _dst(self, m: Move) -> tuple[slice, ...]:
        shape = self.leaves[m.dst]
        index = _index(len(shape), m.dst_slot, m.region, keep_slot=True)
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
    moves = plan_moves(targets, out_layout, in_layout, dtype.itemsize, block_bytes, _source_chunk(orbax))
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
                                                      "blocks": "source chunks", "source": str(orbax.step_dir)})
    target.describe = lambda: (f"relayout {was} -> {layout}: {len(targets)} leaves, {len(moves)} blocks, "
                               f"{total / 1e9:.2f} GB to write, from step {orbax.step_dir.name} "
                               f"of {orbax.step_dir.parent}")
    return target

"""`to-orbax` from an Orbax SRC: scanned <-> unscanned relayout of the params, bit-exact, streamed.

Params only (optimizer state and step dropped, as MaxText's generate_param_only_checkpoint
does). Each layer's leaf moves between `decoder/layers_{i}/X` and slot i // period of
`decoder/layers/layers_{i % period}/X` (the backend's Layout both ways), a block of rows of its
first axis at a time; values are copied, never recomputed.
"""

from __future__ import annotations

import collections
import json
import dataclasses
import math
import time

import ml_dtypes
import numpy as np

from gptoss_convert import faults
from gptoss_convert.buffers import keep_freed_memory
from gptoss_convert.converters.common import ITEM, STEP, maxtext_flags, progress_bar, resolve_dtype
from gptoss_convert.converters.output import StagedOutput
from gptoss_convert.converters.provenance import write_record
from gptoss_convert.converters.remote_output import RemoteOutput, pending_marker
from gptoss_convert.converters.stream import background, prefetch
from gptoss_convert.converters.to_hf import backend_config, hash_source, open_source
from gptoss_convert.errors import InputError, OutputError
from gptoss_convert.io.hf_checkpoint import SIDECAR_FILES
from gptoss_convert.io.location import Location, resolve
from gptoss_convert.io.orbax_source import OrbaxSource
from gptoss_convert.mapping.layout import SCAN_AXIS, layer_relative

MAX_IN_FLIGHT = 4


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


def _read(src: OrbaxSource, m: Move, dtype: np.dtype, allow_nonfinite: bool) -> np.ndarray:
    """The block of `m`, in `dtype`; NaN/inf refused unless allowed (as to-orbax does)."""
    x = src.read(m.src, _index(len(src.leaves[m.src][0]), m.src_slot, m.rows, keep_slot=False))
    if not allow_nonfinite and not np.isfinite(x).all():
        raise InputError(f"{m.src} (rows {m.rows.start}:{m.rows.stop}{'' if m.src_slot is None else f', slot {m.src_slot}'}) "
                         f"in {src.item_dir}: NaN or inf weights; pass --allow-nonfinite to copy them anyway")
    return np.ascontiguousarray(x.astype(dtype, copy=False))


def relayout(src, out, *, scanned: bool, dtype: str = "bf16", like=None, step: int | None = None,
             allow_nonfinite: bool = False, dry_run: bool = False, overwrite: bool = False, resume: bool = False, progress: bool = True,
             block_bytes: int = 64 << 20, compression: str | None = None, log=print):
    """Write the params of the Orbax checkpoint `src` (a run root, step or items; `step` picks
    one) as a params-only checkpoint at `out`, scanned or not; see `to_orbax`."""
    t0 = time.perf_counter()
    keep_freed_memory()
    np_dtype = np.dtype(ml_dtypes.bfloat16 if resolve_dtype(dtype) == "bfloat16" else np.float32)
    source = open_source(src, step)
    backend, cfg, sidecars, raw = backend_config(source, like)
    targets = backend.flat_shapes(cfg, scanned)
    moves = plan_moves(targets, backend.layout_for(cfg, scanned), backend.layout_for(cfg, source.scanned),
                       np_dtype.itemsize, block_bytes)
    total = sum(m.nbytes for m in moves)
    layout = "scanned" if scanned else "unscanned"
    if dry_run:
        log(f"relayout {'scanned' if source.scanned else 'unscanned'} -> {layout}: {len(targets)} leaves, "
            f"{len(moves)} blocks, {total / 1e9:.2f} GB to write, from step {source.step_dir.name} of {source.step_dir.parent}")
        return moves
    from gptoss_convert.io.orbax_writer import OrbaxWriter

    out = resolve(out)
    remote = isinstance(out, Location)      # no rename on object stores: commit markers (to_orbax's path)
    _refuse_overlap(source, out)
    fingerprint = {"command": "to-orbax", "relayout": True, "layout": layout, "dtype": np_dtype.name,
                   "block_bytes": block_bytes, "compression": compression, "source": str(source.step_dir),
                   "source_files": source.sizes()}
    output = RemoteOutput if remote else StagedOutput
    with output(out, fingerprint=fingerprint, overwrite=overwrite, resume=resume,
                source=None if source.remote else source.step_dir, log=log) as staged:
        hashes = background(hash_source, source)
        meta = {"scan_layers": scanned, "model_type": backend.model_type, "converter": "gptoss-convert"}
        writer = OrbaxWriter(staged.path / STEP, {p: (s, np_dtype) for p, s in targets.items()},
                             chunk_shapes=_chunks(moves, targets), custom_metadata=meta, compression=compression)
        writer.create()
        if staged.resumed:
            writer.remove_temporaries()
        try:
            _stream(source, moves, writer, staged, lambda m: _read(source, m, np_dtype, allow_nonfinite), total, progress)
        finally:
            writer.close()
        writer.finalize(commit=not remote)     # object stores: Orbax's commit marker only after our record
        chunk_hashes = {p.relative_to(staged.path).as_posix(): h for p, h in writer.chunk_hashes().items()}
        chunk_sizes = {p.relative_to(staged.path).as_posix(): n for p, n in writer.chunk_sizes().items()}
        _copy_sidecars(sidecars, raw, staged.path)
        write_record(staged.path, command="to-orbax", source_dir=source.step_dir, source_files=hashes.result(),
                     options={"layout": layout, "dtype": np_dtype.name, "compression": compression,
                              "relayout_from": "scanned" if source.scanned else "unscanned"},
                     extra={"leaves": {p: list(s) for p, s in targets.items()}, "maxtext_item": f"{STEP}/{ITEM}",
                            "source_step": source.step_dir.name, "source_other_leaves_dropped": source.other_leaves},
                     output_hashes=chunk_hashes, output_sizes=chunk_sizes,
                     pending=pending_marker(writer, staged.path, remote))
        if remote:
            writer.commit()
        result = staged.commit()
    dt = time.perf_counter() - t0
    log(f"to-orbax: relayout of step {source.step_dir.name} ({'scanned' if source.scanned else 'unscanned'}) -> "
        f"{len(targets)} {layout} leaves ({total / 1e9:.2f} GB) at {result} in {dt:.1f} s "
        f"({total / 1e9 / max(dt, 1e-9):.2f} GB/s); {source.other_leaves} non-param leaves dropped.\n"
        f"MaxText flags: {maxtext_flags(result, scanned, cfg)}")
    return result


def _refuse_overlap(source: OrbaxSource, out) -> None:
    """A bucket OUT must not be, hold or lie in SRC's step (--overwrite would delete it; local
    OUTs are checked by StagedOutput)."""
    src = source.step_dir
    if not (source.remote and isinstance(out, Location)) or (out.scheme, out.bucket) != (src.scheme, src.bucket):
        return
    if not out.key or any(a == b or a.startswith(b + "/") for a, b in ((src.key, out.key), (out.key, src.key))):
        raise OutputError(f"{out}: is, holds or lies in the source checkpoint {src}; choose another OUT")


def _copy_sidecars(sidecars, raw: dict, out) -> None:
    """config.json (as to-orbax writes it: no quantization_config) and tokenizer files, for verify/generate/to-hf."""
    conf = {k: v for k, v in raw.items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    for f in SIDECAR_FILES:
        if (sidecars / f).is_file():
            (out / f).write_bytes((sidecars / f).read_bytes())


def _stream(source, moves, writer, staged, read, total, progress) -> None:
    """Copy every block not yet journaled; at most MAX_IN_FLIGHT blocks' writes pending."""
    todo = [m for m in moves if not staged.is_done(m.key)]
    with progress_bar(total, "to-orbax", progress) as bar:
        bar.update(total - sum(m.nbytes for m in todo))
        in_flight: collections.deque = collections.deque()

        def retire(n: int) -> None:
            while len(in_flight) > n:
                m, fut = in_flight.popleft()
                fut.result()
                faults.point("write")
                staged.mark_done(m.key)
                bar.update(m.nbytes)

        for m, x in prefetch(todo, read):
            faults.point("read")
            if m.dst_slot is not None:
                x = np.expand_dims(x, SCAN_AXIS)
            index = _index(len(writer.leaves[m.dst][0]), m.dst_slot, m.rows, keep_slot=True)
            index = tuple(slice(0, writer.leaves[m.dst][0][a]) if s == slice(None) else s for a, s in enumerate(index))
            in_flight.append((m, writer.write_async(m.dst, index, x, borrow=True)))
            retire(MAX_IN_FLIGHT)
        retire(0)

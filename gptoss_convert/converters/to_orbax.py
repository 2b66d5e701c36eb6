"""`gptoss-convert to-orbax`: MXFP4 or BF16 HF checkpoint -> MaxText Orbax checkpoint, streamed.

One pass, no intermediate files: each source block (one expert of one layer, or a row range of
a dense tensor) is read, dequantized if MXFP4, transformed by the mapping table and written
straight into its place in the target leaf. Peak memory is a few blocks, not the model.
"""

from __future__ import annotations

import collections
import os
import time
from concurrent.futures import Future
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_convert import faults
from gptoss_convert.buffers import RecyclingPool, keep_freed_memory
from gptoss_convert.converters.common import ITEM, STEP, maxtext_flags, plan_for, progress_bar, resolve_dtype, source_shapes, write_sidecars
from gptoss_convert.converters import distributed as dist
from gptoss_convert.converters.output import StagedOutput
from gptoss_convert.converters.plan import DEFAULT_BLOCK_BYTES, Plan, ReadBlock
from gptoss_convert.converters.provenance import source_hashes, write_record
from gptoss_convert.converters.remote_output import RemoteOutput, pending_marker as _marker
from gptoss_convert.io.location import is_url, resolve
from gptoss_convert.converters.stream import background, prefetch
from gptoss_convert.errors import InputError
from gptoss_convert.io.hf_checkpoint import HFCheckpoint, open_checkpoint
from gptoss_convert.mapping.layout import SCAN_AXIS
from gptoss_convert.mapping.transforms import apply

_NP = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
MAX_IN_FLIGHT = 4           # blocks whose writes may be pending at once (overlaps I/O with decoding)


def _read_block(ck: HFCheckpoint, block: ReadBlock, dtype: np.dtype, alloc=None) -> np.ndarray | list[np.ndarray]:
    """The block's source rows: one array, or the list of its interleaved parts (block.parts);
    `alloc` as for HFCheckpoint.read."""
    if block.parts:
        return ck.read_parts(block.source, block.parts, block.rows, dtype=dtype, alloc=alloc)
    return ck.read(block.source, block.rows, dtype=dtype, alloc=alloc)


def _write_block(writer, block: ReadBlock, x: np.ndarray | list[np.ndarray], dtype: np.dtype) -> list[Future]:
    """Write every emit of `block` (x from _read_block); returns the writes' futures."""
    pending = []
    for e in block.emits:
        if isinstance(x, list):                 # already split: e.transforms[0] took part p
            y = apply(e.transforms[1:], x[e.transforms[0].part])
        else:
            y = apply(e.transforms, x)
        if e.slot is not None:
            y = np.expand_dims(y, SCAN_AXIS)
        y = y.astype(dtype, copy=False)
        pending.append(writer.write_async(e.target, e.index, y, borrow=True))   # x is never modified
    return pending


RUNTIME_BYTES = 400 << 20   # the process before its first block: Python, numpy, TensorStore, the plan


def needs(plan: Plan, ck: HFCheckpoint) -> str:
    """One line: the disk OUT will take and an estimate of the peak memory, from the plan.

    Memory is bounded by blocks, not by the model: the blocks whose writes are in flight
    (MAX_IN_FLIGHT), read ahead (2) and being decoded (1), plus the recycled mappings
    RecyclingPool keeps (up to 8 more of the largest size), over the runtime itself."""
    largest = max(b.nbytes for b in plan.blocks)
    memory = RUNTIME_BYTES + (MAX_IN_FLIGHT + 3 + 8) * largest
    source = sum((ck.dir / f).stat().st_size for f in ck.files)
    return (f"needs: {plan.total_bytes / 1e9:.1f} GB of disk for OUT (source {source / 1e9:.1f} GB), "
            f"peak memory at most about {memory / 1e9:.1f} GB (largest block {largest / 1e6:.0f} MB)")


@dist.distributable
def to_orbax(src: str | os.PathLike, out: str | os.PathLike, *, scanned: bool, dtype: str = "bf16",
             dry_run: bool = False, workers: int | None = None, overwrite: bool = False, resume: bool = False,
             allow_nonfinite: bool = False, progress: bool = True, block_bytes: int = DEFAULT_BLOCK_BYTES, compression: str | None = None,
             strict_config: bool = False, like: str | os.PathLike | None = None, step: int | None = None,
             cluster=None, log=print) -> Path | Plan:
    """Convert `src` (MXFP4 or BF16 directory, or hub id) to a MaxText Orbax checkpoint at `out`.

    The result is `out/0/items` (load it with MaxText's `load_parameters_path=<out>/0/items`)
    plus `out/0/_CHECKPOINT_METADATA` recording `scan_layers`. The plan is checked before any
    tensor byte is read; `dry_run=True` prints it and returns it without writing anything.
    `out` may be a gs:// or s3:// URL: the same objects are written there through TensorStore,
    Orbax's commit marker last (docs/object-stores.md); with `distributed=True` too.
    `compression="zstd"` compresses chunks as Orbax does by default (smaller, ~2x slower to write).
    `strict_config=True` refuses config.json fields this tool does not know (by default they are
    accepted as inert, warned about and recorded in conversion.json).
    `src` may also be an Orbax checkpoint (this tool's, MaxText's params-only or training
    checkpoint; `step` picks one, `like` gives the config of one MaxText wrote): its params are
    relaid out bit-exact (converters/relayout.py), in one process.
    `distributed=True` runs this as one of several processes writing one checkpoint
    (jax.distributed; `coordinator_address`, `num_processes`, `process_id` unless JAX detects
    them; `distributed_timeout`, `heartbeat_timeout` in seconds; docs/multihost.md).
    """
    from gptoss_convert.io.orbax_source import is_orbax

    if is_orbax(src):
        if cluster is not None:
            raise InputError(f"{src}: --distributed converts HF sources; relayout of an Orbax checkpoint "
                             "runs in one process (drop --distributed)")
        from gptoss_convert.converters.relayout import relayout
        return relayout(src, out, scanned=scanned, dtype=dtype, like=like, step=step, dry_run=dry_run,
                        allow_nonfinite=allow_nonfinite,
                        overwrite=overwrite, resume=resume, progress=progress, block_bytes=block_bytes,
                        compression=compression, log=log)
    t0 = time.perf_counter()
    keep_freed_memory()
    np_dtype = _NP[resolve_dtype(dtype)]
    ck = open_checkpoint(src)
    ck.workers, ck.allow_nonfinite = workers, allow_nonfinite
    backend, cfg, plan = plan_for(ck, scanned=scanned, itemsize=np_dtype.itemsize, block_bytes=block_bytes,
                                  strict_config=strict_config)
    if dry_run:
        log(plan.describe(source_shapes(ck)) + "\n" + needs(plan, ck))
        return plan
    from gptoss_convert.io.orbax_writer import OrbaxWriter

    out = resolve(out)                      # a Path, or a Location for gs:// and s3://
    layout = "scanned" if scanned else "unscanned"
    fingerprint = {"command": "to-orbax", "layout": layout, "dtype": np_dtype.name, "block_bytes": block_bytes,
                   "compression": compression,
                   "source": {f: (ck.dir / f).stat().st_size for f in ck.files}}
    remote = is_url(out)
    dist.agree_on(cluster, fingerprint, ck.config_raw, out=str(out if remote else Path(out).absolute()),
                  overwrite=overwrite, resume=resume)
    output = RemoteOutput if remote else StagedOutput     # no rename on object stores: commit markers
    staged = output(out, fingerprint=fingerprint, overwrite=overwrite, resume=resume, source=ck.dir, log=log)
    meta = {"scan_layers": scanned, "model_type": backend.model_type, "converter": "gptoss-convert"}
    writer = OrbaxWriter(staged.path / STEP, {p: (s, np_dtype) for p, s in plan.targets.items()},
                         chunk_shapes=plan.chunk_shapes(), custom_metadata=meta, compression=compression)
    with dist.staging(cluster, staged, lambda s, first: _create(writer, s, first)):
        mine = dist.my_share(cluster, [b.nbytes for b in plan.blocks],
                             cluster and dist.shared_chunk_groups(plan.blocks, plan.chunk_shapes()))
        files = [f for f, m in zip(ck.files, dist.my_share(cluster, [1] * len(ck.files))) if m]
        sources = background(source_hashes, ck.dir, files, workers=1)   # overlaps the conversion
        try:
            _stream(ck, plan, writer, staged, np_dtype, progress, [b for b, m in zip(plan.blocks, mine) if m])
        finally:
            writer.close()
        chunk_hashes = {p.relative_to(staged.path).as_posix(): h for p, h in writer.chunk_hashes().items()}
        chunk_sizes = {p.relative_to(staged.path).as_posix(): n for p, n in writer.chunk_sizes().items()}
        merged = dist.merge_shares(cluster, staged, chunk_hashes, sources.result(), chunk_sizes)
        if merged is None:                      # another process of a distributed run: its share is on disk
            did = [b for b, m in zip(plan.blocks, mine) if m]
            return dist.finish(cluster, None, log, f"{len(did)} of {len(plan.blocks)} blocks "
                                                   f"({sum(b.nbytes for b in did) / 1e9:.3f} GB)")
        chunk_hashes, source_files = merged
        write_sidecars(ck, staged.path)    # the Orbax tree does not say which model it is: verify/generate read these
        writer.finalize(commit=not remote)     # object stores: Orbax's commit marker only after our record
        chunk_sizes |= {p.relative_to(staged.path).as_posix(): n for p, n in writer.chunk_sizes().items()}
        write_record(staged.path, command="to-orbax", source_dir=ck.dir, source_files=source_files,
                     options={"layout": layout, "dtype": np_dtype.name, "compression": compression},
                     extra={"leaves": {p: list(s) for p, s in plan.targets.items()}, "maxtext_item": f"{STEP}/{ITEM}",
                            "config_unknown_fields": list(cfg.unknown_fields)},
                     output_hashes=chunk_hashes, output_sizes=chunk_sizes, pending=_marker(writer, staged.path, remote))
        if remote:
            writer.commit()
        result = staged.commit()
    if cluster is not None:
        dist.finish(cluster, result)
    dt = time.perf_counter() - t0
    log(f"to-orbax: wrote {len(plan.targets)} {layout} leaves ({plan.total_bytes / 1e9:.2f} GB {np_dtype.name}) "
        f"to {result} in {dt:.1f} s ({plan.total_bytes / 1e9 / max(dt, 1e-9):.2f} GB/s).\n"
        f"MaxText flags: {maxtext_flags(result, scanned, cfg)}")
    return result


class _MemoryWriter:
    """OrbaxWriter's write interface over in-memory numpy arrays (for small models and verification)."""

    def __init__(self, leaves: dict[str, tuple[tuple[int, ...], np.dtype]]):
        self.arrays = {p: np.empty(shape, dtype) for p, (shape, dtype) in leaves.items()}

    def write_async(self, path: str, index: tuple[slice, ...], block: np.ndarray, *, borrow: bool = False) -> Future:
        """Copy `block` in; the returned future is already complete."""
        self.arrays[path][index] = block
        done: Future = Future()
        done.set_result(None)
        return done


def convert_in_memory(src: str | os.PathLike | HFCheckpoint, *, scanned: bool, dtype: str = "fp32"):
    """(config, {path: array}) — the same plan and transforms as `to_orbax`, kept in RAM."""
    ck = src if isinstance(src, HFCheckpoint) else open_checkpoint(src)
    np_dtype = _NP[resolve_dtype(dtype)]
    _, cfg, plan = plan_for(ck, scanned=scanned, itemsize=np_dtype.itemsize)
    writer = _MemoryWriter({p: (s, np_dtype) for p, s in plan.targets.items()})
    for block in plan.blocks:
        _write_block(writer, block, _read_block(ck, block, np_dtype), np_dtype)    # complete on return
    return cfg, writer.arrays


def _create(writer, staged: StagedOutput, first: bool) -> None:
    """Create (or reopen) the arrays; the first process of a run also removes what chunk writes
    an interrupted run left unfinished (no other process writes yet)."""
    writer.create()
    if first and staged.resumed:
        writer.remove_temporaries()


def _stream(ck: HFCheckpoint, plan: Plan, writer, staged: StagedOutput, dtype: np.dtype, progress: bool,
            blocks: list[ReadBlock] | None = None) -> None:
    """Write every block (of `blocks`, default all) not yet journaled, journaling each once its
    writes are on disk."""
    blocks = plan.blocks if blocks is None else blocks
    todo = [b for b in blocks if not staged.is_done(b.key)]
    pool = RecyclingPool()      # each block's memory comes back when TensorStore has let go of it
    with progress_bar(sum(b.nbytes for b in blocks), "to-orbax", progress) as bar:
        bar.update(sum(b.nbytes for b in blocks if staged.is_done(b.key)))
        in_flight: collections.deque = collections.deque()      # (block, its pending writes)

        def retire(n: int) -> None:
            """Wait for all but `n` blocks' writes to be on disk, journaling each one done."""
            while len(in_flight) > n:
                done, futures = in_flight.popleft()
                for f in futures:
                    f.result()
                faults.point("write")
                staged.mark_done(done.key)
                bar.update(done.nbytes)

        for block, x in prefetch(todo, lambda b: _read_block(ck, b, dtype, pool.empty)):
            faults.point("read")
            in_flight.append((block, _write_block(writer, block, x, dtype)))
            retire(MAX_IN_FLIGHT)
        retire(0)

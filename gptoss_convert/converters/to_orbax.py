"""`gptoss-convert to-orbax`: MXFP4 or BF16 HF checkpoint -> MaxText Orbax checkpoint, streamed.

One pass, no intermediate files: each source block (one expert of one layer, or a row range of
a dense tensor) is read, dequantized if MXFP4, transformed by the mapping table and written
straight into its place in the target leaf. Peak memory is a few blocks, not the model.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from gptoss_convert.converters import distributed as dist
from gptoss_convert.converters import job
from gptoss_convert.converters.common import plan_for, source_shapes
from gptoss_convert.converters.orbax_target import OrbaxTarget, maxtext_flags
from gptoss_convert.converters.plan import DEFAULT_BLOCK_BYTES, Plan, ReadBlock
from gptoss_convert.converters.sources import DType, HFSource, dtype_of, write_sidecars
from gptoss_convert.io.hf_checkpoint import HFCheckpoint, open_checkpoint
from gptoss_convert.mapping.layout import SCAN_AXIS
from gptoss_convert.mapping.transforms import apply


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


def needs(target: OrbaxTarget, ck: HFCheckpoint) -> str:
    """One line: the disk OUT will take and an estimate of the peak memory, from the plan (memory is
    bounded by blocks, not by the model: OrbaxTarget.memory)."""
    source = sum((ck.dir / f).stat().st_size for f in ck.files)
    total = sum(u.nbytes for u in target.units)
    return (f"needs: {total / 1e9:.1f} GB of disk for OUT (source {source / 1e9:.1f} GB), peak memory at most "
            f"about {target.memory.peak(target.parallel) / 1e9:.1f} GB (largest block "
            f"{target.largest_block / 1e6:.0f} MB)")


@dist.distributable
def to_orbax(src: str | os.PathLike, out: str | os.PathLike, *, scanned: bool, dtype: str | DType = "bf16",
             dry_run: bool = False, workers: int | None = None, overwrite: bool = False, resume: bool = False,
             allow_nonfinite: bool = False, progress: bool = True, block_bytes: int = DEFAULT_BLOCK_BYTES,
             compression: str | None = None,
             strict_config: bool = False, like: str | os.PathLike | None = None, step: int | None = None,
             item: str | None = None, check_space: bool = True,
             max_memory: str | int = job.DEFAULT_MAX_MEMORY, cluster=None, log=print) -> Path | Plan:
    """Convert `src` (MXFP4 or BF16 directory, or hub id) to a MaxText Orbax checkpoint at `out`.

    The result is `out/0/items` (load it with MaxText's `load_parameters_path=<out>/0/items`)
    plus `out/0/_CHECKPOINT_METADATA` recording `scan_layers`. The plan is checked before any
    tensor byte is read; `dry_run=True` prints it (with the disk and memory it needs) and returns
    it without writing anything. `out` may be a gs:// or s3:// URL: the same objects are written
    there through TensorStore, Orbax's commit marker last (docs/object-stores.md).
    `compression="zstd"` compresses chunks as Orbax does by default (smaller, ~2x slower to write).
    `strict_config=True` refuses config.json fields this tool does not know (by default they are
    accepted as inert, warned about and recorded in conversion.json).
    `src` may also be an Orbax checkpoint (this tool's, MaxText's params-only or training
    checkpoint, or a post-training one; `step` and `item` pick one, `like` gives the config of one
    MaxText wrote): its params are
    relaid out bit-exact (converters/relayout.py).
    `distributed=True` runs this as one of several processes writing one checkpoint
    (jax.distributed; `coordinator_address`, `num_processes`, `process_id` unless JAX detects
    them; `distributed_timeout`, `heartbeat_timeout` in seconds; docs/multihost.md).
    `resume=True` continues an interrupted run, only onto the same source bytes.
    `max_memory` (bytes or a size such as "1.5GB") is the ceiling its blocks in flight are fitted
    under (fewer writes in flight, or refused before any work if even one block cannot fit).
    """
    from gptoss_convert.io.orbax_source import is_orbax

    dt = dtype_of(dtype)
    if is_orbax(src):
        from gptoss_convert.converters.relayout import relayout_job
        source, target = relayout_job(src, scanned=scanned, dtype=dt, like=like, step=step, strict_config=strict_config,
                                      allow_nonfinite=allow_nonfinite, block_bytes=block_bytes, compression=compression,
                                      item=item, log=log)
    else:
        ck = open_checkpoint(src)
        ck.workers, ck.allow_nonfinite = workers, allow_nonfinite
        source, target = HFSource(ck), hf_target(ck, scanned=scanned, dt=dt, block_bytes=block_bytes,
                                                  compression=compression, strict_config=strict_config)
    if dry_run:
        job.fit_memory(target, job.memory_ceiling(max_memory), check_available=False)
        log(target.describe())
        return getattr(target.plan, "plan", None) or target.plan.blocks     # the Plan; a relayout's moves
    hasher = None
    if getattr(target.plan, "block_reads", None) and isinstance(cluster, dist.Solo) and not source.orbax.remote:
        hasher = target.plan.hasher         # a relayout of chunk files: each hashed from its own read
    return job.run(source, target, out, job.JobOptions(overwrite, resume, progress, check_space, max_memory),
                   cluster, log, hasher=hasher)


@dataclasses.dataclass
class HFBlocks:
    """The BlockPlan of an HF source: the checked Plan's read blocks, each read (dequantized,
    split into its interleaved parts) and written through its emits' transforms."""

    ck: HFCheckpoint
    plan: Plan
    dtype: np.dtype
    transient_blocks = 0        # reads decode into pooled buffers

    @property
    def blocks(self) -> list[ReadBlock]:
        return self.plan.blocks

    def read(self, block: ReadBlock, alloc):
        return _read_block(self.ck, block, self.dtype, alloc)

    def emit(self, writer, block: ReadBlock, x) -> list[Future]:
        return _write_block(writer, block, x, self.dtype)

    def writes(self, block: ReadBlock) -> list[tuple[str, tuple[slice, ...]]]:
        return [(e.target, e.index) for e in block.emits]


def hf_target(ck: HFCheckpoint, *, scanned: bool, dt: DType, block_bytes: int, compression: str | None,
              strict_config: bool) -> OrbaxTarget:
    """The checked plan of an HF source -> MaxText Orbax conversion, as the job's target."""
    backend, cfg, plan = plan_for(ck, scanned=scanned, itemsize=dt.itemsize, block_bytes=block_bytes,
                                  strict_config=strict_config)
    layout = backend.layout_for(cfg, scanned).name

    def sidecars(out) -> None:
        write_sidecars(out, {k: v for k, v in ck.config_raw.items() if k != "quantization_config"}, ck.sidecar_files())

    def summary(result, seconds: float) -> str:
        return (f"to-orbax: wrote {len(plan.targets)} {layout} leaves ({plan.total_bytes / 1e9:.2f} GB {dt.name}) "
                f"to {result} in {seconds:.1f} s ({plan.total_bytes / 1e9 / max(seconds, 1e-9):.2f} GB/s).\n"
                f"MaxText flags: {maxtext_flags(result, scanned, cfg)}")

    target = OrbaxTarget(HFBlocks(ck, plan, dt.np), plan.targets, plan.chunk_shapes(), dt.np,
                         {"scan_layers": scanned, "model_type": backend.model_type, "converter": "gptoss-convert"},
                         compression, {"layout": layout, "dtype": dt.name, "compression": compression},
                         {"config_unknown_fields": list(cfg.unknown_fields)}, sidecars, summary,
                         identity={"block_bytes": block_bytes})
    target.describe = lambda: plan.describe(source_shapes(ck)) + "\n" + needs(target, ck)
    return target


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
    np_dtype = dtype_of(dtype).np
    _, cfg, plan = plan_for(ck, scanned=scanned, itemsize=np_dtype.itemsize)
    writer = _MemoryWriter({p: (s, np_dtype) for p, s in plan.targets.items()})
    for block in plan.blocks:
        _write_block(writer, block, _read_block(ck, block, np_dtype), np_dtype)    # complete on return
    return cfg, writer.arrays

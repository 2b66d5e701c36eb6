"""`gptoss-convert dequantize`: published MXFP4 safetensors -> an HF BF16 (or FP32) checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_convert import faults
from gptoss_convert.buffers import BufferPool
from gptoss_convert.converters import distributed as dist
from gptoss_convert.converters import job
from gptoss_convert.converters.job import Memory
from gptoss_convert.converters.common import check_against_backend, parse_size
from gptoss_convert.converters.shards import SHARD_METADATA, ShardsTarget, write_index
from gptoss_convert.converters.sources import DType, HFSource, dtype_of, write_sidecars
from gptoss_convert.converters.stream import prefetch
from gptoss_convert.io.hf_checkpoint import HFCheckpoint, open_checkpoint
from gptoss_convert.io.safetensors import DTYPES, ShardWriter

FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}


@dataclasses.dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str                                  # safetensors dtype written
    shape: tuple[int, ...]
    rows_per_block: int | None                  # None = whole tensor at once

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """What the shard holds for it: (name, dtype, shape)."""
        return [(self.name, self.dtype, self.shape)]


def _out_tensors(ck: HFCheckpoint, dtype: str, block_bytes: int) -> list[OutTensor]:
    out = []
    for name, vt in sorted(ck.tensors.items(), key=lambda kv: (kv[1].sources[0].file.name, kv[1].sources[0].offset)):
        if vt.is_quantized or (dtype == "F32" and vt.dtype in FLOAT_DTYPES):
            dt = dtype
        else:
            dt = vt.dtype                       # copied bit for bit
        t = OutTensor(name, dt, vt.shape, None)
        if vt.shape and vt.shape[0] > 1:
            row = t.nbytes // vt.shape[0]
            rows = 1 if vt.is_mxfp4 else max(1, block_bytes // max(row, 1))
            if rows < vt.shape[0]:
                t = dataclasses.replace(t, rows_per_block=rows)
        out.append(t)
    return out


READ_AHEAD = 2     # blocks read ahead of the one being written (each held, with its pooled twin)


def _read(ck: HFCheckpoint, t: OutTensor, rows: slice | None, pool: BufferPool) -> np.ndarray:
    np_dtype = np.float32 if t.dtype == "F32" else ml_dtypes.bfloat16
    arr = ck.read(t.name, rows, dtype=np_dtype, alloc=pool.get)    # into a recycled buffer
    return arr if arr.dtype == DTYPES[t.dtype] else arr.astype(np_dtype)


def _block_bytes(t: OutTensor) -> int:
    """Bytes of the largest block of `t` read at once."""
    return t.nbytes if t.rows_per_block is None else t.nbytes // t.shape[0] * t.rows_per_block


def _row_slices(t: OutTensor):
    if t.rows_per_block is None:
        return [None]
    return [slice(r, min(r + t.rows_per_block, t.shape[0])) for r in range(0, t.shape[0], t.rows_per_block)]


def _write_shard(ck, path: Path, tensors: list[OutTensor], bar, ahead: int) -> str:
    """Write one output shard, streaming row blocks with `ahead` read ahead; returns its hash (files.HASH)."""
    w = ShardWriter(path, [(t.name, t.dtype, t.shape) for t in tensors], SHARD_METADATA)
    pool = BufferPool(keep=ahead + 2)           # the prefetched blocks + the one being written
    try:
        items = [(t, rows) for t in tensors for rows in _row_slices(t)]
        for (t, _), arr in prefetch(items, lambda it: _read(ck, *it, pool), depth=ahead):
            faults.point("read")
            w.append(t.name, arr)
            faults.point("write")
            bar.update(arr.nbytes)
            pool.put(arr)
        return w.close()
    except BaseException:
        w.abort()
        raise


@dist.distributable
def dequantize(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | DType = "bf16",
               max_shard_size: str | int = "5GB", workers: int | None = None, overwrite: bool = False,
               resume: bool = False, allow_nonfinite: bool = False, progress: bool = True, block_bytes: int = 64 << 20,
               strict_config: bool = False, dry_run: bool = False, check_space: bool = True,
               max_memory: str | int = job.DEFAULT_MAX_MEMORY,
               cluster=None, log=print) -> Path | ShardsTarget:
    """Convert an MXFP4 gpt-oss or FP8 Qwen3-MoE checkpoint (or a BF16 one) `src` to an HF checkpoint at `out`.

    Quantized matrices are dequantized (bit-exact) into HF orientation; every other tensor is
    copied bit for bit (or cast to float32 with dtype="fp32"). Memory stays bounded by a few
    blocks (one expert / `block_bytes`), whatever the model size. `out` is a directory (it
    appears atomically) or a gs:// / s3:// prefix (complete once its journal is gone);
    `resume=True` continues an interrupted run onto the same source bytes. `strict_config=True`
    refuses config.json fields this tool does not know (by default they are accepted as inert,
    warned about and recorded). `distributed=True` runs this as one of several processes, each
    writing its own shards (options as for to_orbax; docs/multihost.md). Returns the output
    path (the checked plan with dry_run=True).
    """
    dt = dtype_of(dtype)
    ck = open_checkpoint(src)
    ck.workers, ck.allow_nonfinite = workers, allow_nonfinite
    target = dequantize_target(ck, dt, parse_size(max_shard_size), block_bytes, strict_config)
    if dry_run:
        log(describe(target))
        return target
    return job.run(HFSource(ck), target, out, job.JobOptions(overwrite, resume, progress, check_space, max_memory),
                   cluster, log)


def dequantize_target(ck: HFCheckpoint, dt: DType, max_shard: int, block_bytes: int,
                      strict_config: bool) -> ShardsTarget:
    """The checked plan: every tensor of `ck` (MXFP4 dequantized to `dt`, the rest copied) in shards."""
    cfg = check_against_backend(ck, strict_config=strict_config)
    tensors = _out_tensors(ck, dt.st, block_bytes)
    quantized = sum(ck.tensors[t.name].is_quantized for t in tensors)

    def summary(result, seconds: float) -> str:
        total = sum(t.nbytes for t in tensors)
        return (f"dequantize: wrote {total / 1e9:.2f} GB in {len(target.names)} shard(s) to {result} "
                f"in {seconds:.1f} s ({total / 1e9 / max(seconds, 1e-9):.2f} GB/s); {quantized} MXFP4/FP8 tensors "
                f"dequantized to {dt.st}, the rest "
                f"copied; load it with transformers.AutoModelForCausalLM.from_pretrained('{result}').")

    def metadata(out, names, shards) -> None:
        conf = {k: v for k, v in ck.config_raw.items() if k != "quantization_config"} | {"dtype": dt.name}
        conf |= {"torch_dtype": dt.name} if "torch_dtype" in ck.config_raw else {}
        write_sidecars(out, conf, ck.sidecar_files())
        write_index(out, names, shards)

    target = ShardsTarget("dequantize", tensors, max_shard,
                          lambda path, shard, bar, ahead: (_write_shard(ck, path, shard, bar, ahead), {}),
                          metadata, {"dtype": dt.st, "max_shard_size": max_shard}, summary,
                          extra={"config_unknown_fields": list(cfg.unknown_fields)},
                          memory=Memory(max((_block_bytes(t) for t in tensors), default=0), READ_AHEAD, per=2, fixed=3))
    return target


def describe(target: ShardsTarget) -> str:
    """The plan, one line per shard: its tensors and bytes."""
    lines = [f"{name}: {len(s)} tensors, {sum(t.nbytes for t in s) / 1e9:.3f} GB ({', '.join(t.name for t in s[:3])}"
             f"{', ...' if len(s) > 3 else ''})" for name, s in zip(target.names, target.shards)]
    total = sum(u.nbytes for u in target.units)
    return "\n".join(lines + [f"{len(target.tensors)} tensors in {len(target.names)} shard(s), "
                              f"{total / 1e9:.2f} GB to write"])

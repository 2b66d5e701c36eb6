"""`gptoss-convert dequantize`: published MXFP4 safetensors -> an HF BF16 (or FP32) checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_convert import faults
from gptoss_convert.buffers import BufferPool, keep_freed_memory
from gptoss_convert.converters import distributed as dist
from gptoss_convert.converters.common import check_against_backend, parse_size, progress_bar, resolve_dtype, write_sidecars
from gptoss_convert.converters.output import StagedOutput
from gptoss_convert.converters.provenance import source_hashes, write_record
from gptoss_convert.converters.stream import background, prefetch
from gptoss_convert.io.files import temp_path
from gptoss_convert.io.hf_checkpoint import INDEX, HFCheckpoint, open_checkpoint
from gptoss_convert.io.safetensors import DTYPES, ShardWriter, build_header

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


def _shards(tensors: list[OutTensor], max_shard: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _read(ck: HFCheckpoint, t: OutTensor, rows: slice | None, pool: BufferPool) -> np.ndarray:
    np_dtype = np.float32 if t.dtype == "F32" else ml_dtypes.bfloat16
    arr = ck.read(t.name, rows, dtype=np_dtype, alloc=pool.get)    # into a recycled buffer
    return arr if arr.dtype == DTYPES[t.dtype] else arr.astype(np_dtype)


def _row_slices(t: OutTensor):
    if t.rows_per_block is None:
        return [None]
    return [slice(r, min(r + t.rows_per_block, t.shape[0])) for r in range(0, t.shape[0], t.rows_per_block)]


SHARD_METADATA = {"format": "pt"}


def _shard_size(tensors: list[OutTensor]) -> int:
    """Bytes of a finished shard: length prefix + header + data."""
    prefix, _ = build_header([(t.name, t.dtype, t.shape) for t in tensors], SHARD_METADATA)
    return len(prefix) + sum(t.nbytes for t in tensors)


def _write_shard(ck, path: Path, tensors: list[OutTensor], bar) -> str:
    """Write one output shard, streaming row blocks; returns its hash (files.HASH)."""
    w = ShardWriter(path, [(t.name, t.dtype, t.shape) for t in tensors], SHARD_METADATA)
    pool = BufferPool(keep=4)                   # the prefetched blocks + the one being written
    try:
        items = [(t, rows) for t in tensors for rows in _row_slices(t)]
        for (t, _), arr in prefetch(items, lambda it: _read(ck, *it, pool)):
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
def dequantize(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bf16",
               max_shard_size: str | int = "5GB", workers: int | None = None, overwrite: bool = False,
               resume: bool = False, allow_nonfinite: bool = False, progress: bool = True, block_bytes: int = 64 << 20,
               strict_config: bool = False, cluster=None, log=print) -> Path:
    """Convert an MXFP4 gpt-oss or FP8 Qwen3-MoE checkpoint (or a BF16 one) `src` to an HF checkpoint at `out`.

    Quantized matrices are dequantized (bit-exact) into HF orientation; every other tensor is
    copied bit for bit (or cast to float32 with dtype="fp32"). Memory stays bounded by a few
    blocks (one expert / `block_bytes`), whatever the model size. Output appears atomically;
    `resume=True` continues an interrupted run. `strict_config=True` refuses config.json fields
    this tool does not know (by default they are accepted as inert, warned about and recorded).
    `distributed=True` runs this as one of several processes, each writing its own shards
    (options as for to_orbax; docs/multihost.md). Returns the output path.
    """
    t0 = time.perf_counter()
    keep_freed_memory()
    st_dtype = {"bfloat16": "BF16", "float32": "F32"}[resolve_dtype(dtype)]
    ck = open_checkpoint(src)
    ck.workers, ck.allow_nonfinite = workers, allow_nonfinite
    cfg = check_against_backend(ck, strict_config=strict_config)
    tensors = _out_tensors(ck, st_dtype, block_bytes)
    shards = _shards(tensors, parse_size(max_shard_size))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    fingerprint = {"command": "dequantize", "dtype": st_dtype, "shards": [[t.name for t in s] for s in shards],
                   "source": {f: (ck.dir / f).stat().st_size for f in ck.files}}
    total = sum(t.nbytes for t in tensors)
    dist.agree_on(cluster, fingerprint, ck.config_raw, out=str(Path(out).absolute()), overwrite=overwrite, resume=resume,
                  max_shard_size=parse_size(max_shard_size))
    staged = StagedOutput(out, fingerprint=fingerprint, overwrite=overwrite, resume=resume, source=ck.dir, log=log)
    mine = dist.my_share(cluster, [sum(t.nbytes for t in s) for s in shards])
    with dist.staging(cluster, staged, lambda s, first: None):
        files = [f for f, m in zip(ck.files, dist.my_share(cluster, [1] * len(ck.files))) if m]
        sources = background(source_hashes, ck.dir, files, workers=1)   # overlaps the conversion
        hashes = {}
        with progress_bar(sum(t.nbytes for s, m in zip(shards, mine) if m for t in s), "dequantize", progress) as bar:
            for fname, shard in (fs for fs, m in zip(zip(names, shards), mine) if m):
                done = staged.path / fname      # journaled, and still there whole (not lost or cut short)
                if staged.is_done(fname) and done.is_file() and done.stat().st_size == _shard_size(shard):
                    bar.update(sum(t.nbytes for t in shard))
                    continue
                tmp = temp_path(staged.path / fname)
                hashes[fname] = _write_shard(ck, tmp, shard, bar)
                os.replace(tmp, staged.path / fname)
                staged.mark_done(fname)
        merged = dist.merge_shares(cluster, staged, hashes, sources.result())
        if merged is None:                      # another process of a distributed run: its shards are on disk
            return dist.finish(cluster, None, log, f"{sum(mine)} of {n} shards")
        _write_metadata(ck, staged.path, names, shards, st_dtype)
        write_record(staged.path, command="dequantize", source_dir=ck.dir, source_files=merged[1],
                     options={"dtype": st_dtype, "max_shard_size": parse_size(max_shard_size)},
                     extra={"config_unknown_fields": list(cfg.unknown_fields)}, output_hashes=merged[0])
        result = staged.commit()
    if cluster is not None:
        dist.finish(cluster, result)
    dt = time.perf_counter() - t0
    log(f"dequantize: wrote {total / 1e9:.2f} GB in {len(names)} shard(s) to {result} in {dt:.1f} s "
        f"({total / 1e9 / max(dt, 1e-9):.2f} GB/s); {sum(ck.tensors[t.name].is_quantized for t in tensors)} MXFP4/FP8 tensors "
        f"dequantized to {st_dtype}, the rest copied; load it with transformers.AutoModelForCausalLM.from_pretrained('{result}').")
    return result


def _write_metadata(ck: HFCheckpoint, out: Path, names: list[str], shards, st_dtype: str) -> None:
    name = "float32" if st_dtype == "F32" else "bfloat16"
    write_sidecars(ck, out, dtype=name, **({"torch_dtype": name} if "torch_dtype" in ck.config_raw else {}))
    if len(names) > 1:
        weight_map = {t.name: f for f, s in zip(names, shards) for t in s}
        total = sum(t.nbytes for s in shards for t in s)
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

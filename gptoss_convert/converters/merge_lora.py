"""`gptoss-convert merge-lora`: a base checkpoint (HF or Orbax) + a LoRA adapter (PEFT or MaxText) -> one HF checkpoint.

Every tensor the adapter changes becomes W + scaling * (B @ A), computed in fp32 (the expert
stacks one expert at a time; converters/lora.py lays the change out as PEFT does) and written
BF16 (or FP32), or with `mxfp4=True` the expert stacks requantized into the published MXFP4
layout. Tensors the adapter does not touch are copied bit for bit; MXFP4 experts are decoded as
dequantize decodes them, or with `mxfp4=True` keep their stored bytes. The source is the base
and the adapter together (resume compares both), run by the one protocol (converters/job.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from gptoss_convert import faults
from gptoss_convert.buffers import BufferPool
from gptoss_convert.converters import distributed as dist
from gptoss_convert.converters import job
from gptoss_convert.converters.job import Memory
from gptoss_convert.converters.common import check_against_backend, parse_size
from gptoss_convert.converters.lora import (Adapter, LoraSource, MaxTextAdapter, adapter_summary, open_adapter,
                                            open_maxtext_adapter)
from gptoss_convert.converters.requantize import DEFAULT_SCALE_RULE, MXFP4_SUFFIXES, _add, hf_metadata, report_hook
from gptoss_convert.converters.shards import SHARD_METADATA, ShardsTarget
from gptoss_convert.converters.sources import DType, HFSource, dtype_of
from gptoss_convert.converters.stream import prefetch
from gptoss_convert.errors import InputError, OutputError
from gptoss_convert.finite import all_finite
from gptoss_convert.io.hf_checkpoint import BLOCKS, SCALES, HFCheckpoint, open_checkpoint
from gptoss_convert.io.location import is_url
from gptoss_convert.io.safetensors import DTYPES, ShardWriter, read_tensor
from gptoss_convert.mxfp4.codec import SCALE_RULES, quantize_columns

FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
# fp32 bytes of merged weights quantized at a time (whole columns: MXFP4 groups run down `in`). One
# 20b gate_up expert [2880, 5760] took 4.5 s whole, 2.4 s in 1440-column and 1.6 s in 720-column
# pieces on the 2-core VM (the float path's temporaries stay in cache), and far less memory.
QUANTIZE_BYTES = 8 << 20
QUANTIZED = ("keep", "quantize")     # written as MXFP4 blocks + scales


@dataclasses.dataclass(frozen=True)
class MergeTensor:
    """One output tensor and how it is made: "copy" (stored bytes), "decode" (MXFP4 -> float),
    "merge" (W + delta, float), "keep" (MXFP4 bytes kept) or "quantize" (W + delta -> MXFP4)."""

    name: str
    shape: tuple[int, ...]              # HF orientation ([E, in, out] for experts)
    dtype: str                          # safetensors dtype of a float output
    how: str
    rows_per_block: int | None

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """What the shard holds: (name, dtype, shape); MXFP4 as published blocks [E, out, in/32, 16] + scales."""
        if self.how not in QUANTIZED:
            return [(self.name, self.dtype, self.shape)]
        e, k, n = self.shape
        return [(self.name + BLOCKS, "U8", (e, n, k // 32, 16)), (self.name + SCALES, "U8", (e, n, k // 32))]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * DTYPES[d].itemsize for _, d, s in self.entries)

    @property
    def fp32_block_bytes(self) -> int:
        """Bytes of its largest block in fp32 (how a merged block is computed)."""
        rows = self.shape[0] if self.row_blocks() == [None] or not self.shape else self.rows_per_block
        return 4 * rows * math.prod(self.shape[1:])

    def row_blocks(self) -> list[slice | None]:
        if self.rows_per_block is None or self.rows_per_block >= self.shape[0]:
            return [None]
        n = self.rows_per_block
        return [slice(r, min(r + n, self.shape[0])) for r in range(0, self.shape[0], n)]


def merge_plan(ck: HFCheckpoint, adapter: Adapter, dt: DType, mxfp4: bool, block_bytes: int) -> list[MergeTensor]:
    """Every tensor of the base, in its stored order, and how each is written."""
    out = []
    for name, vt in sorted(ck.tensors.items(), key=lambda kv: (kv[1].sources[0].file.name, kv[1].sources[0].offset)):
        changed = name in adapter.pairs
        if mxfp4 and name.endswith(MXFP4_SUFFIXES):
            how = "keep" if vt.is_mxfp4 and not changed else "quantize"
        else:
            how = "merge" if changed else "decode" if vt.is_mxfp4 else "copy"
        keep_dtype = how == "copy" and not (dt.st == "F32" and vt.dtype in FLOAT_DTYPES)
        rows = None
        if len(vt.shape) == 3 or vt.is_mxfp4:
            rows = 1                                    # one expert at a time
        elif vt.shape and vt.shape[0] > 1:
            rows = max(1, block_bytes // max(1, math.prod(vt.shape[1:]) * 4))
        out.append(MergeTensor(name, vt.shape, vt.dtype if keep_dtype else dt.st, how, rows))
    return out


def _quantize(w: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """codec.quantize_columns([w], rule) of fp32 [E, in, out], a few columns at a time: blocks
    [E, out, in/32, 16], scales [E, out, in/32] and the summed error report."""
    step = max(1, QUANTIZE_BYTES // (4 * math.prod(w.shape[:-1])))
    parts = [quantize_columns([w[..., c:c + step]], rule) for c in range(0, w.shape[-1], step)]
    report: dict = {}
    for _, _, rep in parts:
        _add(report, rep)
    return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1), report


def _scale_add(d: np.ndarray, scaling: np.float32, w: np.ndarray, out: np.ndarray, tile_bytes: int = 256 << 10) -> None:
    """out = w + d * scaling (fp32 arithmetic, in that order, as PEFT merges; `d` is overwritten),
    a few rows at a time so each tile is scaled, added and cast while in cache."""
    d2, w2, o2 = (x.reshape(-1, x.shape[-1]) for x in (d, w, out))
    step = max(1, tile_bytes // (4 * d2.shape[1]))
    for i in range(0, d2.shape[0], step):
        t = d2[i:i + step]
        t *= scaling
        t += w2[i:i + step]
        if o2 is not d2:
            o2[i:i + step] = t


class _Writer:
    """Reads, merges and requantizes one block at a time for the shards of one plan."""

    def __init__(self, ck: HFCheckpoint, adapter: Adapter, rule: str, allow_nonfinite: bool, workers: int):
        self.ck, self.adapter, self.rule, self.allow_nonfinite = ck, adapter, rule, allow_nonfinite
        self.workers = workers

    def load(self, t: MergeTensor, rows: slice | None, pool: BufferPool) -> tuple:
        """The block's arrays: (data,) for a float tensor, (blocks, scales, report) for MXFP4."""
        vt = self.ck.tensors[t.name]
        if t.how == "keep":
            return read_tensor(vt.blocks, rows), read_tensor(vt.scales, rows), {}
        if t.how in ("copy", "decode"):
            np_dtype = DTYPES[t.dtype]
            arr = self.ck.read(t.name, rows, dtype=np_dtype, alloc=pool.get)
            return (arr if arr.dtype == np_dtype else arr.astype(np_dtype),)
        out_dtype = np.dtype(np.float32 if t.how == "quantize" else DTYPES[t.dtype])
        w = self.merged(t, rows, pool, out_dtype)
        if t.how == "quantize":
            got = _quantize(w, self.rule)
            pool.put(w)
            return got
        return (w,)

    def merged(self, t: MergeTensor, rows: slice | None, pool: BufferPool, out_dtype: np.dtype) -> np.ndarray:
        """W + scaling * (B @ A) for rows `rows` of `t` (W alone where the adapter does not change it),
        computed in fp32 and returned as `out_dtype` (from `pool`).

        B @ A goes to a pooled fp32 buffer in one matmul (the product PEFT's merge computes); then
        tiles of it are scaled, added to W and cast while in cache: one gate_up expert of 20b took
        390 ms as separate whole-array passes and 220 ms so (2-core VM, the same bits)."""
        w = self.ck.read(t.name, rows, dtype=np.float32, alloc=pool.get)   # pooled: no fresh pages per expert
        pair = self.adapter.pairs.get(t.name)
        if pair is None:
            merged = w.astype(out_dtype, copy=False)
        else:
            d = pair.product(rows, t.shape, out=pool.get(w.shape, np.float32))
            merged = d if out_dtype == np.float32 else pool.get(w.shape, out_dtype)
            _scale_add(d, np.float32(pair.product_scale), w, merged)    # MaxText's product is already scaled
            if merged is not d:
                pool.put(d)
        if merged is not w:
            pool.put(w)
        if not all_finite(merged) and (t.how == "quantize" or not self.allow_nonfinite):
            r = "" if rows is None else f" rows {rows.start}:{rows.stop}"
            raise InputError(f"{t.name}{r}: the merged weights hold NaN or inf (is the adapter "
                             f"{self.adapter.dir} broken?); " + ("MXFP4 cannot encode them" if t.how == "quantize"
                                                               else "pass --allow-nonfinite to write them anyway"))
        return merged

    def shard(self, path: Path, tensors: list[MergeTensor], bar, workers: int) -> tuple[str, dict]:
        """Write one shard, a block at a time on `workers` threads; returns (its hash, requantization reports)."""
        w = ShardWriter(path, [e for t in tensors for e in t.entries], SHARD_METADATA)
        pool, reports, pending = BufferPool(keep=workers + 3), {}, []
        items = [(t, rows) for t in tensors for rows in t.row_blocks()]
        blocks = prefetch(items, lambda it: self.load(*it, pool), depth=workers + 1, workers=workers)
        try:
            for i, ((t, _), got) in enumerate(blocks):
                faults.point("read")
                w.append(t.name + (BLOCKS if t.how in QUANTIZED else ""), got[0])
                if t.how in QUANTIZED:
                    pending.append(got[1])
                    if t.how == "quantize":
                        _add(reports.setdefault(t.name, {}), got[2])
                    if i + 1 == len(items) or items[i + 1][0] is not t:     # its last block: the scales
                        w.append(t.name + SCALES, np.concatenate(pending))
                        pending = []
                faults.point("write")
                bar.update(sum(g.nbytes for g in got[:2] if isinstance(g, np.ndarray)))
                if t.how in ("copy", "decode", "merge"):
                    pool.put(got[0])
            return w.close(), reports
        except BaseException:
            w.abort()
            raise


@dist.distributable
def merge_lora(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *, mxfp4: bool = False,
               scale_rule: str = DEFAULT_SCALE_RULE, scale: float = 1.0, dtype: str | DType = "bf16",
               max_shard_size: str | int = "5GB", workers: int | None = None, overwrite: bool = False,
               resume: bool = False, allow_nonfinite: bool = False, progress: bool = True,
               block_bytes: int = 64 << 20, strict_config: bool = False, dry_run: bool = False,
               lora_alpha: float | None = None, lora_rank: int | None = None, like=None,
               step: int | None = None, item: str | None = None, to_orbax: bool = False, scanned: bool | None = None,
               compression: str | None = None, check_space: bool = True,
               max_memory: str | int = job.DEFAULT_MAX_MEMORY, cluster=None, log=print):
    """Merge the PEFT LoRA `adapter` (a directory with adapter_config.json and
    adapter_model.safetensors, or a hub id) into the HF checkpoint `base` (MXFP4 or BF16; a
    directory or hub id) and write the result to `out` (a directory, gs:// or s3://).

    Changed tensors are W + scale * scaling * (B @ A) in fp32, written as `dtype`; `mxfp4=True`
    (gpt-oss) writes the expert stacks in the published MXFP4 layout with `scale_rule` (as
    to_hf), keeping the stored bytes of those the adapter does not change; the per-tensor error
    report is logged and recorded. `scale` multiplies the adapter's scaling. Adapters merge-lora
    does not implement (DoRA, LoRA biases, modules_to_save, rank/alpha patterns, ...) and pairs
    that match no base tensor or disagree with its shape are refused. Options as for dequantize;
    returns OUT (the plan with dry_run=True).

    `adapter` may also be a MaxText / Tunix LoRA checkpoint (a run root or step; qwix's
    `*_lora_a/_lora_b` leaves): it records no rank or alpha, so `lora_rank` and `lora_alpha` (the
    run's lora.lora_rank, lora.lora_alpha) are required; each MaxText weight W changes as in
    MaxText's forward, W + alpha/rank * scale * reshape(A @ B), mapped to HF by to-hf's table.
    `base` may also be an Orbax checkpoint (the params the fine-tune started from; `like` gives
    its config where MaxText wrote it), exported as to-hf exports it: a MaxText adapter's weights
    merged in MaxText's layout as each is read, a PEFT adapter's (HF names) added to each HF
    block as it is made.

    `to_orbax=True` writes the merged model as a MaxText Orbax checkpoint instead (OUT/0/items,
    `scanned` True or False and `compression` as to_orbax's; BF16 or FP32, so not with `mxfp4`)
    through to-orbax's own target: every tensor the adapter changes is merged in fp32 as it is
    read, then mapped as to_orbax maps it. From an Orbax BASE a MaxText adapter merges in
    MaxText's layout (then relaid out as to_orbax relays out), a PEFT one into the HF tensors
    to_hf makes of the base (then mapped back as to_orbax maps them).

    `step` and `item` (as to_hf's) choose within the ADAPTER when it is an Orbax checkpoint (a
    LoRA run root has steps; the base it started from is params-only: give a base step directory
    to pick the base's), else within an Orbax BASE; with neither Orbax they are refused."""
    if scale_rule not in SCALE_RULES:
        raise InputError(f"--scale-rule {scale_rule!r} is not one of {', '.join(SCALE_RULES)}")
    if not math.isfinite(scale):
        raise InputError(f"--scale {scale!r} must be a finite number")
    dt = dtype_of(dtype)
    job_opts = job.JobOptions(overwrite, resume, progress, check_space, max_memory)
    from gptoss_convert.io.orbax_source import is_orbax
    _check_orbax_out(to_orbax, scanned, compression, mxfp4)
    pick = _pick(base, adapter, step, item)
    if is_orbax(base):
        return _merge_into_orbax(base, adapter, out, pick=pick, like=like, orbax_out=(to_orbax, scanned, compression),
                                 mxfp4=mxfp4, rule=scale_rule, scale=scale, dt=dt, alpha=lora_alpha, rank=lora_rank,
                                 max_shard=parse_size(max_shard_size),
                                 block_bytes=block_bytes, strict_config=strict_config, allow_nonfinite=allow_nonfinite,
                                 workers=workers, dry_run=dry_run, job_opts=job_opts, cluster=cluster, log=log)
    ck = open_checkpoint(base)
    ck.workers, ck.allow_nonfinite = workers, allow_nonfinite
    from gptoss_convert.backends import get_backend
    lora = _open_any_adapter(adapter, {n: t.shape for n, t in ck.tensors.items()},
                             lambda: (get_backend(ck.config_raw["model_type"]),
                                      check_against_backend(ck, strict_config=strict_config)),
                             scale, lora_alpha, lora_rank, log, pick)
    _refuse_out_in_adapter(out, lora)
    if to_orbax:
        from gptoss_convert.converters.lora import merged_orbax_target
        target = merged_orbax_target(ck, lora, scanned=scanned, dt=dt, block_bytes=block_bytes, compression=compression,
                                     strict_config=strict_config, scale=scale)
        return _run_orbax(LoraSource(HFSource(ck), lora), target, out, lora, dry_run, job_opts, cluster, log)
    ck.workers = 1      # merge_target's blocks are the parallelism: each decodes on one thread
    target = merge_target(ck, lora, dt=dt, mxfp4=mxfp4, rule=scale_rule, scale=scale, block_bytes=block_bytes,
                          max_shard=parse_size(max_shard_size), strict_config=strict_config,
                          allow_nonfinite=allow_nonfinite, workers=workers)
    log(adapter_summary(lora))
    if dry_run:
        log(describe(target))
        return target
    return job.run(LoraSource(HFSource(ck), lora), target, out, job_opts, cluster, log)


def _check_orbax_out(to_orbax: bool, scanned: bool | None, compression: str | None, mxfp4: bool) -> None:
    """--to-orbax takes --scanned or --unscanned (and --zstd); those need it; --mxfp4 is HF's."""
    if to_orbax:
        if mxfp4:
            raise InputError("--mxfp4 with --to-orbax: an Orbax checkpoint holds BF16 or FP32 weights (MaxText "
                             "reads no MXFP4); drop --mxfp4, or merge to HF without --to-orbax")
        if scanned is None:
            raise InputError("--to-orbax: choose the layout, --scanned (training) or --unscanned (decoding)")
    elif scanned is not None or compression is not None:
        flag = "--zstd" if compression is not None else "--scanned" if scanned else "--unscanned"
        raise InputError(f"{flag}: an Orbax layout option; merge-lora writes HF unless --to-orbax is given")


def _run_orbax(source, target, out, lora, dry_run: bool, job_opts, cluster, log):
    """The merge into to-orbax's target: its plan printed on a dry run, else the job run."""
    log(adapter_summary(lora))
    if dry_run:
        job.fit_memory(target, job.memory_ceiling(job_opts.max_memory), check_available=False)
        log(target.describe())
        return target
    return job.run(source, target, out, job_opts, cluster, log)


def _pick(base, adapter, step: int | None, item: str | None) -> dict:
    """{"base": {step, item}, "adapter": {step, item}}: --step/--item go to the ADAPTER when it is
    an Orbax checkpoint (a LoRA run root holds steps), else to an Orbax BASE; refused with neither."""
    from gptoss_convert.io.orbax_source import is_orbax
    chosen, none = {"step": step, "item": item}, {"step": None, "item": None}
    if is_orbax(adapter):
        return {"base": none, "adapter": chosen}
    if is_orbax(base):
        return {"base": chosen, "adapter": none}
    if step is not None or item is not None:
        flag = "--step" if step is not None else "--item"
        raise InputError(f"{flag}: neither BASE {base} nor ADAPTER {adapter} is an Orbax checkpoint; {flag} chooses "
                         "within an Orbax one (drop it)")
    return {"base": none, "adapter": none}


def _merge_into_orbax(base, adapter, out, *, pick, orbax_out, like, mxfp4, rule, scale, dt, alpha, rank, max_shard,
                      block_bytes, strict_config, allow_nonfinite, workers, dry_run, job_opts, cluster, log):
    """merge-lora with an Orbax BASE: to-hf's export of the merged model (a MaxText adapter merged
    in MaxText's layout as leaves are read, a PEFT one in HF names as HF blocks are made)."""
    from gptoss_convert.converters.lora import hf_tensor_shapes, merged_export_target
    from gptoss_convert.converters.sources import OrbaxSrc, open_source
    source = OrbaxSrc(open_source(base, **pick["base"], log=log), like, strict_config=strict_config)
    lora = _open_any_adapter(adapter, hf_tensor_shapes(source), lambda: (source.backend, source.cfg), scale, alpha,
                             rank, log, pick)
    if isinstance(lora, MaxTextAdapter) and lora.source.scanned != source.orbax.scanned:
        lay = ("scanned", "unscanned")
        raise InputError(f"{adapter}: a {lay[not lora.source.scanned]} adapter, but the base {base} is "
                         f"{lay[not source.orbax.scanned]}; relayout the base with to-orbax "
                         f"--{lay[not lora.source.scanned]} first")
    if orbax_out[0]:
        return _relayout_merged(source, lora, out, orbax_out, dt=dt, block_bytes=block_bytes,
                                allow_nonfinite=allow_nonfinite, scale=scale, dry_run=dry_run, job_opts=job_opts,
                                cluster=cluster, log=log)
    log(adapter_summary(lora))
    target = merged_export_target(source, lora, mxfp4=mxfp4, dt=dt, max_shard=max_shard, block_bytes=block_bytes,
                                  rule=rule, allow_nonfinite=allow_nonfinite, workers=workers, like=like, scale=scale)
    if dry_run:
        log("\n".join(f"{t.name} {list(t.shape)}: merge" for t in target.tensors if t.name in lora.pairs))
        return target
    _refuse_out_in_adapter(out, lora)
    return job.run(LoraSource(source, lora), target, out, job_opts, cluster, log)


def _relayout_merged(source, lora, out, orbax_out, *, dt, block_bytes, allow_nonfinite, scale, dry_run, job_opts,
                     cluster, log):
    """--to-orbax from an Orbax BASE: a MaxText adapter merged into each leaf as read, relaid out
    as to-orbax relays out; a PEFT adapter (HF names) merged into the HF tensors to-hf makes of
    the base, mapped back as to-orbax maps an HF checkpoint."""
    from gptoss_convert.converters.lora import OrbaxAsHF, merged_orbax_target, merged_relayout_target
    _, scanned, compression = orbax_out
    if isinstance(lora, MaxTextAdapter):
        target = merged_relayout_target(source, lora, scanned=scanned, dt=dt, block_bytes=block_bytes,
                                        compression=compression, allow_nonfinite=allow_nonfinite, scale=scale)
    else:
        target = merged_orbax_target(OrbaxAsHF(source, allow_nonfinite), lora, scanned=scanned, dt=dt,
                                     block_bytes=block_bytes, compression=compression, strict_config=False,
                                     scale=scale)
    _refuse_out_in_adapter(out, lora)
    return _run_orbax(LoraSource(source, lora), target, out, lora, dry_run, job_opts, cluster, log)


def _open_any_adapter(adapter, shapes: dict[str, tuple[int, ...]], model, scale: float, alpha, rank, log,
                      pick: dict) -> Adapter:
    """A PEFT adapter directory, or a MaxText LoRA checkpoint (with --lora-alpha/--lora-rank),
    matched to the base's HF tensors `shapes` ({name: shape}); `model()` gives the base's
    (backend, config), which a MaxText adapter is matched against."""
    from gptoss_convert.io.orbax_source import is_orbax
    if not is_orbax(adapter):
        if alpha is not None or rank is not None:
            raise InputError(f"{adapter}: --lora-alpha/--lora-rank are for MaxText LoRA checkpoints; a PEFT "
                             "adapter's adapter_config.json records lora_alpha and r")
        return open_adapter(adapter, shapes, scale)
    backend, cfg = model()
    lora = open_maxtext_adapter(adapter, backend, cfg, set(shapes), alpha=alpha, rank=rank, scale=scale,
                                **pick["adapter"])
    _announce(lora, log)
    return lora


def _announce(lora, log) -> None:
    """What was found: the MaxText adapter's layout, and that it has no expert adapters if so."""
    log(f"{lora.source.step_dir}: {lora.source.layout.describe()}")
    if note := lora.experts_note():
        log(note)


def _refuse_out_in_adapter(out, lora: Adapter) -> None:
    """OUT must neither lie in the adapter directory nor hold it (job.run checks the base)."""
    if is_url(str(out)):
        return
    o, a = Path(out).resolve(), lora.dir.resolve()
    if o == a or a in o.parents or o in a.parents:
        raise OutputError(f"{out}: is, holds or lies inside the adapter directory {lora.dir}; choose another OUT")


def merge_target(ck: HFCheckpoint, lora: Adapter, *, dt: DType, mxfp4: bool, rule: str, scale: float, max_shard: int,
                 block_bytes: int, strict_config: bool, allow_nonfinite: bool,
                 workers: int | None = None) -> ShardsTarget:
    """The checked plan: every base tensor, merged where the adapter changes it, in shards."""
    cfg = check_against_backend(ck, strict_config=strict_config)
    if mxfp4 and ck.config_raw.get("model_type") != "gpt_oss":
        raise InputError(f"--mxfp4: requantization is for gpt-oss only; {ck.config_raw.get('model_type')} "
                         "merges as BF16")
    tensors = merge_plan(ck, lora, dt, mxfp4, block_bytes)
    writer = _Writer(ck, lora, rule, allow_nonfinite, workers or max(2, os.cpu_count() or 1))

    target = ShardsTarget("merge-lora", tensors, max_shard, writer.shard,
                          hf_metadata(ck.config_raw, ck.sidecar_files(), mxfp4=mxfp4, dtype=dt.name),
                          {"dtype": dt.st, "max_shard_size": max_shard, "mxfp4": mxfp4,
                           "scale_rule": rule if mxfp4 else None, "scale": scale, "adapter": str(lora.dir)},
                          lambda result, seconds: _done_line(result, target, seconds, rule),
                          report_hook(mxfp4),
                          extra={"lora": lora.record(scale), "config_unknown_fields": list(cfg.unknown_fields)},
                          # each worker's block in fp32: W, its delta and the sum, plus those read ahead
                          memory=Memory(max((t.fp32_block_bytes for t in tensors), default=0), writer.workers,
                                        per=4, fixed=4))
    return target


def _done_line(result, target: ShardsTarget, seconds: float, rule: str) -> str:
    """What the merge did: tensors merged, the requantization error (with --mxfp4), bytes, time."""
    merged = sum(t.how in ("merge", "quantize") and t.name in target.extra["lora"]["tensors"] for t in target.tensors)
    total = sum(t.nbytes for t in target.tensors)
    lines = []
    if s := target.finished.get("requantization"):
        lines.append(f"requantized {len(s['tensors'])} expert tensors ({rule} scales): relative RMS error "
                     f"{s['rel_rms']:.3g}, {s['saturated']} saturated values, {s['clamped_groups']} clamped groups "
                     "(per tensor in conversion.json)")
    lines.append(f"merge-lora: merged {merged} tensors, wrote {total / 1e9:.2f} GB in {len(target.names)} shard(s) "
                 f"to {result} in {seconds:.1f} s; load it with "
                 f"transformers.AutoModelForCausalLM.from_pretrained('{result}').")
    return "\n".join(lines)


def describe(target: ShardsTarget) -> str:
    """The plan, one line per tensor the adapter changes or that is not a plain copy, and the totals."""
    lines = [f"{t.name} {list(t.shape)}: {t.how}" + (" -> MXFP4 blocks+scales" if t.how in QUANTIZED else
                                                     f" -> {t.dtype}") + f" | {len(t.row_blocks())} block(s)"
             for t in target.tensors if t.how != "copy"]
    total = sum(u.nbytes for u in target.units)
    copied = sum(t.how == "copy" for t in target.tensors)
    return "\n".join(lines + [f"{len(target.tensors)} tensors ({copied} copied bit for bit) in "
                              f"{len(target.names)} shard(s), {total / 1e9:.2f} GB to write"])

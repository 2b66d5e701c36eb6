"""`gptoss-convert to-hf`: an Orbax checkpoint (this tool's, or MaxText's own) -> an HF checkpoint.

The backend's mapping table runs backwards (`Rule.inverse`: each transform's inverse, the
gate/up interleave rebuilt from wi_0 and wi_1), one HF tensor at a time and, where the tensor's
first axis survives the transforms, a block of rows at a time (one expert of one layer), read
lazily from the Orbax leaves. With `mxfp4=True` the gpt-oss expert weights are requantized into
OpenAI's published layout; everything else is BF16. Output is staged and committed atomically,
resumable by shard, recorded in conversion.json.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from gptoss_convert import faults
from gptoss_convert.backends import Backend
from gptoss_convert.converters import distributed as dist
from gptoss_convert.converters import job
from gptoss_convert.converters.job import Memory
from gptoss_convert.converters.common import parse_size
from gptoss_convert.converters.provenance import ReadAheadHashes
from gptoss_convert.converters.requantize import (DEFAULT_SCALE_RULE, MXFP4_SUFFIXES, PUBLISHED_QUANTIZATION,  # noqa: F401
                                                   _add, hf_metadata, out_config, report_hook, summarize)
from gptoss_convert.converters.shards import SHARD_METADATA, ShardsTarget
from gptoss_convert.converters.sources import DType, OrbaxSrc, dtype_of, open_source
from gptoss_convert.converters.stream import prefetch
from gptoss_convert.errors import InputError
from gptoss_convert.finite import all_finite
from gptoss_convert.io.hf_checkpoint import BLOCKS, SCALES
from gptoss_convert.io.orbax_source import OrbaxSource
from gptoss_convert.io.safetensors import ShardWriter
from gptoss_convert.mapping.layout import SCAN_AXIS
from gptoss_convert.mapping.transforms import Interleave, apply, out_axis, out_shape
from gptoss_convert.mxfp4.codec import SCALE_RULES, quantize_columns


@dataclasses.dataclass(frozen=True)
class ExportTensor:
    """One HF tensor: the Orbax leaves it is made of and how (the inverse of its rule)."""

    name: str
    shape: tuple[int, ...]                          # in HF orientation ([E, in, out] for experts)
    sources: tuple[tuple[str, int | None], ...]     # (leaf path, stack slot)
    expert: int | None                              # a per-expert HF tensor reads slice `expert` of axis 0
    transforms: tuple
    row_axis: int | None                            # the leaf axis HF axis 0 lands on (None: read whole)
    rows_per_block: int | None
    itemsize: int
    mxfp4: bool = False

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """What the safetensors shard holds: (name, dtype, shape); MXFP4 as blocks + scales,
        stored [E, out, in/32, 16] / [E, out, in/32] as published."""
        if not self.mxfp4:
            return [(self.name, {2: "BF16", 4: "F32"}[self.itemsize], self.shape)]
        e, k, n = self.shape
        return [(self.name + BLOCKS, "U8", (e, n, k // 32, 16)), (self.name + SCALES, "U8", (e, n, k // 32))]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * (1 if d == "U8" else self.itemsize) for _, d, s in self.entries)

    @property
    def block_bytes(self) -> int:
        """Bytes of the largest block read at once (at the output itemsize)."""
        rows = self.shape[0] if self.row_blocks() == [None] or not self.shape else self.rows_per_block
        return math.prod(self.shape[1:]) * rows * self.itemsize if self.shape else self.itemsize

    def row_blocks(self) -> list[slice | None]:
        """The HF row ranges read at a time (None: the whole tensor)."""
        if self.row_axis is None or not self.rows_per_block or self.rows_per_block >= self.shape[0]:
            return [None]
        n = self.rows_per_block
        return [slice(r, min(r + n, self.shape[0])) for r in range(0, self.shape[0], n)]


def _local_shape(shape: tuple[int, ...], slot: int | None, expert: int | None) -> tuple[int, ...]:
    shape = shape if slot is None else shape[:SCAN_AXIS] + shape[SCAN_AXIS + 1:]
    return shape if expert is None else shape[1:]


def export_plan(backend: Backend, cfg, src: OrbaxSource, *, mxfp4: bool, itemsize: int,
                block_bytes: int = 64 << 20) -> list[ExportTensor]:
    """Every HF tensor, from the backend's rules run backwards over the checkpoint's layout."""
    layout = backend.layout_for(cfg, src.scanned)
    out = []
    for rule in backend.rules(cfg):
        inv = rule.inverse()
        for j in [None] if rule.experts is None else range(rule.experts):
            for i in range(cfg.L) if rule.per_layer else [None]:
                places = [layout.place(i, t, ()) if i is not None else None for t in rule.targets]
                sources = tuple((p.path, p.slot) if p else (t, None) for p, t in zip(places, rule.targets))
                name = rule.sources[0].replace("{j}", str(j)).format(i=i)
                local = _local_shape(src.leaves[sources[0][0]][0], sources[0][1], j)
                shape = out_shape(inv.transforms, local)
                row_axis = out_axis(rule.transforms, 0, shape) if shape else None
                row_bytes = math.prod(shape[1:]) * itemsize if shape else 0
                rows = rule.rows_per_block or max(1, block_bytes // max(1, row_bytes))
                quant = mxfp4 and name.endswith(MXFP4_SUFFIXES)
                out.append(ExportTensor(name, shape, sources, j, inv.transforms, row_axis, rows, itemsize, quant))
    return out


def _index(src: OrbaxSource, path: str, slot: int | None, expert: int | None, axis: int | None, rows) -> tuple:
    """The leaf index selecting one layer's (slot's), one expert's, and `rows` of `axis` of it."""
    full = src.leaves[path][0]
    index: list = [slice(None)] * len(full)
    if expert is not None:
        index[0] = expert
    if slot is not None:
        index[SCAN_AXIS] = slot
    if rows is not None:
        a = axis + (expert is not None)
        index[a + (slot is not None and a >= SCAN_AXIS)] = rows
    return tuple(index)


def read_parts(src: OrbaxSource, t: ExportTensor, rows: slice | None, hashes=None) -> list[np.ndarray]:
    """The leaf blocks HF rows `rows` of `t` are made of (None: all), before its transforms; the
    digest of a whole chunk file OrbaxSource.read reads itself goes to `hashes.have` (the
    provenance hash, without a second read)."""
    have = None if hashes is None else hashes.have
    return [src.read(p, i, have) for p, i in _leaf_indices(src, t, rows)]


def _leaf_indices(src: OrbaxSource, t: ExportTensor, rows: slice | None) -> list[tuple[str, tuple]]:
    """(leaf, index) of each part HF rows `rows` of `t` are read from."""
    return [(p, _index(src, p, slot, t.expert, t.row_axis, rows)) for p, slot in t.sources]


def block_files(src: OrbaxSource, t: ExportTensor, rows: slice | None) -> list[str]:
    """The source files TensorStore reads for these rows in read_parts ([] where chunks are not
    files; whole chunks read_parts reads itself are hashed from its own read)."""
    return [f for p, i in _leaf_indices(src, t, rows) if not src.whole_chunk(p, i) for f in src.chunk_files(p, i) or []]


def chunk_reads(src: OrbaxSource, t: ExportTensor) -> frozenset[str] | None:
    """Every chunk file the blocks of `t` read (whole chunks included); None where chunks are
    not files of their own (OCDBT, buckets)."""
    files: set[str] = set()
    for rows in t.row_blocks():
        for p, i in _leaf_indices(src, t, rows):
            got = src.chunk_files(p, i)
            if got is None:
                return None
            files.update(got)
    return frozenset(files)


def read_block(src: OrbaxSource, t: ExportTensor, rows: slice | None, dtype: np.dtype, allow_nonfinite: bool,
               hashes=None, delta=None):
    """HF rows `rows` of tensor `t` (None: all), in `dtype`; NaN/inf refused unless allowed.
    `delta(t, rows)` (merge-lora's HF-side adapter), where given and not None for `t`, is an fp32
    change in HF orientation added to the rows in fp32 before the cast."""
    parts = read_parts(src, t, rows, hashes)
    x = apply(t.transforms, tuple(parts) if len(parts) > 1 else parts[0])
    merged = delta is not None and (d := delta(t, rows)) is not None
    if merged:
        x = _plus(t, x, d)
    x = np.ascontiguousarray(x).astype(dtype, copy=False)
    if not all_finite(x) and (t.mxfp4 or not allow_nonfinite):
        _refuse_nonfinite(src, t, rows, merged)
    return x


def _refuse_nonfinite(src: OrbaxSource, t: ExportTensor, rows: slice | None, merged: bool = False):
    r = "" if rows is None else f" rows {rows.start}:{rows.stop}"
    what = ("MXFP4 cannot encode them (export BF16 instead)" if t.mxfp4
            else "pass --allow-nonfinite to export them anyway")
    whose = "with the adapter's change: is the adapter broken?" if merged else f"in {src.item_dir}"
    raise InputError(f"{t.name}{r} (from {t.sources[0][0]} {whose}): NaN or inf weights; {what}")


def _plus(t: ExportTensor, x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """x + d in fp32 (d: fp32, the shape of x), as PEFT's merge adds its delta to W."""
    if d.shape != x.shape:
        raise InputError(f"{t.name}: a change of shape {list(d.shape)} does not fit its rows {list(x.shape)}")
    return np.add(x.astype(np.float32, copy=False), d, dtype=np.float32)


def requantize_block(src: OrbaxSource, t: ExportTensor, rows: slice | None, dtype: np.dtype, rule: str, hashes=None,
                     delta=None):
    """HF rows `rows` of expert tensor `t` as MXFP4 (blocks [e, out, in/32, 16], scales
    [e, out, in/32], report). A gate_up_proj is not interleaved first: its parts (wi_0, wi_1)
    are quantized down their columns and the packed columns interleaved (codec.quantize_columns);
    NaN/inf are refused (looked for only once the quantizer has refused a block: its own check).
    `delta` as for read_block: the merged fp32 rows are quantized whole."""
    parts = read_parts(src, t, rows, hashes)
    d = None if delta is None else delta(t, rows)
    if d is not None or (t.transforms and t.transforms != (Interleave(len(parts)),)):
        parts = [apply(t.transforms, tuple(parts) if len(parts) > 1 else parts[0])]
    if d is not None:
        parts, dtype = [_plus(t, parts[0], d)], np.dtype(np.float32)    # quantized from the merged fp32
    parts = [np.ascontiguousarray(x).astype(dtype, copy=False) for x in parts]
    try:
        return quantize_columns(parts, rule)
    except ValueError:                  # the float path's refusal of inf/NaN
        if not all(map(all_finite, parts)):
            _refuse_nonfinite(src, t, rows, d is not None)
        raise


def _write_shard(src, path: Path, tensors: list[ExportTensor], opts, bar, workers: int) -> tuple[str, dict]:
    """Write one shard, a row block at a time on `workers` threads; returns (its hash, requantization reports)."""
    w = ShardWriter(path, [e for t in tensors for e in t.entries], SHARD_METADATA)
    reports: dict[str, dict] = {}

    def load(item):
        t, rows = item
        if t.mxfp4:
            return requantize_block(src, t, rows, opts.np_dtype, opts.rule, opts.hasher, opts.delta)
        return (read_block(src, t, rows, opts.np_dtype, opts.allow_nonfinite, opts.hasher, opts.delta),)

    try:
        pending: list[np.ndarray] = []
        items = [(t, rows) for t in tensors for rows in t.row_blocks()]
        hasher = opts.hasher
        if hasher is not None:
            hasher.expect([block_files(src, t, rows) for t, rows in items])
        for i, ((t, _), got) in enumerate(prefetch(items, load, depth=workers + 1, workers=workers)):
            if hasher is not None:
                hasher.taken()
            faults.point("read")
            w.append(t.name + (BLOCKS if t.mxfp4 else ""), got[0])
            if t.mxfp4:
                pending.append(got[1])
                _add(reports.setdefault(t.name, {}), got[2])
            if t.mxfp4 and (i + 1 == len(items) or items[i + 1][0] is not t):   # last block: its scales
                w.append(t.name + SCALES, np.concatenate(pending))
                pending = []
            faults.point("write")
            bar.update(got[0].nbytes + (got[1].nbytes if t.mxfp4 else 0))
        return w.close(), reports
    except BaseException:
        w.abort()
        raise


# Default threads reading and requantizing blocks: at least 4 where there are fewer cores, since
# each holds a chunk read in flight: the cold full-size export took 49.9-50.6 s with 4 and
# 53.9-56.3 s with 2 on the 2-core VM (alternating, BENCHMARKS.md "Back out").
READ_WORKERS = 4


@dist.distributable
def to_hf(src: str | os.PathLike, out: str | os.PathLike, *, mxfp4: bool = False, scale_rule: str = DEFAULT_SCALE_RULE,
          like: str | os.PathLike | None = None, step: int | None = None, item: str | None = None,
          max_shard_size: str | int = "5GB",
          dtype: str | DType = "bf16", dry_run: bool = False, overwrite: bool = False, resume: bool = False,
          allow_nonfinite: bool = False, progress: bool = True, block_bytes: int = 64 << 20,
          workers: int | None = None, strict_config: bool = False, check_space: bool = True,
          max_memory: str | int = job.DEFAULT_MAX_MEMORY, cluster=None, log=print):
    """Export the Orbax checkpoint `src` (this tool's output, a MaxText params-only or training
    checkpoint, or a post-training one (Tunix's model_params, NNX); a run root, step directory or
    its item; `step` picks the step, `item` the item where a step holds several) to an HF checkpoint.

    `mxfp4=True` (gpt-oss) requantizes the expert weights into the published MXFP4 layout with
    the rule `scale_rule` ("triton": triton_kernels' round-up scale, element ties up; "triton-rtne":
    ties to even, as triton_kernels does since PR #8110; "ocp"; "compressed-tensors"); the
    per-tensor error report is logged and recorded in conversion.json. config.json, tokenizer and
    chat template come from the files to-orbax wrote beside `src`, or from `like` (an HF
    directory or hub id; needed for MaxText's own checkpoints). `out` is a directory or a gs://
    / s3:// prefix. Returns OUT (the plan with dry_run=True). `workers` threads read and
    requantize blocks (None: one per core, at least READ_WORKERS)."""
    if scale_rule not in SCALE_RULES:
        raise InputError(f"--scale-rule {scale_rule!r} is not one of {', '.join(SCALE_RULES)}")
    dt = dtype_of(dtype)
    source = OrbaxSrc(open_source(src, step, item, log), like, strict_config=strict_config)
    if mxfp4 and source.backend.model_type != "gpt_oss":
        raise InputError(f"--mxfp4: requantization is for gpt-oss only; {source.backend.model_type} exports as BF16")
    opts = ExportOptions(scale_rule, dt.np, allow_nonfinite, workers or max(READ_WORKERS, os.cpu_count() or 1))
    target = export_target(source, mxfp4=mxfp4, dt=dt, max_shard=parse_size(max_shard_size), block_bytes=block_bytes,
                           opts=opts, like=like)
    if dry_run:
        total = sum(u.nbytes for u in target.units)
        log(describe(target.tensors, source.orbax) + f"\n{len(target.tensors)} HF tensors in "
            f"{len(target.names)} shard(s), "
            f"{total / 1e9:.2f} GB to write")
        return target.tensors
    hasher = None
    if isinstance(cluster, dist.Solo) and not source.orbax.remote and not source.orbax.other_leaves:
        hasher = opts.read_ahead(source.orbax, target.shared_reads)   # a file per chunk: each read once
    return job.run(source, target, out, job.JobOptions(overwrite, resume, progress, check_space, max_memory),
                   cluster, log, hasher=hasher)


@dataclasses.dataclass
class ExportOptions:
    """How blocks are read and requantized (one value for every shard)."""

    rule: str
    np_dtype: np.dtype
    allow_nonfinite: bool
    workers: int
    hasher: ReadAheadHashes | None = None
    delta: Callable[[ExportTensor, slice | None], np.ndarray | None] | None = None   # merge-lora's, in HF names

    def read_ahead(self, source: OrbaxSource, first: list[str]):
        """A job hasher: the source's files hashed just ahead of the reads, `first` before any
        (job.Hashing's interface)."""
        def make(files):
            self.hasher = ReadAheadHashes(source.step_dir, files, ahead=self.workers + 3, first=first)
            return self.hasher
        return make


def export_target(source: OrbaxSrc, *, mxfp4: bool, dt: DType, max_shard: int, block_bytes: int, opts: ExportOptions,
                  like) -> ShardsTarget:
    """The checked export plan of `source` as the job's target: HF tensors in shards."""
    orbax, backend, cfg = source.orbax, source.backend, source.cfg
    tensors = export_plan(backend, cfg, orbax, mxfp4=mxfp4, itemsize=dt.itemsize, block_bytes=block_bytes)
    total = sum(t.nbytes for t in tensors)
    rule = opts.rule if mxfp4 else None

    def summary(result, seconds: float) -> str:
        return _done_line(result, orbax, total, len(target.names), seconds, target.finished.get("requantization"),
                          opts.rule)

    # What each shard reads: its chunk files and the metadata every read depends on, so that a
    # shard is journaled as soon as those are hashed (an interrupted export keeps its shards).
    reads = {t.name: chunk_reads(orbax, t) for t in tensors}
    known = None if any(r is None for r in reads.values()) else frozenset().union(*reads.values())
    metadata = [] if known is None else [f for f in orbax.files() if f not in known]

    def reads_of(shard: list) -> frozenset[str] | None:
        return None if known is None else frozenset(metadata).union(*(reads[t.name] for t in shard))

    target = ShardsTarget("to-hf", tensors, max_shard,
                          lambda path, shard, bar, workers: _write_shard(orbax, path, shard, opts, bar, workers),
                          hf_metadata(source.config_raw, source.sidecars(), mxfp4=mxfp4, dtype=dt.name),
                          {"mxfp4": mxfp4, "scale_rule": rule, "dtype": dt.st, "max_shard_size": max_shard,
                           "like": None if like is None else str(like)}, summary, report_hook(mxfp4),
                          extra={"source_step": orbax.step_dir.name, "source_scanned": orbax.scanned,
                                 "source_prefix": "/".join(orbax.prefix), "source_other_leaves": orbax.other_leaves,
                                 "source_layout": orbax.layout.record() if orbax.layout else None},
                          # read ahead and in the workers, each with its requantization copies
                          memory=Memory(max((t.block_bytes for t in tensors), default=0), opts.workers, per=2, fixed=4),
                          reads_of=reads_of, shared_reads=metadata)
    return target


def _done_line(result, source, total: int, n: int, dt: float, requantization: dict | None, scale_rule: str) -> str:
    """What the export did: the requantization error (with --mxfp4), bytes, time, how to load it."""
    lines = []
    if requantization:
        s = requantization
        lines.append(f"requantized {len(s['tensors'])} expert tensors ({scale_rule} scales): relative RMS error "
                     f"{s['rel_rms']:.3g}, {s['saturated']} saturated values, {s['clamped_groups']} clamped groups "
                     "(per tensor in conversion.json)")
    lines.append(f"to-hf: wrote {total / 1e9:.2f} GB in {n} shard(s) to {result} in {dt:.1f} s "
                 f"({total / 1e9 / max(dt, 1e-9):.2f} GB/s) from step {source.step_dir.name} "
                 f"({'scanned' if source.scanned else 'unscanned'}); load it with "
                 f"transformers.AutoModelForCausalLM.from_pretrained('{result}').")
    return "\n".join(lines)


def describe(tensors: list[ExportTensor], src: OrbaxSource) -> str:
    """The plan, one line per HF tensor: shape, leaves, inverse transforms, blocks."""
    lines = []
    for t in tensors:
        leaves = " + ".join(p + ("" if s is None else f"[slot {s}]") for p, s in t.sources)
        ops = ", ".join(map(str, t.transforms)) or "copy"
        kind = " -> MXFP4 blocks+scales" if t.mxfp4 else ""
        lines.append(f"{t.name} {list(t.shape)} <- {leaves}{'' if t.expert is None else f' expert {t.expert}'} | "
                     f"{ops}{kind} | {len(t.row_blocks())} block(s)")
    return "\n".join(lines)

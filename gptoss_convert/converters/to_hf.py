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
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_convert import faults
from gptoss_convert.buffers import keep_freed_memory
from gptoss_convert.backends import Backend, get_backend
from gptoss_convert.converters import distributed as dist
from gptoss_convert.converters.common import parse_size, progress_bar, resolve_dtype
from gptoss_convert.converters.dequantize import SHARD_METADATA, _shards
from gptoss_convert.converters.output import StagedOutput
from gptoss_convert.converters.provenance import PROGRESS, ReadAheadHashes, source_hashes, write_record
from gptoss_convert.converters.stream import background, prefetch
from gptoss_convert.errors import ConfigError, InputError, PlanError
from gptoss_convert.io.files import HASH, temp_path
from gptoss_convert.io.hf_checkpoint import BLOCKS, INDEX, SCALES, SIDECAR_FILES
from gptoss_convert.io.orbax_source import OrbaxSource, object_digest, open_orbax
from gptoss_convert.io.safetensors import ShardWriter, build_header
from gptoss_convert.mapping.layout import SCAN_AXIS
from gptoss_convert.mapping.transforms import Interleave, apply, out_axis, out_shape
from gptoss_convert.mxfp4.codec import SCALE_RULES, quantize_columns

DEFAULT_SCALE_RULE = "triton"     # triton_kernels' downcast_to_mxfp as at gpt-oss's release; docs/formats.md §3
# gpt-oss tensors stored as MXFP4 in the published checkpoints (everything else is BF16 there)
MXFP4_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_ST = {"bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)), "float32": ("F32", np.dtype(np.float32))}
PUBLISHED_QUANTIZATION = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                     "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}


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

    def row_blocks(self) -> list[slice | None]:
        """The HF row ranges read at a time (None: the whole tensor)."""
        if self.row_axis is None or not self.rows_per_block or self.rows_per_block >= self.shape[0]:
            return [None]
        n = self.rows_per_block
        return [slice(r, min(r + n, self.shape[0])) for r in range(0, self.shape[0], n)]


def check_tree(src: OrbaxSource, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """The checkpoint's params are exactly the backend's tree for the config: every missing,
    unexpected and mis-shaped leaf named at once."""
    got = {p: s for p, (s, _) in src.leaves.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{p} is {list(got[p])}, config needs {list(s)}" for p, s in expected.items() if p in got and got[p] != s]
    problems = ([f"missing leaves: {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected leaves: {', '.join(unexpected)}"] if unexpected else []) + shapes
    if problems:
        raise PlanError(problems, header=f"{src.item_dir}: not the {where} parameter tree")


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
    return [src.read(p, _index(src, p, slot, t.expert, t.row_axis, rows), have) for p, slot in t.sources]


def block_files(src: OrbaxSource, t: ExportTensor, rows: slice | None) -> list[str]:
    """The source files TensorStore reads for these rows in read_parts ([] where chunks are not
    files; whole chunks read_parts reads itself are hashed from its own read)."""
    indices = [(p, _index(src, p, slot, t.expert, t.row_axis, rows)) for p, slot in t.sources]
    return [f for p, i in indices if not src.whole_chunk(p, i) for f in src.chunk_files(p, i) or []]


def read_block(src: OrbaxSource, t: ExportTensor, rows: slice | None, dtype: np.dtype, allow_nonfinite: bool,
               hashes=None):
    """HF rows `rows` of tensor `t` (None: all), in `dtype`; NaN/inf refused unless allowed."""
    parts = read_parts(src, t, rows, hashes)
    x = apply(t.transforms, tuple(parts) if len(parts) > 1 else parts[0])
    x = np.ascontiguousarray(x).astype(dtype, copy=False)
    if not _all_finite(x) and (t.mxfp4 or not allow_nonfinite):
        _refuse_nonfinite(src, t, rows)
    return x


def _refuse_nonfinite(src: OrbaxSource, t: ExportTensor, rows: slice | None):
    r = "" if rows is None else f" rows {rows.start}:{rows.stop}"
    what = ("MXFP4 cannot encode them (export BF16 instead)" if t.mxfp4
            else "pass --allow-nonfinite to export them anyway")
    raise InputError(f"{t.name}{r} (from {t.sources[0][0]} in {src.item_dir}): NaN or inf weights; {what}")


def _all_finite(x: np.ndarray) -> bool:
    """np.isfinite(x).all(); for bf16 on the bits (exponent all ones: inf/NaN), since ml_dtypes'
    isfinite took 81 ms for one [2880, 5760] gate_up expert and this 7."""
    if x.dtype != _ST["bfloat16"][1]:
        return bool(np.isfinite(x).all())
    return x.size == 0 or int((x.view(np.uint16) & np.uint16(0x7FFF)).max()) < 0x7F80


def requantize_block(src: OrbaxSource, t: ExportTensor, rows: slice | None, dtype: np.dtype, rule: str, hashes=None):
    """HF rows `rows` of expert tensor `t` as MXFP4 (blocks [e, out, in/32, 16], scales
    [e, out, in/32], report). A gate_up_proj is not interleaved first: its parts (wi_0, wi_1)
    are quantized down their columns and the packed columns interleaved (codec.quantize_columns);
    NaN/inf are refused (looked for only once the quantizer has refused a block: its own check)."""
    parts = read_parts(src, t, rows, hashes)
    if t.transforms and t.transforms != (Interleave(len(parts)),):
        parts = [apply(t.transforms, tuple(parts) if len(parts) > 1 else parts[0])]
    parts = [np.ascontiguousarray(x).astype(dtype, copy=False) for x in parts]
    try:
        return quantize_columns(parts, rule)
    except ValueError:                  # the float path's refusal of inf/NaN
        if not all(map(_all_finite, parts)):
            _refuse_nonfinite(src, t, rows)
        raise


def _add(total: dict, rep: dict) -> None:
    for k, v in rep.items():
        total[k] = total.get(k, 0) + v


def _write_shard(src, path: Path, tensors: list[ExportTensor], opts, bar) -> tuple[str, dict]:
    """Write one shard, a row block at a time; returns (its hash, requantization reports)."""
    w = ShardWriter(path, [e for t in tensors for e in t.entries], SHARD_METADATA)
    reports: dict[str, dict] = {}

    def load(item):
        t, rows = item
        if t.mxfp4:
            return requantize_block(src, t, rows, opts["np_dtype"], opts["rule"], opts.get("hasher"))
        return (read_block(src, t, rows, opts["np_dtype"], opts["allow_nonfinite"], opts.get("hasher")),)

    try:
        pending: list[np.ndarray] = []
        items = [(t, rows) for t in tensors for rows in t.row_blocks()]
        hasher = opts.get("hasher")
        if hasher is not None:
            hasher.expect([block_files(src, t, rows) for t, rows in items])
        for i, ((t, _), got) in enumerate(prefetch(items, load, depth=opts["workers"] + 1, workers=opts["workers"])):
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


def _shard_size(tensors: list[ExportTensor]) -> int:
    prefix, _ = build_header([e for t in tensors for e in t.entries], SHARD_METADATA)
    return len(prefix) + sum(t.nbytes for t in tensors)


def _like_dir(like) -> Path:
    """--like as a directory: local, or the config and tokenizer files of a hub repo (no weights)."""
    p = Path(like)
    if p.is_dir():
        return p
    if str(like).count("/") != 1 or str(like).startswith((".", "/", "~")):
        raise InputError(f"--like {like}: not a directory and not a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(like), allow_patterns=["config.json", *SIDECAR_FILES]))
    except Exception as e:      # offline, unknown repo, no network: one line, what to do
        raise InputError(f"--like {like}: could not fetch its config from the hub ({type(e).__name__}); "
                         "pass a local HF directory") from None


def model_config(src: OrbaxSource, like) -> tuple[Path, dict]:
    """(directory of config.json and tokenizer files, the raw config): --like, else the files
    to-orbax wrote beside the checkpoint."""
    d = _like_dir(like) if like is not None else src.sidecar_dir
    if d is None:
        raise InputError(f"{src.step_dir}: no config.json beside this checkpoint (not written by gptoss-convert "
                         "to-orbax, e.g. MaxText's own): pass --like with the HF model it came from")
    path = d / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable ({e}); --like needs an HF model directory or id") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return d, raw


def backend_config(src: OrbaxSource, like):
    """(backend, config, sidecar dir, raw config) for `src`, its tree checked against the config."""
    d, raw = model_config(src, like)
    backend = get_backend(raw.get("model_type") or src.custom_metadata.get("model_type"))
    cfg = backend.config_from_dict(raw, str(d / "config.json"))
    where = f"{d / 'config.json'} ({backend.model_type}, {'scanned' if src.scanned else 'unscanned'})"
    check_tree(src, backend.flat_shapes(cfg, src.scanned), where)
    return backend, cfg, d, raw


def out_config(raw: dict, *, mxfp4: bool, dtype: str) -> dict:
    """config.json as published: BF16 has no quantization_config; MXFP4 has the published one
    (--like's own if it has one)."""
    conf = {k: v for k, v in raw.items() if k != "quantization_config"}
    conf |= {"dtype": dtype} | ({"torch_dtype": dtype} if "torch_dtype" in raw else {})
    if mxfp4:
        q = raw.get("quantization_config")
        conf["quantization_config"] = q if isinstance(q, dict) and q.get("quant_method") == "mxfp4" else PUBLISHED_QUANTIZATION
    return conf


def _write_metadata(out: Path, sidecars: Path, conf: dict, names: list[str], shards) -> None:
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    for f in SIDECAR_FILES:
        if (sidecars / f).is_file():
            (out / f).write_bytes((sidecars / f).read_bytes())
    if len(names) > 1:
        weight_map = {e[0]: f for f, s in zip(names, shards) for t in s for e in t.entries}
        total = sum(t.nbytes for s in shards for t in s)
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


SMALL_FILE = 1 << 20
# Default threads reading and requantizing blocks: at least 4 where there are fewer cores, since
# each holds a chunk read in flight: the cold full-size export took 49.9-50.6 s with 4 and
# 53.9-56.3 s with 2 on the 2-core VM (alternating, BENCHMARKS.md "Back out").
READ_WORKERS = 4


def open_source(src, step: int | None) -> OrbaxSource:
    """open_orbax, and for a gs:// / s3:// SRC written by this tool, refuse one whose conversion
    did not finish (its journal is still there, as `check` and the other readers do)."""
    source = open_orbax(src, step=step)
    if source.remote and (source.step_dir.parent / PROGRESS / "plan.json").is_file():    # written first, deleted last
        raise InputError(f"{source.step_dir.parent}: the conversion writing it did not finish ({PROGRESS}/ is "
                         "still there); rerun it with --resume first")
    return source


def hash_source(source: OrbaxSource, files: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Provenance of SRC's files (`files`, default all): every file hashed, except in a training
    state (where params are a fraction of the bytes, optimizer state the rest) only its small
    metadata files; the others are recorded by size."""
    files = source.files() if files is None else files
    if source.remote:
        return _hash_remote(source, files)
    small = [f for f in files if not source.other_leaves or (source.step_dir / f).stat().st_size < SMALL_FILE]
    return {f: {} for f in files} | source_hashes(source.step_dir, small, workers=1)


def _hash_remote(source: OrbaxSource, files: list[str]) -> dict[str, dict]:
    """hash_source for a bucket: each object read in pieces, hashed and sized as it is read; in
    a training state an object over SMALL_FILE is recorded by name only ("size": None), having
    been read no further (its size is not known without reading it)."""
    limit = SMALL_FILE if source.other_leaves else None
    with ThreadPoolExecutor(max_workers=8) as pool:     # per-object latency, not bandwidth, bounds this
        got = pool.map(lambda f: object_digest(source.step_dir / f, limit), files)
        return {f: {"size": None} if g is None else {"size": g[0], HASH: g[1]} for f, g in zip(files, got)}


def summarize(reports: dict[str, dict]) -> dict:
    """Per tensor: relative RMS error, saturated values, clamped groups; and the totals."""
    per = {n: {"rel_rms": math.sqrt(r["err2"] / r["ref2"]) if r["ref2"] else 0.0, "saturated": r["saturated"],
               "clamped_groups": r["clamped_groups"]} for n, r in sorted(reports.items())}
    total: dict = {}
    for r in reports.values():
        _add(total, r)
    return {"tensors": per, "rel_rms": math.sqrt(total["err2"] / total["ref2"]) if total.get("ref2") else 0.0,
            "saturated": total.get("saturated", 0), "clamped_groups": total.get("clamped_groups", 0)}


@dist.distributable
def to_hf(src: str | os.PathLike, out: str | os.PathLike, *, mxfp4: bool = False, scale_rule: str = DEFAULT_SCALE_RULE,
          like: str | os.PathLike | None = None, step: int | None = None, max_shard_size: str | int = "5GB",
          dtype: str = "bf16", dry_run: bool = False, overwrite: bool = False, resume: bool = False,
          allow_nonfinite: bool = False, progress: bool = True, block_bytes: int = 64 << 20,
          workers: int | None = None, cluster=None, log=print):
    """Export the Orbax checkpoint `src` (this tool's output, a MaxText params-only or training
    checkpoint; a run root, step directory or its items; `step` picks one) to an HF checkpoint.

    `mxfp4=True` (gpt-oss) requantizes the expert weights into the published MXFP4 layout with
    the rule `scale_rule` ("triton": triton_kernels' round-up scale, element ties up; "triton-rtne":
    ties to even, as triton_kernels does since PR #8110; "ocp"); the
    per-tensor error report is logged and recorded in conversion.json. config.json, tokenizer and
    chat template come from the files to-orbax wrote beside `src`, or from `like` (an HF
    directory or hub id; needed for MaxText's own checkpoints). Returns OUT (the plan with
    dry_run=True). `workers` threads read and requantize blocks (None: one per core, at least
    READ_WORKERS)."""
    t0 = time.perf_counter()
    keep_freed_memory()
    if scale_rule not in SCALE_RULES:
        raise InputError(f"--scale-rule {scale_rule!r} is not one of {', '.join(SCALE_RULES)}")
    dt_name = resolve_dtype(dtype)
    st_name, np_dtype = _ST[dt_name]
    source = open_source(src, step)
    backend, cfg, sidecars, raw = backend_config(source, like)
    if mxfp4 and backend.model_type != "gpt_oss":
        raise InputError(f"--mxfp4: requantization is for gpt-oss only; {backend.model_type} exports as BF16")
    tensors = export_plan(backend, cfg, source, mxfp4=mxfp4, itemsize=np_dtype.itemsize, block_bytes=block_bytes)
    shards = _shards(tensors, parse_size(max_shard_size))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    total = sum(t.nbytes for t in tensors)
    if dry_run:
        log(describe(tensors, source) + f"\n{len(tensors)} HF tensors in {n} shard(s), {total / 1e9:.2f} GB to write")
        return tensors
    opts = {"rule": scale_rule, "np_dtype": np_dtype, "allow_nonfinite": allow_nonfinite,
            "workers": workers or max(READ_WORKERS, os.cpu_count() or 1)}
    fingerprint = {"command": "to-hf", "mxfp4": mxfp4, "scale_rule": scale_rule if mxfp4 else None, "dtype": st_name,
                   "shards": [[t.name for t in s] for s in shards], "source": str(source.step_dir),
                   "source_files": source.sizes()}
    dist.agree_on(cluster, fingerprint, raw, out=str(Path(out).absolute()), overwrite=overwrite, resume=resume,
                  max_shard_size=parse_size(max_shard_size), like=None if like is None else str(like))
    staged = StagedOutput(out, fingerprint=fingerprint, overwrite=overwrite, resume=resume,
                          source=None if source.remote else source.step_dir, log=log)
    mine = dist.my_share(cluster, [sum(t.nbytes for t in s) for s in shards])
    with dist.staging(cluster, staged, lambda s, first: None):
        files = source.files()
        my_files = [f for f, m in zip(files, dist.my_share(cluster, [1] * len(files))) if m]
        if cluster is None and not source.remote and not source.other_leaves:    # a file per chunk, read once
            hashing = opts["hasher"] = ReadAheadHashes(source.step_dir, my_files, ahead=opts["workers"] + 3)
        else:                                   # hashed in the background, in no particular order
            hashing = background(hash_source, source, my_files)
        hashes, reports = _write_shards(source, staged, names, shards, opts, progress, mine)
        merged = dist.merge_shares(cluster, staged, hashes, hashing.result())
        if merged is None:                      # another process of a distributed run: its shards are on disk
            return dist.finish(cluster, None, log, f"{sum(mine)} of {n} shards")
        hashes, source_files = merged
        if cluster is not None:                 # every shard's report, in shard order (as one process sums them)
            reports = {k: v for f in names for k, v in _saved_report(staged, f).items()}
        _write_metadata(staged.path, sidecars, out_config(raw, mxfp4=mxfp4, dtype=dt_name), names, shards)
        extra = {"source_step": source.step_dir.name, "source_scanned": source.scanned,
                 "source_prefix": "/".join(source.prefix), "source_other_leaves": source.other_leaves}
        if mxfp4:
            extra["requantization"] = summarize(reports)
        write_record(staged.path, command="to-hf", source_dir=source.step_dir, source_files=source_files,
                     options={"mxfp4": mxfp4, "scale_rule": scale_rule if mxfp4 else None, "dtype": st_name,
                              "max_shard_size": parse_size(max_shard_size), "like": None if like is None else str(like)},
                     extra=extra, output_hashes=hashes)
        result = staged.commit()
    if cluster is not None:
        dist.finish(cluster, result)
    _log_done(log, result, source, total, n, time.perf_counter() - t0, extra.get("requantization"), scale_rule)
    return result


def _log_done(log, result, source, total: int, n: int, dt: float, requantization: dict | None, scale_rule: str) -> None:
    """What the export did: the requantization error (with --mxfp4), bytes, time, how to load it."""
    if requantization:
        s = requantization
        log(f"requantized {len(s['tensors'])} expert tensors ({scale_rule} scales): relative RMS error {s['rel_rms']:.3g}, "
            f"{s['saturated']} saturated values, {s['clamped_groups']} clamped groups (per tensor in conversion.json)")
    log(f"to-hf: wrote {total / 1e9:.2f} GB in {n} shard(s) to {result} in {dt:.1f} s ({total / 1e9 / max(dt, 1e-9):.2f} GB/s) "
        f"from step {source.step_dir.name} ({'scanned' if source.scanned else 'unscanned'}); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained('{result}').")


def _saved_report(staged, fname: str) -> dict:
    """The requantization report saved beside the journal for shard `fname`."""
    return json.loads((staged.path / PROGRESS / f"{fname}.report.json").read_text())


def _write_shards(source, staged, names, shards, opts, progress, mine=None):
    """Write every shard (of those `mine` marks, default all) not yet done (resume: by shard);
    returns (hashes, requantization reports)."""
    hashes, reports = {}, {}
    mine = [True] * len(shards) if mine is None else mine
    total = sum(t.nbytes for s, m in zip(shards, mine) if m for t in s)
    with progress_bar(total, "to-hf", progress) as bar:
        for fname, shard in (fs for fs, m in zip(zip(names, shards), mine) if m):
            done = staged.path / fname
            saved = staged.path / PROGRESS / f"{fname}.report.json"
            if staged.is_done(fname) and done.is_file() and done.stat().st_size == _shard_size(shard):
                reports |= _saved_report(staged, fname)
                bar.update(sum(t.nbytes for t in shard))
                continue
            tmp = temp_path(done)
            hashes[fname], rep = _write_shard(source, tmp, shard, opts, bar)
            os.replace(tmp, done)
            saved.write_text(json.dumps(rep))
            staged.mark_done(fname)
            reports |= rep
    return hashes, reports


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

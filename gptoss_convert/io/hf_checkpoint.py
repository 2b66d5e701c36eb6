"""An HF checkpoint directory (or hub repo) as a set of lazily read tensors.

MXFP4 pairs `X_blocks` [E, out, G, 16] + `X_scales` [E, out, G] are presented as one virtual
tensor `X` in HF parameter orientation [E, in, out] (in = G * 32), dequantized on read. Block-
scaled FP8 pairs `X.weight` (F8_E4M3 [out, in]) + `X.weight_scale_inv` (a float grid [out/b0,
in/b1], `quantization_config.weight_block_size` = [b0, b1]) are presented as the virtual tensor
`X.weight` [out, in], dequantized on read block by block (docs/formats.md §3b).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from gptoss_convert import fp8, mxfp4
from gptoss_convert.buffers import as_bits, empty
from gptoss_convert.errors import CorruptTensorError, InputError
from gptoss_convert.finite import all_finite, nonfinite
from gptoss_convert.io.files import (MAX_INDEX_BYTES, MAX_SIDECAR_BYTES, MAX_TOKENIZER_BYTES, check_size,
                                     read_json_object, read_small)
from gptoss_convert.io.safetensors import MappedFiles, TensorInfo, read_header, read_tensor, rows_shape

log = logging.getLogger(__name__)

# (shape, dtype) -> a C-contiguous array to read into, e.g. BufferPool.get or RecyclingPool.empty
Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files copied next to converted weights; everything else in SRC (original/, metal/) is ignored.
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja")
HUB_PATTERNS = ["config.json", INDEX, "model*.safetensors", *SIDECAR_FILES]
SUPPORTED_QUANT = {"mxfp4", "fp8"}
BLOCKS, SCALES = "_blocks", "_scales"
SCALE_INV = "_scale_inv"                          # FP8: `X.weight` + `X.weight_scale_inv`
FP8_SCALE_DTYPES = {"F32", "BF16", "F16"}


@dataclasses.dataclass(frozen=True)
class VirtualTensor:
    """A tensor as the model sees it: stored directly, or an MXFP4 blocks+scales pair."""

    name: str
    shape: tuple[int, ...]
    dtype: str                        # "BF16", ... for stored; "MXFP4" / "FP8" for pairs
    stored: TensorInfo | None = None  # (FP8: the E4M3 weight)
    blocks: TensorInfo | None = None
    scales: TensorInfo | None = None
    scale_inv: TensorInfo | None = None      # FP8: the scale grid of `stored`
    block: tuple[int, int] | None = None     # FP8: rows x columns per scale

    @property
    def is_mxfp4(self) -> bool:
        return self.blocks is not None

    @property
    def is_fp8(self) -> bool:
        return self.scale_inv is not None

    @property
    def is_quantized(self) -> bool:
        """Dequantized on read (MXFP4 or FP8), not copied bit for bit."""
        return self.is_mxfp4 or self.is_fp8

    @property
    def sources(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in (self.stored, self.blocks, self.scales, self.scale_inv) if t is not None)


def resolve_source(src: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id fetched (or found in the HF cache).

    Only the files a conversion needs are fetched: never `original/` or `metal/`.
    HF_HUB_OFFLINE and HF_HUB_CACHE / HF_HOME are honoured by huggingface_hub itself.
    """
    p = Path(src)
    if p.is_dir():
        return p
    if p.exists():
        raise InputError(f"{src}: not a directory (an HF checkpoint is a directory of safetensors files)")
    if str(src).startswith((".", "/", "~")) or str(src).count("/") != 1 or p.parent.is_dir():
        raise InputError(f"{src}: no such directory" + ("" if p.parent.is_dir() else
                         " (and not a hub repo id owner/name)") + "; check the path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(str(src), revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise InputError(f"{src}: not in the local HF cache and the hub cannot be reached ({type(e).__name__}); "
                         "download it first or unset HF_HUB_OFFLINE") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"{src}: could not fetch from the hub: {e}") from None


class HFCheckpoint:
    """The tensors of an HF safetensors checkpoint directory, validated, read lazily."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.fp8_block: tuple[int, int] | None = None   # quantization_config.weight_block_size of an FP8 checkpoint
        self.workers: int | None = None       # threads for MXFP4 decoding (None = all cores)
        self.allow_nonfinite = False           # stored NaN/inf weights are an error unless set
        self._mapped = MappedFiles()           # MXFP4 blocks/scales are decoded from the page cache
        self._roots = self._link_roots()
        self.config_raw = self._read_config()
        self.files = self._shard_files()
        self.stored: dict[str, TensorInfo] = {}
        self.file_metadata: dict[str, dict[str, str]] = {}
        for f in self.files:
            tensors, meta = read_header(self.dir / f)
            self.file_metadata[f] = meta
            for name, info in tensors.items():
                if name in self.stored:
                    raise CorruptTensorError(f"{self.dir}: tensor {name!r} is stored in both "
                                             f"{self.stored[name].file.name} and {f}")
                self.stored[name] = info
        self._check_index()
        self.tensors = self._virtual_tensors()
        self._note_wide_floats()
        self._sidecars = [self._inside(f, "file") for f in SIDECAR_FILES]   # refuse links out now, not after hours
        for f in self.sidecar_files():                                      # and oversized ones (read whole later)
            check_size(f, MAX_TOKENIZER_BYTES if f.name == "tokenizer.json" else MAX_SIDECAR_BYTES, f.name)

    # -- loading and validation -------------------------------------------------------------
    def _read_config(self) -> dict:
        path = self._inside("config.json", "file")
        raw = read_json_object(path, "a checkpoint directory must contain config.json")
        q = raw.get("quantization_config")
        if q is not None:
            method = q.get("quant_method") if isinstance(q, dict) else q
            if not isinstance(method, str) or method not in SUPPORTED_QUANT:
                raise InputError(f"{path}: quant_method {method!r} is not supported "
                                 f"(supported: {sorted(SUPPORTED_QUANT)})")
            if method == "fp8":
                self.fp8_block = _fp8_block(q, path)
        return raw

    def _link_roots(self) -> tuple[Path, ...]:
        """Where the files of the directory may really live: inside it, and for a snapshot of
        huggingface_hub's cache (`models--o--n/snapshots/<rev>/`, whose files are links to
        `../../blobs/<hash>`) in that repository's own `blobs/` folder."""
        root = self.dir.resolve()
        if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
            return root, root.parent.parent / "blobs"
        return (root,)

    def _inside(self, name: str, what: str) -> Path:
        """`name` as a file inside the directory; refuses absolute paths, '..' and symlink escapes."""
        if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
            raise InputError(f"{self.dir / INDEX}: {what} {name!r} points outside the checkpoint directory")
        path = self.dir / name
        real = path.resolve()
        if (path.exists() or path.is_symlink()) and not any(r in real.parents for r in self._roots):
            raise InputError(f"{path}: is a link pointing outside the checkpoint directory ({real})")
        return path

    def _shard_files(self) -> list[str]:
        index = self._inside(INDEX, "file")
        if index.is_file():
            try:
                data = json.loads(read_small(index, MAX_INDEX_BYTES, "an index"))
                weight_map = data["weight_map"]
                assert isinstance(weight_map, dict)
            except (ValueError, KeyError, AssertionError, UnicodeDecodeError, TypeError, RecursionError):
                raise InputError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
            bad = [f"{n!r}: {f!r}" for n, f in weight_map.items() if not isinstance(f, str)]
            if bad:
                raise InputError(f"{index}: weight_map values must be shard file names, got " + ", ".join(bad[:5]))
            self.weight_map: dict[str, str] | None = weight_map
            files = sorted(set(weight_map.values()), key=str)
            if not files:
                raise InputError(f"{index}: its weight_map lists no tensors; the index is damaged, re-download it")
            missing = [f for f in files if not self._inside(f, "shard").is_file()]
            if missing:
                raise InputError(f"{index}: lists shard(s) {missing} that do not exist in {self.dir}")
            return files
        self.weight_map = None
        if (self.dir / SINGLE).is_file():
            self._inside(SINGLE, "shard")
            return [SINGLE]
        raise InputError(f"{self.dir}: no {INDEX} and no {SINGLE}; is this a safetensors checkpoint?")

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        problems = [f"{n!r} listed in {f} but not stored there" for n, f in self.weight_map.items()
                    if n not in self.stored or self.stored[n].file.name != Path(f).name]
        problems += [f"{n!r} stored in {t.file.name} but missing from the index" for n, t in self.stored.items()
                     if n not in self.weight_map]
        if problems:
            raise InputError(f"{self.dir / INDEX}: disagrees with the shards: " + "; ".join(problems[:20])
                             + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""))

    def _virtual_tensors(self) -> dict[str, VirtualTensor]:
        out: dict[str, VirtualTensor] = {}
        problems: list[str] = []
        for name, info in self.stored.items():
            if name.endswith(SCALES) and name[:-len(SCALES)] + BLOCKS in self.stored:
                continue
            if name.endswith(SCALE_INV) or info.dtype.startswith("F8_"):
                vt = self._fp8_pair(name, info, problems)
                if vt:
                    out[name] = vt
                continue
            if name.endswith(BLOCKS):
                base = name[:-len(BLOCKS)]
                scales = self.stored.get(base + SCALES)
                vt = self._pair(base, info, scales, problems)
                if vt:
                    out[base] = vt
            elif name.endswith(SCALES):
                problems.append(f"{name!r} has no matching {name[:-len(SCALES)] + BLOCKS!r}")
            else:
                out[name] = VirtualTensor(name, info.shape, info.dtype, stored=info)
        if problems:
            raise CorruptTensorError(f"{self.dir}: incomplete or inconsistent quantized tensors: "
                                     + "; ".join(problems))
        return out

    def _pair(self, base: str, blocks: TensorInfo, scales: TensorInfo | None, problems: list[str]):
        if scales is None:
            problems.append(f"{blocks.name!r} has no matching {base + SCALES!r}")
            return None
        if blocks.dtype != "U8" or scales.dtype != "U8":
            problems.append(f"{blocks.name!r}/{scales.name!r} must be U8, got {blocks.dtype}/{scales.dtype}")
            return None
        if len(blocks.shape) < 3 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
            problems.append(f"{blocks.name!r} {list(blocks.shape)} and {scales.name!r} {list(scales.shape)} "
                            "do not pair as [..., out, G, 16] / [..., out, G]")
            return None
        *lead, out_dim, groups, _ = blocks.shape
        return VirtualTensor(base, (*lead, groups * 32, out_dim), "MXFP4", blocks=blocks, scales=scales)

    def _fp8_pair(self, name: str, info: TensorInfo, problems: list[str]) -> VirtualTensor | None:
        """An F8 weight and its `_scale_inv` grid as one virtual tensor (None for the grid itself,
        or with the problem recorded: an unpaired grid or weight, a layout the codec refuses)."""
        if name.endswith(SCALE_INV):
            if self.stored.get(name[:-len(SCALE_INV)], info).dtype != "F8_E4M3":
                problems.append(f"{name!r} has no matching F8_E4M3 weight {name[:-len(SCALE_INV)]!r}")
            return None
        scale = self.stored.get(name + SCALE_INV)
        if info.dtype != "F8_E4M3":
            problems.append(f"{name!r} is {info.dtype}; only F8_E4M3 FP8 weights are supported")
        elif self.fp8_block is None:
            problems.append(f"{name!r} is F8_E4M3 but config.json has no quantization_config with quant_method "
                            "'fp8' and a weight_block_size")
        elif scale is None:
            problems.append(f"{name!r} is F8_E4M3 but has no {name + SCALE_INV!r} scale grid")
        elif scale.dtype not in FP8_SCALE_DTYPES:
            problems.append(f"{scale.name!r} is {scale.dtype}; FP8 scales must be one of {sorted(FP8_SCALE_DTYPES)}")
        elif why := fp8.layout_problem(info.shape, scale.shape, self.fp8_block):
            problems.append(f"{name!r} {why}")
        else:
            return VirtualTensor(name, info.shape, "FP8", stored=info, scale_inv=scale, block=self.fp8_block)
        return None

    def _note_wide_floats(self) -> None:
        """One warning line when weights are stored as F32/F16/F64 rather than BF16 (a third-party
        copy saved so): they convert exactly as stored (dequantize copies them bit for bit;
        to-orbax casts them to its --dtype: bf16 rounds to nearest even, as transformers does
        loading with dtype=bfloat16; fp32 keeps F32/F16 exact)."""
        wide = [(n, t.dtype) for n, t in self.tensors.items() if t.dtype in ("F32", "F16", "F64")]
        if wide:
            kinds = sorted({d for _, d in wide})
            log.warning("warning: %s: %d of %d tensors are stored as %s, not BF16 (e.g. %r); dequantize copies them as "
                        "stored, to-orbax casts them to --dtype "
                        "(bf16 rounds to nearest even; fp32 keeps F32/F16 exact)",
                        self.dir, len(wide), len(self.tensors), "/".join(kinds), wide[0][0])

    # -- reading ----------------------------------------------------------------------------
    @property
    def is_mxfp4(self) -> bool:
        return any(t.is_mxfp4 for t in self.tensors.values())

    def read(self, name: str, rows: slice | None = None, dtype=ml_dtypes.bfloat16,
             alloc: Alloc | None = None) -> np.ndarray:
        """Tensor `name` in HF orientation, or rows `rows` of its first axis (e.g. experts).

        Stored tensors come back in their stored dtype (bit for bit); MXFP4 pairs are
        dequantized to `dtype` and transposed from [E, out, in] to [E, in, out]; FP8 weights are
        dequantized to `dtype` block by block. `alloc(shape, dtype)`, if given, provides the
        result's memory (e.g. a buffer pool's).
        """
        vt = self.tensors[name]
        shape = rows_shape(vt.shape, rows)
        if vt.is_fp8:
            return self._read_fp8(vt, rows, dtype, alloc and alloc(shape, np.dtype(dtype)))
        if not vt.is_mxfp4:
            arr = read_tensor(vt.stored, rows, out=alloc and alloc(shape, vt.stored.np_dtype))
            if not self.allow_nonfinite:
                _check_finite(arr, vt.stored, rows)
            return arr
        with self._stored_pair(vt, rows) as (blocks, scales):
            return self._decode(vt, blocks, scales, rows, dtype, alloc and alloc(shape, np.dtype(dtype)))

    def read_parts(self, name: str, parts: int, rows: slice | None = None, dtype=ml_dtypes.bfloat16,
                   alloc: Alloc | None = None) -> list[np.ndarray]:
        """`[read(name, rows)[..., p::parts] for p in range(parts)]`, each part C-contiguous.

        For an MXFP4 tensor each part is decoded on its own from the stored rows p::parts (HF's
        last axis is the stored row axis), so the interleaved whole is never materialised and
        nothing is gathered with a stride. This is how gpt-oss's gate/up pair [E, H, 2I]
        (gate = 0::2, up = 1::2) splits into MaxText's wi_0 and wi_1. `alloc` as for `read`.
        """
        vt = self.tensors[name]
        if vt.shape[-1] % parts:
            raise ValueError(f"{name}: last axis {vt.shape[-1]} does not split into {parts} interleaved parts")
        shape = rows_shape(vt.shape, rows)
        shape = shape[:-1] + (shape[-1] // parts,)
        if not vt.is_mxfp4:
            read = self.read(name, rows, dtype)
            whole = as_bits(read)                              # plain-bit copies (bfloat16's own loop is slower)
            outs = [(alloc or empty)(shape, read.dtype) for _ in range(parts)]
            for p, out in enumerate(outs):
                np.copyto(as_bits(out), whole[..., p::parts])
            return outs
        with self._stored_pair(vt, rows) as (blocks, scales):
            return [self._decode(vt, blocks, scales, rows, dtype, alloc and alloc(shape, np.dtype(dtype)),
                                 part=(p, parts))
                    for p in range(parts)]

    @contextlib.contextmanager
    def _stored_pair(self, vt: VirtualTensor, rows: slice | None):
        """Rows `rows` of an MXFP4 pair's stored blocks and scales, as read-only views of the
        files while in use; their pages leave the process afterwards (RSS stays bounded)."""
        try:
            yield self._mapped.view(vt.blocks, rows), self._mapped.view(vt.scales, rows)
        finally:
            self._mapped.drop(vt.blocks, rows)
            self._mapped.drop(vt.scales, rows)

    def _read_fp8(self, vt: VirtualTensor, rows: slice | None, dtype, out: np.ndarray | None) -> np.ndarray:
        """Rows `rows` of an FP8 weight, dequantized with its scale grid one block of rows at a
        time (only the scale rows they need are read; the weight is a view of the page cache)."""
        shape = rows_shape(vt.shape, rows)
        out = np.empty(shape, dtype) if out is None else out
        start = 0 if rows is None else rows.start or 0
        b0 = vt.block[0]
        where = f"{vt.stored.file}: "
        try:
            weight = self._mapped.view(vt.stored, rows)
            if len(vt.shape) == 2:       # rows of the matrix: the scale rows that cover them
                grid = slice(start // b0, (start + shape[0] - 1) // b0 + 1) if shape[0] else slice(0, 0)
                scales = read_tensor(vt.scale_inv, grid).astype(np.float32)
                return fp8.dequantize(weight, scales, vt.block, dtype, row0=start, name=vt.name, where=where, out=out)
            scales = read_tensor(vt.scale_inv, rows).astype(np.float32)   # rows of the leading axes
            flat_w = weight.reshape(-1, *vt.shape[-2:])
            flat_o, flat_s = out.reshape(-1, *vt.shape[-2:]), scales.reshape(-1, *scales.shape[-2:])
            for w, s, o in zip(flat_w, flat_s, flat_o):
                fp8.dequantize(w, s, vt.block, dtype, name=vt.name, where=where, out=o)
            return out
        finally:
            self._mapped.drop(vt.stored, rows)

    def _decode(self, vt: VirtualTensor, blocks, scales, rows, dtype, out,
                part: tuple[int, int] | None = None) -> np.ndarray:
        """Decode blocks/scales (rows `rows` of `vt`) into HF orientation; only the stored rows
        part[0]::part[1] if `part` is given. Corrupt bytes are reported at their index in `vt`."""
        name = vt.name
        if scales.size and scales.max() in (253, 254):
            _check_no_overflow(blocks, scales, vt.scales, rows)
        if scales.size and scales.max() == 255:
            part = out = None                            # decode the whole, to report the byte where it is
        if part is not None:
            blocks, scales = blocks[..., part[0]::part[1], :, :], scales[..., part[0]::part[1], :]
        try:
            # [e, out, in] decoded straight into [e, in, out] (tiles transposed in cache)
            return mxfp4.dequantize_transposed(blocks, scales, dtype, name=name, workers=self.workers, out=out)
        except CorruptTensorError:
            bad = np.argwhere(scales == 255)
            if not len(bad):
                raise
            idx = tuple(int(i) for i in bad[0])
            idx = (idx[0] + (rows.start if rows is not None else 0),) + idx[1:]
            raise CorruptTensorError(f"{vt.scales.file}: tensor {vt.scales.name!r} has scale byte 255 (NaN in MXFP4) "
                                     f"at index {idx}; the checkpoint is corrupt, re-download it") from None

    def nbytes(self, name: str, itemsize: int = 2) -> int:
        return math.prod(self.tensors[name].shape) * itemsize

    def sidecar_files(self) -> list[Path]:
        """Tokenizer/generation files present (checked at open: none is a link out of the directory)."""
        return [p for p in self._sidecars if p.is_file()]


def _fp8_block(q: dict, path: Path) -> tuple[int, int]:
    """The [b0, b1] of an FP8 quantization_config; refuses what the dequantization would get wrong:
    no or a malformed weight_block_size (per-tensor scales), a format other than E4M3, static
    activation scales (they are part of the model's math and would be dropped)."""
    if not isinstance(q, dict):
        raise InputError(f"{path}: quantization_config must be an object")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and 1 <= b <= 1 << 16 for b in block)):
        raise InputError(f"{path}: quantization_config.weight_block_size={block!r} is not supported (block-scaled "
                         "FP8 needs [rows, cols], e.g. [128, 128])")
    if q.get("fmt", "e4m3") != "e4m3":
        raise InputError(f"{path}: quantization_config.fmt={q['fmt']!r} is not supported (only e4m3)")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise InputError(f"{path}: quantization_config.activation_scheme={q['activation_scheme']!r} is not supported "
                         "(only dynamic: static activation scales would be lost in a BF16 checkpoint)")
    return block[0], block[1]


def _check_no_overflow(blocks: np.ndarray, scales: np.ndarray, info: TensorInfo, rows: slice | None) -> None:
    """Scale bytes 253/254 with a large element decode to |x| >= 2^128: inf in bf16 and fp32.
    The codec (like transformers) would emit inf; a converter must not, so refuse it here."""
    limit = {253: 4.0, 254: 2.0}                     # smallest E2M1 magnitude that overflows
    for g in np.argwhere(scales >= 253):
        group = blocks[tuple(g)]
        mags = np.concatenate([mxfp4.FP4_VALUES[group & 0x7], mxfp4.FP4_VALUES[(group >> 4) & 0x7]])
        if mags.max() >= limit[int(scales[tuple(g)])]:
            idx = (int(g[0]) + (rows.start if rows is not None else 0),) + tuple(int(i) for i in g[1:])
            raise CorruptTensorError(f"{info.file}: tensor {info.name!r} has scale byte "
                                     f"{int(scales[tuple(g)])} at index "
                                     f"{idx}, which decodes to +-inf; the checkpoint is corrupt, re-download it")


def _check_finite(arr: np.ndarray, info: TensorInfo, rows: slice | None) -> None:
    """Refuse NaN/inf in stored float weights (finite.py's bit test: ~memory speed)."""
    if all_finite(arr):
        return
    count, first = nonfinite(arr)
    first = (first[0] + (rows.start if rows is not None else 0),) + first[1:] if first else first
    raise CorruptTensorError(f"{info.file}: tensor {info.name!r} holds {count} NaN/inf value(s) "
                             f"(first at index {first}); pass --allow-nonfinite to convert it anyway")


def open_checkpoint(src: str | os.PathLike, revision: str | None = None) -> HFCheckpoint:
    """Resolve `src` (directory or hub id) and open it."""
    return HFCheckpoint(resolve_source(src, revision))

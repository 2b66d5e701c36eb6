"""An HF checkpoint directory (or hub repo) as a set of lazily read tensors.

MXFP4 pairs `X_blocks` [E, out, G, 16] + `X_scales` [E, out, G] are presented as one virtual
tensor `X` in HF parameter orientation [E, in, out] (in = G * 32), dequantized on read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from gptoss_convert import mxfp4
from gptoss_convert.buffers import as_bits, empty
from gptoss_convert.errors import CorruptTensorError, InputError
from gptoss_convert.io.files import (MAX_INDEX_BYTES, MAX_SIDECAR_BYTES, MAX_TOKENIZER_BYTES, check_size,
                                     read_json_object, read_small)
from gptoss_convert.io.safetensors import MappedFiles, TensorInfo, read_header, read_tensor, rows_shape

# (shape, dtype) -> a C-contiguous array to read into, e.g. BufferPool.get or RecyclingPool.empty
Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files copied next to converted weights; everything else in SRC (original/, metal/) is ignored.
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja")
HUB_PATTERNS = ["config.json", INDEX, "model*.safetensors", *SIDECAR_FILES]
SUPPORTED_QUANT = {"mxfp4"}
BLOCKS, SCALES = "_blocks", "_scales"


@dataclasses.dataclass(frozen=True)
class VirtualTensor:
    """A tensor as the model sees it: stored directly, or an MXFP4 blocks+scales pair."""

    name: str
    shape: tuple[int, ...]
    dtype: str                        # "BF16", ... for stored; "MXFP4" for pairs
    stored: TensorInfo | None = None
    blocks: TensorInfo | None = None
    scales: TensorInfo | None = None

    @property
    def is_mxfp4(self) -> bool:
        return self.blocks is not None

    @property
    def sources(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in (self.stored, self.blocks, self.scales) if t is not None)


def resolve_source(src: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id fetched (or found in the HF cache).

    Only the files a conversion needs are fetched: never `original/` or `metal/`.
    HF_HUB_OFFLINE and HF_HUB_CACHE / HF_HOME are honoured by huggingface_hub itself.
    """
    p = Path(src)
    if p.is_dir():
        return p
    if p.exists() or str(src).startswith((".", "/", "~")) or str(src).count("/") != 1:
        raise InputError(f"{src}: not a directory and not a hub repo id (owner/name)")
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
                    raise CorruptTensorError(f"{self.dir}: tensor {name!r} is stored in both {self.stored[name].file.name} and {f}")
                self.stored[name] = info
        self._check_index()
        self.tensors = self._virtual_tensors()
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
                raise InputError(f"{path}: quant_method {method!r} is not supported (supported: {sorted(SUPPORTED_QUANT)})")
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
            raise CorruptTensorError(f"{self.dir}: incomplete or inconsistent MXFP4 tensors: " + "; ".join(problems))
        return out

    def _pair(self, base: str, blocks: TensorInfo, scales: TensorInfo | None, problems: list[str]):
        if scales is None:
            problems.append(f"{blocks.name!r} has no matching {base + SCALES!r}")
            return None
        if blocks.dtype != "U8" or scales.dtype != "U8":
            problems.append(f"{blocks.name!r}/{scales.name!r} must be U8, got {blocks.dtype}/{scales.dtype}")
            return None
        if len(blocks.shape) < 3 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
            problems.append(f"{blocks.name!r} {list(blocks.shape)} and {scales.name!r} {list(scales.shape)} do not pair as [..., out, G, 16] / [..., out, G]")
            return None
        *lead, out_dim, groups, _ = blocks.shape
        return VirtualTensor(base, (*lead, groups * 32, out_dim), "MXFP4", blocks=blocks, scales=scales)

    # -- reading ----------------------------------------------------------------------------
    @property
    def is_mxfp4(self) -> bool:
        return any(t.is_mxfp4 for t in self.tensors.values())

    def read(self, name: str, rows: slice | None = None, dtype=ml_dtypes.bfloat16, alloc: Alloc | None = None) -> np.ndarray:
        """Tensor `name` in HF orientation, or rows `rows` of its first axis (e.g. experts).

        Stored tensors come back in their stored dtype (bit for bit); MXFP4 pairs are
        dequantized to `dtype` and transposed from [E, out, in] to [E, in, out]. `alloc(shape,
        dtype)`, if given, provides the result's memory (e.g. a buffer pool's).
        """
        vt = self.tensors[name]
        shape = rows_shape(vt.shape, rows)
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
            whole = as_bits(self.read(name, rows, dtype))     # plain-bit copies (bfloat16's own loop is slower)
            outs = [(alloc or empty)(shape, vt.stored.np_dtype) for _ in range(parts)]
            for p, out in enumerate(outs):
                np.copyto(as_bits(out), whole[..., p::parts])
            return outs
        with self._stored_pair(vt, rows) as (blocks, scales):
            return [self._decode(vt, blocks, scales, rows, dtype, alloc and alloc(shape, np.dtype(dtype)), part=(p, parts))
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

    def _decode(self, vt: VirtualTensor, blocks, scales, rows, dtype, out, part: tuple[int, int] | None = None) -> np.ndarray:
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
            raise CorruptTensorError(f"{vt.scales.file}: tensor {vt.scales.name!r} has scale byte 255 (NaN in MXFP4) at "
                                     f"index {idx}; the checkpoint is corrupt, re-download it") from None

    def nbytes(self, name: str, itemsize: int = 2) -> int:
        return math.prod(self.tensors[name].shape) * itemsize

    def sidecar_files(self) -> list[Path]:
        """Tokenizer/generation files present (checked at open: none is a link out of the directory)."""
        return [p for p in self._sidecars if p.is_file()]


# Exponent-all-ones masks: a value is NaN or inf exactly when (bits & mask) == mask.
_EXP_MASK = {"BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00), "F32": (np.uint32, 0x7F800000),
             "F64": (np.uint64, 0x7FF0000000000000)}


def _check_no_overflow(blocks: np.ndarray, scales: np.ndarray, info: TensorInfo, rows: slice | None) -> None:
    """Scale bytes 253/254 with a large element decode to |x| >= 2^128: inf in bf16 and fp32.
    The codec (like transformers) would emit inf; a converter must not, so refuse it here."""
    limit = {253: 4.0, 254: 2.0}                     # smallest E2M1 magnitude that overflows
    for g in np.argwhere(scales >= 253):
        group = blocks[tuple(g)]
        mags = np.concatenate([mxfp4.FP4_VALUES[group & 0x7], mxfp4.FP4_VALUES[(group >> 4) & 0x7]])
        if mags.max() >= limit[int(scales[tuple(g)])]:
            idx = (int(g[0]) + (rows.start if rows is not None else 0),) + tuple(int(i) for i in g[1:])
            raise CorruptTensorError(f"{info.file}: tensor {info.name!r} has scale byte {int(scales[tuple(g)])} at index "
                                     f"{idx}, which decodes to +-inf; the checkpoint is corrupt, re-download it")


_FINITE_CHUNK = 1 << 18


def _check_finite(arr: np.ndarray, info: TensorInfo, rows: slice | None) -> None:
    """Refuse NaN/inf in stored float weights (a bit test: no float conversion, ~memory speed)."""
    if info.dtype not in _EXP_MASK:
        return
    utype, mask = _EXP_MASK[info.dtype]
    bits = arr.reshape(-1).view(utype)
    scratch = np.empty(min(bits.size, _FINITE_CHUNK), utype)   # cache-sized: no big temporaries
    for start in range(0, bits.size, _FINITE_CHUNK):
        chunk = bits[start:start + _FINITE_CHUNK]
        np.bitwise_and(chunk, utype(mask), out=scratch[:chunk.size])
        if (scratch[:chunk.size] == utype(mask)).any():
            break
    else:
        return
    bad = (arr.view(utype) & utype(mask)) == utype(mask)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), arr.shape))
        first = (first[0] + (rows.start if rows is not None else 0),) + first[1:] if first else first
        raise CorruptTensorError(f"{info.file}: tensor {info.name!r} holds {int(bad.sum())} NaN/inf value(s) "
                                 f"(first at index {first}); pass --allow-nonfinite to convert it anyway")


def open_checkpoint(src: str | os.PathLike, revision: str | None = None) -> HFCheckpoint:
    """Resolve `src` (directory or hub id) and open it."""
    return HFCheckpoint(resolve_source(src, revision))

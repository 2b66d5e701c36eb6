"""Orbax checkpoint reader: metadata, lazy per-leaf access and (sharded) restore of params.

Reads what `orbax_writer` writes and what Orbax itself saves (one folder per array or OCDBT).
`read_metadata` and `open_leaf` use TensorStore only, so a verifier can look at one expert of
one layer without loading a 38 GB leaf; `load_params` goes through Orbax's own v0 restore
(`PyTreeCheckpointer` with `partial_restore`), so what it returns is what Orbax users get.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorstore as ts

from gptoss_convert.errors import InputError
from gptoss_convert.io.files import MAX_ORBAX_METADATA_BYTES, read_small
from gptoss_convert.tree import flatten, unflatten
from gptoss_convert.io.orbax_writer import (
    CHECKPOINT_METADATA_FILE,
    COMMIT_SUCCESS_FILE,
    PYTREE_METADATA_FILE,
    TS_CONTEXT,
    array_name,
)
from gptoss_convert.io.location import Location, is_url, resolve, store_context

PREFIX = ("params", "params")  # TrainState.params = {"params": tree} (docs/maxtext.md §1)
NNX_VALUE = ("value",)         # an NNX state's leaves: `<param path>/value` (Tunix's model_params)
NNX_STATE = "rngs"             # NNX rng streams (`.../rngs/<stream>/{key,count}/value`): state, not weights


def _dirs(step_dir, item_name: str) -> tuple[Path, Path]:
    """(step dir, item dir); accepts `<root>/<step>` or, as MaxText does, `<root>/<step>/items`
    (local paths, or gs:// / s3:// URLs and Locations)."""
    path = resolve(step_dir)
    if isinstance(path, Path):
        path = path.absolute()              # Orbax refuses a relative path to an OCDBT checkpoint
    if (path / PYTREE_METADATA_FILE).is_file() or path.name == item_name:
        return path.parent, path
    return path, path / item_name


def _context(where) -> ts.Context:
    return ts.Context(TS_CONTEXT | (store_context() if is_url(where) else {}))


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path} is missing: {what} (a checkpoint whose conversion did not finish "
                         "has no metadata files; run the conversion again to resume it)")
    try:
        meta = json.loads(read_small(path, MAX_ORBAX_METADATA_BYTES, what))
    except (ValueError, RecursionError) as e:        # not JSON, not UTF-8, absurdly deep nesting
        raise InputError(f"{path} is not valid JSON ({type(e).__name__}); the checkpoint is damaged") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: {what} must be a JSON object; the checkpoint is damaged")
    return meta


def tree_keys(meta: dict, path) -> list[tuple[str, ...]]:
    """The leaf key paths of Orbax's `_METADATA` (`tree_metadata`: {..: {"key_metadata": [{"key":
    str}, ..]}}); InputError naming `path` for any other shape, and for a key that is not a plain
    name (empty, '.', '..', holding '/' or NUL: it would name a file outside the item)."""
    tree = meta.get("tree_metadata")
    try:
        keys = [tuple(k["key"] for k in entry["key_metadata"]) for entry in tree.values()]
    except (AttributeError, TypeError, KeyError):
        raise InputError(f"{path}: not readable Orbax tree metadata (tree_metadata must map to key_metadata "
                         "lists of {'key': name}); the checkpoint is damaged") from None
    for k in keys:
        if not k or not all(isinstance(p, str) and p not in ("", ".", "..") and "/" not in p and "\0" not in p
                            for p in k):
            raise InputError(f"{path}: leaf key {list(k)!r} is not a list of plain names (a path out of the "
                             "checkpoint?); the checkpoint is damaged or hostile")
    return keys


def param_keys(keys, prefix: tuple[str, ...], suffix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """{param path: stored key} of the leaves under `prefix`; with an NNX `suffix` (("value",))
    the path drops it, and only leaves that end in it and are not rng state count."""
    out = {}
    for k in keys:
        if k[:len(prefix)] != prefix or len(k) <= len(prefix) + len(suffix):
            continue
        if suffix and (k[len(k) - len(suffix):] != suffix or NNX_STATE in k[len(prefix):]):
            continue
        out["/".join(k[len(prefix):len(k) - len(suffix)])] = tuple(k)
    return out


def _item_leaves(item_dir: Path, prefix: tuple[str, ...], suffix: tuple[str, ...] = ()) -> tuple[dict, bool]:
    """({param path: stored key} of every leaf under `prefix`, whether arrays are zarr3) from `_METADATA`."""
    path = item_dir / PYTREE_METADATA_FILE
    meta = _read_json(path, "Orbax PyTree metadata")
    return param_keys(tree_keys(meta, path), prefix, suffix), bool(meta.get("use_zarr3"))


def _leaf_spec(item_dir: Path, keys: tuple[str, ...], use_zarr3: bool) -> dict:
    """TensorStore spec Orbax reads a leaf with: inside OCDBT if there is a manifest, else a
    folder per array; zarr3 or (Orbax's v0 default) zarr2; a missing chunk is an error."""
    name = array_name(keys)
    if (item_dir / "manifest.ocdbt").is_file():
        base = item_dir.kvstore() if isinstance(item_dir, Location) else {"driver": "file", "path": str(item_dir) + "/"}
        kvstore = {"driver": "ocdbt", "base": base, "path": name}
    elif isinstance(item_dir, Location):
        kvstore = (item_dir / name).kvstore()
    else:
        kvstore = {"driver": "file", "path": str(item_dir / name)}
    return {"driver": "zarr3" if use_zarr3 else "zarr", "kvstore": kvstore, "fill_missing_data_reads": False,
            "recheck_cached_data": False, "recheck_cached_metadata": False}


def read_metadata(step_dir, *, item_name: str = "items", prefix: tuple[str, ...] = PREFIX,
                  suffix: tuple[str, ...] = ()) -> dict:
    """Custom metadata and leaf shapes of a finalized checkpoint step.

    Returns {"custom_metadata": {...} (e.g. {"scan_layers": True}),
             "leaves": {"decoder/decoder_norm/scale": ((H,), dtype), ...}} with paths relative
    to `prefix` (and without an NNX `suffix`, see param_keys). Shapes and dtypes come from each
    array's zarr metadata; no data is read.
    """
    step, item = _dirs(step_dir, item_name)
    meta = _read_json(step / CHECKPOINT_METADATA_FILE, "Orbax step metadata")
    if isinstance(step, Location) and not (step / COMMIT_SUCCESS_FILE).is_file():
        # no rename on object stores: Orbax's commit marker, written last, says the step is whole
        raise InputError(f"{step / COMMIT_SUCCESS_FILE} is missing: the checkpoint's write did not finish "
                         "(rerun the conversion with --resume)")
    keys, use_zarr3 = _item_leaves(item, tuple(prefix), tuple(suffix))
    context = _context(step)
    futures = {p: ts.open(_leaf_spec(item, k, use_zarr3), open=True, read=True, context=context)
               for p, k in keys.items()}
    leaves = {}
    for p, future in futures.items():
        store = future.result()
        leaves[p] = (tuple(store.shape), np.dtype(store.dtype.numpy_dtype))
    return {"custom_metadata": meta.get("custom_metadata") or {}, "leaves": leaves}


def open_leaf(step_dir, path: str, *, item_name: str = "items",
              prefix: tuple[str, ...] = PREFIX, suffix: tuple[str, ...] = ()) -> ts.TensorStore:
    """Open one leaf for lazy reads: `open_leaf(d, "decoder/.../wi_0")[e, s].read().result()`
    reads the chunks of that slice only."""
    _, item = _dirs(step_dir, item_name)
    known, use_zarr3 = _item_leaves(item, tuple(prefix), tuple(suffix))
    if path not in known:
        raise InputError(f"leaf {path!r} is not in the checkpoint at {item}")
    spec = _leaf_spec(item, known[path], use_zarr3)
    return ts.open(spec, open=True, read=True, context=_context(item)).result()


def _check_abstract(flat: dict[str, Any], stored: dict[str, tuple]) -> None:
    """Every requested leaf exists with the requested shape: all mismatches reported at once,
    before any data is read (MaxText checks shapes, not dtypes)."""
    problems = [f"{p}: not in the checkpoint" for p in flat if p not in stored]
    problems += [f"{p}: checkpoint shape {stored[p][0]} != requested {tuple(a.shape)}"
                 for p, a in flat.items() if p in stored and tuple(a.shape) != stored[p][0]]
    if problems:
        raise InputError(f"checkpoint does not match the requested tree ({len(problems)} problem(s)): "
                         + "; ".join(sorted(problems)))


def _restore_args(flat: dict[str, Any], dtype, sharding):
    """Per-leaf Orbax restore args: numpy on the host, or a jax.Array placed by `sharding`."""
    import orbax.checkpoint as ocp  # heavy (pulls in jax); read_metadata/open_leaf do not need it

    if sharding is not None and not callable(sharding):
        sharding = _lookup(flatten(sharding), "sharding tree")
    args = {}
    for path, leaf in flat.items():
        target = np.dtype(dtype) if dtype is not None else np.dtype(leaf.dtype)
        if sharding is None:
            args[path] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=target)
        else:
            args[path] = ocp.ArrayRestoreArgs(sharding=sharding(path), global_shape=tuple(leaf.shape),
                                              dtype=target)
    return args


def _lookup(flat: dict[str, Any], what: str) -> Callable[[str], Any]:
    def get(path: str):
        if path not in flat:
            raise KeyError(f"{what} has no entry for leaf {path!r}")
        return flat[path]
    return get


def _wrap(prefix: tuple[str, ...], tree: dict) -> dict:
    for key in reversed(prefix):
        tree = {key: tree}
    return tree


def _closed_loop_noise(unraisable) -> bool:
    """An `Event loop is closed` RuntimeError raised in a TensorStore completion callback, after an
    Orbax restore that failed closed its asyncio loop with reads still in flight."""
    return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"


def _quiet_closed_loop_callbacks() -> None:
    """Drop (only) that noise: one traceback per read in flight on stderr after a failed restore,
    burying the one-line error. Every other unraisable exception goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_gptoss_quiet", False):
        return

    def hook(unraisable):
        if not _closed_loop_noise(unraisable):
            previous(unraisable)
    hook._gptoss_quiet = True
    sys.unraisablehook = hook


def load_params(step_dir, abstract_tree: dict | None = None, *, dtype=None,
                sharding: dict | Callable[[str], Any] | None = None,
                item_name: str = "items", prefix: tuple[str, ...] = PREFIX, suffix: tuple[str, ...] = ()) -> dict:
    """Restore the params tree (under `prefix`; NNX leaves `<path>/value` with suffix ("value",),
    returned without it) of a checkpoint step as a nested dict.

    abstract_tree: nested dict of objects with .shape/.dtype (e.g. jax.ShapeDtypeStruct) naming
        the leaves to restore (others are skipped); default: every leaf, in its stored dtype.
    dtype: cast every leaf to this dtype; default: the abstract leaf's dtype.
    sharding: a tree of jax.sharding.Sharding matching the restored tree, or a function from a
        leaf path ("decoder/decoder_norm/scale") to one. Leaves then come back as jax.Arrays,
        each device reading only its own slice (no full host copy). Default: numpy arrays.
    """
    import jax  # heavy; read_metadata/open_leaf do not need it
    import orbax.checkpoint as ocp

    if is_url(step_dir):
        return _load_remote(step_dir, abstract_tree, dtype=dtype, sharding=sharding, item_name=item_name, prefix=prefix,
                            suffix=suffix)
    _, item = _dirs(step_dir, item_name)
    stored = read_metadata(step_dir, item_name=item_name, prefix=prefix, suffix=suffix)["leaves"]
    if abstract_tree is None:
        flat = {p: jax.ShapeDtypeStruct(s, t) for p, (s, t) in stored.items()}
    else:
        flat = flatten(abstract_tree)
        _check_abstract(flat, stored)
    args = _restore_args(flat, dtype, sharding)
    tail = "".join("/" + s for s in suffix)

    def stored_tree(leaves: dict) -> dict:
        return _wrap(prefix, unflatten({p + tail: v for p, v in leaves.items()}))
    # partial_restore: the checkpoint may hold more than asked for (as MaxText's loader does).
    restore = ocp.args.PyTreeRestore(item=stored_tree(flat), restore_args=stored_tree(args), partial_restore=True)
    _quiet_closed_loop_callbacks()
    try:
        restored = ocp.PyTreeCheckpointer().restore(item, args=restore)
    except ValueError as e:      # TensorStore's DATA_LOSS / NOT_FOUND: a damaged chunk or metadata file
        raise InputError(f"{item}: cannot read the checkpoint ({' '.join(str(e).split())[:600]}); run "
                         "`gptoss-convert check` on it, then replace or reconvert it") from None
    for key in prefix:
        restored = restored[key]
    if suffix:
        restored = unflatten({p[:len(p) - len(tail)]: v for p, v in flatten(restored).items()})
    return restored


def _load_remote(step_dir, abstract_tree: dict | None, *, dtype, sharding, item_name: str,
                 prefix: tuple[str, ...], suffix: tuple[str, ...] = ()) -> dict:
    """load_params for gs:// and s3://, through the TensorStore specs of `open_leaf` (stock Orbax
    0.12.8 cannot open s3://, orbax#359); numpy leaves only."""
    if sharding is not None:
        raise InputError(f"{step_dir}: sharded restores read local checkpoints only; restore to host "
                         "(no sharding) or copy the checkpoint to a local disk")
    stored = read_metadata(step_dir, item_name=item_name, prefix=prefix, suffix=suffix)["leaves"]
    flat = {p: t for p, (_, t) in stored.items()} if abstract_tree is None else flatten(abstract_tree)
    if abstract_tree is not None:
        _check_abstract(flat, stored)
    futures = {p: open_leaf(step_dir, p, item_name=item_name, prefix=prefix, suffix=suffix).read() for p in flat}
    out = {}
    for path, leaf in flat.items():
        target = np.dtype(dtype) if dtype is not None else np.dtype(getattr(leaf, "dtype", leaf))
        out[path] = np.asarray(futures[path].result()).astype(target, copy=False)
    return unflatten(out)

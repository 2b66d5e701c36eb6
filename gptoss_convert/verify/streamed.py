"""A forward pass over an Orbax checkpoint bigger than RAM: one layer at a time, experts on demand.

This module reads the checkpoint (`LeafReader`: one layer's dense leaves, one expert's slices,
rows of a global leaf, TensorStore partial reads); the model family's backend runs the math
(`Backend.streamed_logits`) and says which leaves are experts.
"""

from __future__ import annotations

import functools

import numpy as np

from gptoss_convert.backends import Backend, backend_for
from gptoss_convert.errors import InputError
from gptoss_convert.io.orbax_reader import open_leaf
from gptoss_convert.mapping.layout import Layout
from gptoss_convert.tree import unflatten


class LeafReader:
    """Reads slices of the checkpoint's leaves as float32 numpy arrays (opened once each)."""

    def __init__(self, step_dir, layout: Layout, dense_leaves: list[str], on_layer=None, experts_read=None):
        self.step_dir, self.layout, self.dense_leaves = step_dir, layout, dense_leaves
        self.on_layer, self.experts_read, self._last = on_layer, experts_read, None
        self.where = getattr(step_dir, "step_dir", step_dir)       # named in errors
        # an OrbaxSource opens leaves in its own layout (io/orbax_source); a step dir, this tool's
        opener = step_dir.store if hasattr(step_dir, "store") else (lambda path: open_leaf(step_dir, path))
        self._open = functools.lru_cache(maxsize=None)(opener)

    def _index(self, layer: int, rel: str, expert: int | None):
        p = self.layout.place(layer, rel, ())
        idx = (slice(None),) if p.slot is None else (slice(None),) * self.layout.axis + (p.slot,)
        if expert is not None:
            idx = (expert,) + idx[1:]
        return p.path, idx

    def _read(self, path: str, view) -> np.ndarray:
        """`view(leaf)` read as float32; a chunk TensorStore cannot decode (DATA_LOSS: a damaged
        or truncated file) is refused naming the leaf, as the whole-model loader does."""
        try:
            return np.asarray(view(self._open(path)).read().result(), np.float32)
        except ValueError as e:
            raise InputError(f"{self.where}: cannot read {path} ({' '.join(str(e).split())[:400]}); run "
                             "`gptoss-convert check` on it, then replace or reconvert it") from None

    def layer(self, layer: int, rel: str, expert: int | None = None) -> np.ndarray:
        """Leaf `rel` of layer `layer` (unscanned shape), or only expert `expert`'s slice of it."""
        path, idx = self._index(layer, rel, expert)
        if expert is not None and self.experts_read is not None:
            self.experts_read[layer].add(int(expert))
        return self._read(path, lambda leaf: leaf[idx])

    def dense_layer(self, layer: int) -> dict:
        """Everything of layer `layer` except the expert matrices, as a nested dict. Reading it
        means the previous layer is done: `on_layer(previous)` is called (progress)."""
        if self.on_layer is not None and self._last is not None:
            self.on_layer(self._last)
        self._last = layer
        return unflatten({rel: self.layer(layer, rel) for rel in self.dense_leaves})

    def leaf(self, path: str, index=()) -> np.ndarray:
        return self._read(path, lambda leaf: leaf[index])

    def rows(self, path: str, rows: np.ndarray) -> np.ndarray:
        return self._read(path, lambda leaf: leaf.oindex[rows])


def streamed_logits(step_dir, cfg, scanned: bool, tokens: np.ndarray, mask: np.ndarray, *,
                    vocab_block: int = 16384, backend: Backend | None = None, on_layer=None,
                    experts_read: list[set] | None = None) -> list[np.ndarray]:
    """fp32 logits of right-padded `tokens` [B, T] (`mask` 1 = real token) from the Orbax step
    `step_dir`: one [len_b, V] array per row, for the real tokens only. `backend` defaults to the
    family whose config `cfg` is. `on_layer(i)` is called as each layer finishes (progress);
    `experts_read[i]` collects the experts layer i read (= the ones real tokens were routed to)."""
    backend = backend or backend_for(cfg)
    dense = [rel for rel in backend.layer_leaves if rel not in backend.expert_leaves]
    reader = LeafReader(step_dir, backend.layout_for(cfg, scanned), dense, on_layer, experts_read)
    logits = backend.streamed_logits(reader, cfg, tokens, mask, vocab_block=vocab_block)
    if on_layer is not None and reader._last is not None:
        on_layer(reader._last)
    return logits

"""Sharding of a MaxText parameter tree from a family's leaf tables (mapping.leaves.Leaf axes):
the same rule for every family, so a family gets sharded restore and forward by its tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_convert.mapping.leaves import Leaf, leaf_axes


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh, global_leaves: Mapping[str, Leaf],
                   layer_leaves: Mapping[str, Leaf]) -> PartitionSpec:
    """PartitionSpec for the leaf at `path` (a `flat_shapes` path) with global `shape`.

    A mesh axis is used only if the mesh has it and it divides that dimension; otherwise the
    dimension is replicated (e.g. 5 experts on a 4-way expert axis). Scanned leaves get None on
    the stack axis.
    """
    axes = leaf_axes(path, global_leaves, layer_leaves)
    if axes is None:
        raise ValueError(f"{path}: no sharding rule for this leaf (not a MaxText parameter path of this model family)")
    if len(axes) != len(shape):
        raise ValueError(f"{path}: shape {shape} does not match the sharding rule {tuple(axes)}")
    sizes = dict(mesh.shape)   # works for Mesh and AbstractMesh
    return PartitionSpec(*(a if a in sizes and dim % sizes[a] == 0 else None for a, dim in zip(axes, shape)))


def param_shardings(abstract_tree: dict[str, Any], mesh: Mesh, global_leaves: Mapping[str, Leaf],
                    layer_leaves: Mapping[str, Leaf]) -> dict[str, Any]:
    """Same-structure tree of NamedSharding for a parameter tree (arrays or ShapeDtypeStructs)."""
    def walk(node, prefix):
        if isinstance(node, dict):
            return {k: walk(v, f"{prefix}/{k}" if prefix else k) for k, v in node.items()}
        return NamedSharding(mesh, partition_spec(prefix, tuple(node.shape), mesh, global_leaves, layer_leaves))
    return walk(abstract_tree, "")

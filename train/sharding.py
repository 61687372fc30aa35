"""Logical axis names -> mesh shardings, through a rules table handed in by the caller.

The model names what each dimension is ("embed", "heads", ...); the rules say which
mesh axes split it. A mesh axis is used at most once per array, and an axis that does
not divide a dimension is left out (that dimension is replicated over it) rather than
failing: vocabularies like GPT-2's 50257 are odd.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import jax
import qwix
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.layers import activation_sharding

Rules = Mapping[str, str | tuple[str, ...] | list[str] | None]

log = logging.getLogger(__name__)


def _as_tuple(target) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def mesh_spec(logical: PartitionSpec | tuple, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> PartitionSpec:
    used: set[str] = set()
    dims = []
    for name, size in zip(tuple(logical), shape, strict=True):
        axes = [a for a in _as_tuple(rules.get(name)) if a not in used] if name else []
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            log.warning("mesh axis %s does not divide %s=%d; replicating that dimension over it", axes[-1], name, size)
            axes.pop()
        used.update(axes)
        dims.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*dims)


def tree_shardings(logical_specs, shapes, mesh: Mesh, rules: Rules):
    """NamedShardings for a tree of arrays, given the matching tree of logical PartitionSpecs.

    A quantized weight (qwix QArray) shards its values like the weight; its scales follow
    on the dimensions they share with it whole, and are replicated on reduced ones.
    """
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731

    def sharding(spec, s):
        if isinstance(s, qwix.QArray):
            full = s.qvalue.shape
            return jax.tree.map(
                lambda part: sharding(PartitionSpec(*(n if d == f else None for n, d, f in zip(spec, part.shape, full))),
                                      part),
                s,
            )
        return NamedSharding(mesh, mesh_spec(spec, s.shape, mesh, rules))

    return jax.tree.map(sharding, logical_specs, shapes, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of [batch, length] arrays: the batch split over the rules' batch axes."""
    return NamedSharding(mesh, PartitionSpec(tuple(_as_tuple(rules.get("batch"))) or None, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def activation_rules(mesh, rules: Rules):
    """The model's activation hints resolved through the same rules as its parameters."""
    return activation_sharding(lambda axes, shape: NamedSharding(mesh, mesh_spec(PartitionSpec(*axes), shape, mesh, rules)))

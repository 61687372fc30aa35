"""Logical axis names -> mesh shardings, through a rules table handed in by the caller.

The model names what each dimension is ("embed", "heads", ...); the rules say which
mesh axes split it. A mesh axis is used at most once per array, and an axis that does
not divide a dimension is left out (that dimension is replicated over it) rather than
failing: vocabularies like GPT-2's 50257 are odd. What the rules asked for and the
shapes did not allow is reported (`unsplit_dimensions`): in a run's start-up summary,
as comments at the top of its config.yaml, and in a plan's notes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import qwix
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.layers import activation_sharding

Rules = Mapping[str, str | tuple[str, ...] | list[str] | None]


def _as_tuple(target) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def _split(logical: PartitionSpec | tuple, shape: tuple[int, ...], mesh: Mesh, rules: Rules):
    """(the PartitionSpec, what the rules asked for that this shape did not allow, in words)."""
    used: set[str] = set()
    dims, unsplit = [], []
    for name, size in zip(tuple(logical), shape, strict=True):
        wanted = list(_as_tuple(rules.get(name))) if name else []
        axes = [a for a in wanted if a not in used]
        unsplit += [f"{name} ({size}) is not split over {a}: {a} already splits another dimension of the array"
                    for a in wanted if a in used and mesh.shape[a] > 1]
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            if mesh.shape[axes[-1]] > 1:
                unsplit.append(f"{name} ({size}) is not split over {axes[-1]}: {' x '.join(axes)} "
                               f"({math.prod(mesh.shape[a] for a in axes)} devices) do not divide it")
            axes.pop()
        used.update(axes)
        dims.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*dims), unsplit


def mesh_spec(logical: PartitionSpec | tuple, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> PartitionSpec:
    return _split(logical, shape, mesh, rules)[0]


def unsplit_dimensions(logical_specs, shapes, mesh: Mesh, rules: Rules) -> list[str]:
    """Every way the parameters' layout falls short of the rules (each dimension stays whole over the mesh
    axes named), once per distinct case: a layout the user did not ask for is reported, not hidden."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    found: set[str] = set()

    def note(spec, s):
        found.update(_split(spec, s.qvalue.shape if isinstance(s, qwix.QArray) else s.shape, mesh, rules)[1])

    jax.tree.map(note, logical_specs, shapes, is_leaf=is_spec)
    return sorted(found)


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
    """Sharding of batch arrays ([batch, ...], any rank): the batch split over the rules' batch axes."""
    return NamedSharding(mesh, PartitionSpec(tuple(_as_tuple(rules.get("batch"))) or None))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch is split: a batch of rows must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in set(batch_sharding(mesh, rules).spec[0] or ()))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def activation_rules(mesh, rules: Rules):
    """The model's activation hints resolved through the same rules as its parameters."""
    return activation_sharding(lambda axes, shape: NamedSharding(mesh, mesh_spec(PartitionSpec(*axes), shape, mesh, rules)))

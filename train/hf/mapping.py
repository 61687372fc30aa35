"""How a Hugging Face tensor becomes a Tessera parameter and back: one `Rule` per group of tensors that map
onto each other, and the transforms they use.

A rule names Tessera leaves (paths inside the parameter tree; inside one layer for layer rules) and HF tensor
name templates (`{i}` the HF layer index, `{e}` the expert index when `per_expert`), with `load` (HF arrays ->
Tessera arrays) and `save` (the inverse). Transforms use only array methods and `_xp`, so `jax.eval_shape` runs
`save` to learn the HF shapes a config implies without touching any data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Arrays = list  # of np.ndarray (or tracers under eval_shape)


@dataclass(frozen=True)
class Rule:
    tessera: tuple[str, ...]
    hf: tuple[str, ...]
    load: Callable[[Arrays], Arrays]
    save: Callable[[Arrays], Arrays]
    per_expert: bool = False  # `hf` is expanded over experts, expert-major; load gets every expert's arrays

    def hf_names(self, prefix: str, layer: int | None, experts: int = 0) -> list[str]:
        if not self.per_expert:
            return [t.format(p=prefix, i=layer) for t in self.hf]
        return [t.format(p=prefix, i=layer, e=e) for e in range(experts) for t in self.hf]


def _xp(a):
    return jnp if isinstance(a, jax.core.Tracer) else np


def same(tessera: str, hf: str) -> Rule:
    """Stored the same way on both sides (norm scales, biases of the residual width, embedding tables)."""
    return Rule((tessera,), (hf,), lambda a: a, lambda a: a)


def transposed(tessera: str, hf: str) -> Rule:
    """A torch Linear weight [out, in] against Tessera's [in, out]."""
    return Rule((tessera,), (hf,), lambda a: [a[0].T], lambda a: [a[0].T])


def heads_in(tessera: str, hf: str, heads: int, head_dim: int) -> Rule:
    """A query/key/value projection: torch [heads*head_dim, d] against Tessera [d, heads, head_dim]. Tessera's
    rotary layout is HF's (rotate-half), so no interleave permutation is needed."""
    return Rule((tessera,), (hf,), lambda a: [a[0].T.reshape(-1, heads, head_dim)],
                lambda a: [a[0].reshape(a[0].shape[0], heads * head_dim).T])


def heads_out(tessera: str, hf: str, heads: int, head_dim: int) -> Rule:
    """The attention output projection: torch [d, heads*head_dim] against Tessera [heads, head_dim, d]."""
    return Rule((tessera,), (hf,), lambda a: [a[0].T.reshape(heads, head_dim, -1)],
                lambda a: [a[0].reshape(heads * head_dim, -1).T])


def head_bias(tessera: str, hf: str, heads: int, head_dim: int) -> Rule:
    return Rule((tessera,), (hf,), lambda a: [a[0].reshape(heads, head_dim)], lambda a: [a[0].reshape(-1)])


def fused_qkv(tessera: tuple[str, str, str], hf: str, heads: int, head_dim: int, bias: bool) -> Rule:
    """GPT-2's c_attn: one Conv1D [d, 3*d] (already [in, out]) or bias [3*d] holding q, k and v side by side."""
    width = heads * head_dim
    if bias:
        def load(a):
            return [a[0][k * width:(k + 1) * width].reshape(heads, head_dim) for k in range(3)]

        def save(a):
            return [_xp(a[0]).concatenate([x.reshape(-1) for x in a])]
    else:
        def load(a):
            return [a[0][:, k * width:(k + 1) * width].reshape(-1, heads, head_dim) for k in range(3)]

        def save(a):
            return [_xp(a[0]).concatenate([x.reshape(x.shape[0], width) for x in a], axis=1)]
    return Rule(tessera, (hf,), load, save)


def conv1d_out(tessera: str, hf: str, heads: int, head_dim: int) -> Rule:
    """GPT-2's attention c_proj: Conv1D [heads*head_dim, d] against Tessera [heads, head_dim, d]."""
    return Rule((tessera,), (hf,), lambda a: [a[0].reshape(heads, head_dim, -1)],
                lambda a: [a[0].reshape(heads * head_dim, -1)])


def patch_conv(tessera: str, hf: str, patch: int, channels: int) -> Rule:
    """A vision transformer's patch embedding: torch Conv2d [d, channels, patch, patch] (stride = patch) against
    Tessera's matmul [patch*patch*channels, d] over patches flattened (row, column, channel)."""
    return Rule((tessera,), (hf,), lambda a: [a[0].transpose(2, 3, 1, 0).reshape(patch * patch * channels, -1)],
                lambda a: [a[0].reshape(patch, patch, channels, -1).transpose(3, 2, 0, 1)])


def experts_each(tessera: str, hf: str) -> Rule:
    """Mixtral's per-expert torch Linears (w1/w3 [f, d], w2 [d, f]) stacked into Tessera [E, d, f] / [E, f, d]."""
    return Rule((tessera,), (hf,), lambda a: [_xp(a[0]).stack([w.T for w in a])],
                lambda a: [w.T for w in a[0]], per_expert=True)


def experts_fused_gate_up(tessera: tuple[str, str], hf: str) -> Rule:
    """The fused expert layout: gate_up_proj [E, 2f, d], gate rows first, against Tessera's wg and wi [E, d, f]."""
    def load(a):
        f = a[0].shape[1] // 2
        return [a[0][:, :f].transpose(0, 2, 1), a[0][:, f:].transpose(0, 2, 1)]

    def save(a):
        return [_xp(a[0]).concatenate([a[0].transpose(0, 2, 1), a[1].transpose(0, 2, 1)], axis=1)]
    return Rule(tessera, (hf,), load, save)


def experts_fused_down(tessera: str, hf: str) -> Rule:
    """The fused layout's down_proj [E, d, f] against Tessera's wo [E, f, d]."""
    return Rule((tessera,), (hf,), lambda a: [a[0].transpose(0, 2, 1)], lambda a: [a[0].transpose(0, 2, 1)])

"""Which keys each query may attend to, described rather than materialised.

Every attention implementation takes the same description: the documents (segment ids) of the
queries and of the keys, a causal flag, an optional sliding window, and where the queries stand
among the keys. A query at slot i may attend to the key at slot j when

    q_segments[i] == kv_segments[j]                  (same document; padding is segment 0)
    and (not causal or j <= i + q_offset)            (no look-ahead)
    and (window is None or i + q_offset - j < window) (the `window` latest keys, itself included)

Training and prefill have q_offset 0 (a Python int: kernels may skip whole blocks statically);
decoding from a cache has q_offset = the cache slot of the first new token (traced), and the
cache's valid range as kv_segments (slots before a row's first real token are 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class AttentionMask:
    q_segments: jax.Array  # [batch, q] int
    kv_segments: jax.Array  # [batch, keys] int
    causal: bool
    window: int | None = None
    q_offset: Any = 0  # int (static) or a traced int32 scalar

    @property
    def static_offset(self) -> bool:
        return isinstance(self.q_offset, int)

    def allows(self, q_index: jax.Array, kv_index: jax.Array, q_segments=None, kv_segments=None) -> jax.Array:
        """[batch, len(q_index), len(kv_index)] bool for query slots q_index and key slots kv_index; the
        segments of exactly those slots may be given (a kernel's block), else they are taken by index."""
        q_seg = self.q_segments[:, q_index] if q_segments is None else q_segments
        kv_seg = self.kv_segments[:, kv_index] if kv_segments is None else kv_segments
        allowed = q_seg[:, :, None] == kv_seg[:, None, :]
        query = (q_index + self.q_offset)[:, None]
        if self.causal:
            allowed &= (kv_index[None, :] <= query)[None]
        if self.window is not None:
            allowed &= (query - kv_index[None, :] < self.window)[None]
        return allowed


def segments_from_start(start: jax.Array, slots: jax.Array) -> jax.Array:
    """Segments of the given cache slots in left-padded rows: 1 from each row's first real slot `start[b]` on,
    0 (padding) before it. -> [batch, len(slots)]"""
    return (slots[None, :] >= start[:, None]).astype(jnp.int32)

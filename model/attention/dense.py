"""Dense attention: every score materialised ([batch, kv heads, groups, queries, keys] in float32), masked,
softmaxed. The reference the other implementations are held to, and the fastest at short lengths on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.attention.mask import AttentionMask

MASKED = jnp.finfo(jnp.float32).min


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float) -> jax.Array:
    """q [b, q, heads, d], k [b, s, kv_heads, d], v [b, s, kv_heads, dv] -> [b, q, heads, dv] in q's dtype.

    Query heads are grouped under the key/value head they share (GQA); groups=1 is plain multi-head."""
    b, lq, heads, d = q.shape
    lk, kv_heads = k.shape[1], k.shape[2]
    q = q.reshape(b, lq, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    allowed = mask.allows(jnp.arange(lq), jnp.arange(lk))
    scores = jnp.where(allowed[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, lq, heads, v.shape[-1])

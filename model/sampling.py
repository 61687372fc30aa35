"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, in that order.

Every knob is a per-row array, not a compile-time constant, so one compiled decode
loop serves any mix of settings. Randomness comes only from each row's own key, so a
row's output depends on its seed and not on what else shares the batch (one exception:
a capacity-dispatch MoE model's expert capacity follows the padded prompt width).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


class Sampling(NamedTuple):
    """Per-row sampling settings; temperature 0 means greedy, top_k 0 and top_p 1 mean off."""

    temperature: jax.Array  # [batch] float32, >= 0
    top_k: jax.Array  # [batch] int32, >= 0
    top_p: jax.Array  # [batch] float32, in (0, 1]


def top_k_filter(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keep each row's k largest logits (k=0 keeps all; ties with the k-th are kept)."""
    descending = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(descending, jnp.clip(k - 1, 0, logits.shape[-1] - 1)[:, None], axis=-1)
    return jnp.where((k[:, None] > 0) & (logits < kth), NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches p (the nucleus)."""
    probs = jax.nn.softmax(logits, axis=-1)
    descending = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(descending, axis=-1) - descending
    # The smallest kept probability: a token is kept if the mass of the tokens above it is below p.
    kept = jnp.where(mass_before < p[:, None], descending, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    # p = 1 is exactly off: a float32 running sum can reach 1 before the smallest probabilities.
    return jnp.where((probs < threshold) & (p[:, None] < 1), NEG_INF, logits)


def processed_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p (the order of most serving stacks); float32 [batch, vocab]."""
    scaled = logits.astype(jnp.float32) / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    return top_p_filter(top_k_filter(scaled, s.top_k), s.top_p)


def sample_tokens(keys: jax.Array, logits: jax.Array, s: Sampling, allowed: jax.Array | None = None) -> jax.Array:
    """One token per row [batch] int32. `allowed` [batch, vocab] masks tokens out before anything else
    (constrained decoding); rows with temperature 0 take the most likely allowed token."""
    logits = logits.astype(jnp.float32)
    if allowed is not None:
        logits = jnp.where(allowed, logits, NEG_INF)
    sampled = jax.vmap(jax.random.categorical)(keys, processed_logits(logits, s))
    return jnp.where(s.temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)

"""Blockwise (flash-style) attention in plain JAX: memory O(length x block), not O(length^2).

Queries are taken a block at a time (a Python loop: each block's key range is known statically), and
for each, the key blocks it can see are scanned with an online softmax (running max, running sum, the
weighted values accumulated in float32). Blocks entirely above the causal diagonal, or entirely out
of the sliding window, are skipped statically: not computed and masked. Segment ids are masked inside
a block (skipping on them would be data-dependent over a batched dimension: a select in XLA, no saving).

The backward pass (`jax.custom_vjp`) saves only the output and each query's log-sum-exp, and recomputes
every block's probabilities from them (FlashAttention-2's backward): no score matrix is ever kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from model.attention.dense import MASKED
from model.attention.mask import AttentionMask

Q_PAD, KV_PAD = -1, -2  # segment ids of padding rows: they never match each other or a real segment


@dataclass(frozen=True)
class Blocks:
    """The static shape of one blockwise attention: what every block's mask and range depend on."""

    q_block: int
    kv_block: int
    q_blocks: int
    kv_blocks: int
    causal: bool
    window: int | None
    q_offset: int
    scale: float

    def kv_range(self, i: int) -> tuple[int, int]:
        """Key blocks [lo, hi) that query block i may see: none above the diagonal, none out of the window."""
        first_query, last_query = i * self.q_block + self.q_offset, (i + 1) * self.q_block - 1 + self.q_offset
        hi = self.kv_blocks if not self.causal else min(self.kv_blocks, last_query // self.kv_block + 1)
        lo = 0 if self.window is None else max(0, (first_query - self.window + 1) // self.kv_block)
        return lo, max(hi, lo)

    def computed_fraction(self) -> float:
        """The share of all (query block, key block) pairs that are computed."""
        return sum(hi - lo for lo, hi in map(self.kv_range, range(self.q_blocks))) / (self.q_blocks * self.kv_blocks)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float,
                        block: int) -> jax.Array:
    """Same contract as `dense_attention`; the mask's q_offset must be static (training and prefill)."""
    b, lq, heads, d = q.shape
    lk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
    blocks = blocks_for(lq, lk, mask, scale, block)
    q_pad, kv_pad = blocks.q_blocks * blocks.q_block - lq, blocks.kv_blocks * blocks.kv_block - lk
    q = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, 0))).reshape(b, lq + q_pad, kv_heads, heads // kv_heads, d)
    k, v = (jnp.pad(a, ((0, 0), (0, kv_pad), (0, 0), (0, 0))) for a in (k, v))
    q_seg = jnp.pad(mask.q_segments, ((0, 0), (0, q_pad)), constant_values=Q_PAD)
    kv_seg = jnp.pad(mask.kv_segments, ((0, 0), (0, kv_pad)), constant_values=KV_PAD)
    out = _flash(blocks, q, k, v, q_seg, kv_seg)
    return out[:, :lq].reshape(b, lq, heads, dv)


def blocks_for(lq: int, lk: int, mask: AttentionMask, scale: float, block: int) -> Blocks:
    if not mask.static_offset:
        raise ValueError("blockwise attention needs a static query offset (training or prefill)")
    q_block, kv_block = min(block, lq), min(block, lk)
    return Blocks(q_block, kv_block, -(-lq // q_block), -(-lk // kv_block), mask.causal, mask.window,
                  mask.q_offset, scale)


def _block_mask(blocks: Blocks, i: int, j, q_seg_i, kv_seg_j):
    """[b, q_block, kv_block] bool for query block i against key block j (j may be traced)."""
    q_index = i * blocks.q_block + jnp.arange(blocks.q_block)
    kv_index = j * blocks.kv_block + jnp.arange(blocks.kv_block)
    mask = AttentionMask(q_seg_i, kv_seg_j, blocks.causal, blocks.window, blocks.q_offset)
    return mask.allows(q_index, kv_index, q_seg_i, kv_seg_j)


def _kv_block(a: jax.Array, j, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, j * size, size, axis=1)


def _scores(blocks: Blocks, i: int, j, qi, kj, q_seg_i, kv_seg):
    """Scaled, masked float32 scores [b, kv_heads, groups, q_block, kv_block] of query block i and key block j."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * blocks.scale
    allowed = _block_mask(blocks, i, j, q_seg_i, _kv_block(kv_seg, j, blocks.kv_block))
    return jnp.where(allowed[:, None, None], s, MASKED)


def _forward(blocks: Blocks, q, k, v, q_seg, kv_seg):
    """-> (out [b, q, kv_heads, groups, dv] in q's dtype, log-sum-exp [b, kv_heads, groups, q] float32)."""
    b, _, kv_heads, groups, _ = q.shape
    dv, bq = v.shape[-1], blocks.q_block
    outs, lses = [], []
    for i in range(blocks.q_blocks):
        qi, q_seg_i = q[:, i * bq:(i + 1) * bq], q_seg[:, i * bq:(i + 1) * bq]

        def step(carry, j, qi=qi, q_seg_i=q_seg_i, i=i):
            m, l, acc = carry
            s = _scores(blocks, i, j, qi, _kv_block(k, j, blocks.kv_block), q_seg_i, kv_seg)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), _kv_block(v, j, blocks.kv_block),
                            preferred_element_type=jnp.float32)
            return (m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + pv), None

        stats = (b, kv_heads, groups, bq)
        init = (jnp.full(stats, MASKED), jnp.zeros(stats), jnp.zeros((*stats, dv)))
        (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(*blocks.kv_range(i)))
        outs.append((acc / l[..., None]).transpose(0, 3, 1, 2, 4).astype(q.dtype))
        lses.append(m + jnp.log(l))
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(blocks: Blocks, q, k, v, q_seg, kv_seg):
    return _forward(blocks, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(blocks: Blocks, q, k, v, q_seg, kv_seg):
    out, lse = _forward(blocks, q, k, v, q_seg, kv_seg)
    return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(blocks: Blocks, residuals, d_out):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    bq, bk = blocks.q_block, blocks.kv_block
    # D_i = sum_d dO_i * O_i: the softmax backward's row term, one per query.
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for i in range(blocks.q_blocks):
        rows = slice(i * bq, (i + 1) * bq)
        qi, doi, q_seg_i = q[:, rows], d_out[:, rows], q_seg[:, rows]
        lse_i, delta_i = lse[..., rows], delta[..., rows]

        def step(carry, j, qi=qi, doi=doi, q_seg_i=q_seg_i, lse_i=lse_i, delta_i=delta_i, i=i):
            dqi, dk, dv = carry
            kj, vj = _kv_block(k, j, bk), _kv_block(v, j, bk)
            p = jnp.exp(_scores(blocks, i, j, qi, kj, q_seg_i, kv_seg) - lse_i[..., None])
            dv_j = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * blocks.scale).astype(qi.dtype)
            dqi = dqi + jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, _kv_block(dk, j, bk) + dk_j, j * bk, axis=1)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, _kv_block(dv, j, bk) + dv_j, j * bk, axis=1)
            return (dqi, dk, dv), None

        (dqi, dk, dv), _ = jax.lax.scan(step, (jnp.zeros(qi.shape, jnp.float32), dk, dv),
                                        jnp.arange(*blocks.kv_range(i)))
        dqs.append(dqi)
    dq = jnp.concatenate(dqs, axis=1)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)

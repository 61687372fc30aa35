"""One attention function, `attend`, and the choice of implementation behind it (`model.attention`).

- dense: every score materialised; the reference.
- blockwise: flash-style in plain JAX, memory O(length x block), causal blocks skipped (blockwise.py).
- splash: TPU Pallas splash attention (splash.py).
- cudnn: GPU fused attention through cuDNN (cudnn.py); chosen only when asked for, until it has run on a GPU.
- auto: TPU -> splash (where its shapes fit), GPU -> blockwise, CPU -> dense up to CPU_BLOCKWISE_FROM keys and
  blockwise from there (the measured crossover, below).

Decoding from a cache (one new token, a traced query offset) always takes dense: one row of scores over
the cache is all there is to compute.
"""

from __future__ import annotations

from typing import Literal

import jax

from model.attention.blockwise import blockwise_attention
from model.attention.cudnn import cudnn_attention
from model.attention.dense import dense_attention
from model.attention.mask import AttentionMask
from model.attention.splash import splash_attention, splash_fits
from model.layers import tracing_platform

Implementation = Literal["auto", "dense", "blockwise", "splash", "cudnn"]

# Forward and backward of one layer's attention on 2 CPU cores (d_model 512, 8 heads, batch 1, float32,
# the CLI's XLA:CPU flags): dense is 1.1x faster at 128-512 keys, blockwise (512-key blocks) 2.6x at 1024
# and 4.3x at 2048 (bench/attention.py).
CPU_BLOCKWISE_FROM = 1024


def implementation(choice: Implementation, platform: str, lq: int, lk: int, static_offset: bool = True) -> str:
    """The implementation `choice` means for these shapes on this platform (static_offset: training or
    prefill; decoding from a cache is always dense)."""
    if not static_offset:
        return "dense"
    if choice != "auto":
        return choice
    if platform == "tpu":
        return "splash" if splash_fits(lq, lk) else "dense"
    if platform == "gpu":
        return "blockwise"
    return "blockwise" if lk >= CPU_BLOCKWISE_FROM else "dense"


def training_kernel(cfg, platform: str, seq_len: int) -> str:
    """The implementation a training step of this model runs on `platform` at `seq_len` (for the counts)."""
    return implementation(cfg.attention, platform, seq_len, seq_len)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, choice: Implementation = "auto",
           block: int = 512, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale, masked) v: q [b, q, heads, d], k [b, keys, kv_heads, d], v [b, keys, kv_heads, dv]
    -> [b, q, heads, dv] in q's dtype. Scores and softmax are float32 whatever the compute dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    platform = tracing_platform()
    chosen = implementation(choice, platform, q.shape[1], k.shape[1], mask.static_offset and mask.q_offset == 0)
    if chosen == "blockwise":
        return blockwise_attention(q, k, v, mask, scale, block)
    if chosen == "splash":
        if not splash_fits(q.shape[1], k.shape[1]):
            raise ValueError(f"splash attention needs lengths that are multiples of 128, got {q.shape[1]}")
        return splash_attention(q, k, v, mask, scale, interpret=platform != "tpu")
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, mask, scale)
    return dense_attention(q, k, v, mask, scale)

"""One attention function, `attend`, and the choice of implementation behind it (`model.attention`).

- dense: every score materialised; the reference.
- blockwise: flash-style in plain JAX, memory O(length x block), causal blocks skipped (blockwise.py).
- splash: TPU Pallas splash attention (splash.py).
- cudnn: GPU fused attention through cuDNN (cudnn.py); chosen only when asked for, until it has run on a GPU.
- auto: TPU -> splash, GPU -> blockwise (a choice not yet measured on a GPU), CPU -> dense up to
  CPU_BLOCKWISE_FROM keys and blockwise from there (the measured crossover, below).

Shapes a kernel does not take run dense, whatever was chosen (`fits`): decoding from a cache (one new
token at a traced offset: one row of scores over the cache is all there is to compute), splash at lengths
that are not multiples of 128, cuDNN on a prompt prefilled into a longer cache.
"""

from __future__ import annotations

import jax

from model.attention.blockwise import blockwise_attention
from model.attention.cudnn import cudnn_attention
from model.attention.dense import dense_attention
from model.attention.mask import AttentionMask
from model.attention.splash import splash_attention, splash_fits
from model.config import AttentionImpl
from model.layers import tracing_platform

# Forward and backward of one layer's attention on 2 CPU cores (d_model 512, 8 heads, batch 1, float32,
# the CLI's XLA:CPU flags): dense is 1.1x faster at 128-512 keys, blockwise (512-key blocks) 2.6x at 1024
# and 4.3x at 2048 (bench/attention.py).
CPU_BLOCKWISE_FROM = 1024


def fits(kernel: str, lq: int, lk: int, q_offset: int | None) -> bool:
    """Whether `kernel` takes these shapes. q_offset: the first query's position among the keys, None when
    traced (decoding from a cache). Splash takes lengths in multiples of 128 from offset 0; cuDNN here
    takes query and key rows of the same slots (training, prefill); blockwise any static offset."""
    if kernel == "dense":
        return True
    if q_offset is None:
        return False
    if kernel == "splash":
        return q_offset == 0 and splash_fits(lq, lk)
    if kernel == "cudnn":
        return q_offset == 0 and lq == lk
    return kernel == "blockwise"


def implementation(choice: AttentionImpl, platform: str, lq: int, lk: int, q_offset: int | None = 0) -> str:
    """The implementation `choice` means for these shapes on this platform: `auto` picks per platform (the
    module's docstring); any choice whose kernel does not take the shapes (`fits`) runs dense, so that one
    model.attention serves training, prefill and decoding alike."""
    if choice == "auto":
        if platform == "tpu":
            choice = "splash"
        elif platform == "gpu":
            choice = "blockwise"
        else:
            choice = "blockwise" if lk >= CPU_BLOCKWISE_FROM else "dense"
    return choice if fits(choice, lq, lk, q_offset) else "dense"


def training_kernel(cfg, platform: str, seq_len: int) -> str:
    """The implementation a training step of this model runs on `platform` at `seq_len` (for the counts)."""
    return implementation(cfg.attention, platform, seq_len, seq_len)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, choice: AttentionImpl = "auto",
           block: int = 512, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale, masked) v: q [b, q, heads, d], k [b, keys, kv_heads, d], v [b, keys, kv_heads, dv]
    -> [b, q, heads, dv] in q's dtype. Scores and softmax are float32 whatever the compute dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    platform = tracing_platform()
    q_offset = mask.q_offset if mask.static_offset else None
    chosen = implementation(choice, platform, q.shape[1], k.shape[1], q_offset)
    if chosen == "blockwise":
        return blockwise_attention(q, k, v, mask, scale, block)
    if chosen == "splash":
        return splash_attention(q, k, v, mask, scale, interpret=platform != "tpu")
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, mask, scale)
    return dense_attention(q, k, v, mask, scale)

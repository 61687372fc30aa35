"""TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention): a Pallas kernel that takes
segment ids and a causal (or local) mask, skips masked blocks itself, and has its own backward kernels.

Chosen over tokamax because it ships with jax: nothing to pin beside it, and it compiles ahead of time
for TPU topologies through libtpu like the rest of the step. Off TPU it runs in Pallas's interpreter,
which is how the tests check it on CPU (slowly; never chosen there by `auto`).

The kernel sees one example: [heads, length, head_dim]. On a mesh it runs under `shard_map`, each device
on its own rows (the batch axes) and heads (the tensor axis, where query and key heads split alike); a
custom call cannot be partitioned by XLA.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from model.attention.mask import AttentionMask
from model.layers import logical_sharding

LANES = 128  # splash's lengths and blocks are multiples of this
MAX_BLOCK = 512


def splash_fits(lq: int, lk: int) -> bool:
    """Lengths splash takes (with a query offset of 0: training, prefill): multiples of 128."""
    return lq % LANES == 0 and lk % LANES == 0


def splash_block(length: int) -> int:
    """The block length splash runs at for this sequence length."""
    return next(b for b in (MAX_BLOCK, 256, LANES) if length % b == 0)


def _kernel(heads: int, lq: int, lk: int, causal: bool, window: int | None, interpret: bool):
    # Imported here: the shapes above serve the FLOP and memory counts, which need no Pallas.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    shape = (lq, lk)
    if window is not None:
        one = splash_mask.LocalMask(shape, window_size=(window - 1, 0 if causal else None), offset=0)
    elif causal:
        one = splash_mask.CausalMask(shape)
    else:
        one = splash_mask.FullMask(shape)
    bq, bk = splash_block(lq), splash_block(lk)
    # The backward runs as two kernels (dK and dV, then dQ), each recomputing the scores: the fused one
    # keeps a float32 dQ per key block, memory that grows with length / block.
    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                              block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    return splash.make_splash_mha(splash_mask.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                                  block_sizes=sizes, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float,
                     interpret: bool) -> jax.Array:
    """Same contract as `dense_attention` for a query offset of 0 (training, prefill); the shapes must pass
    `splash_fits`."""

    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    def local(q, k, v, q_seg, kv_seg):
        kernel = _kernel(q.shape[2], q.shape[1], k.shape[1], mask.causal, mask.window, interpret)

        def one(q, k, v, q_seg, kv_seg):  # [length, heads, dim] -> the kernel's [heads, length, dim]
            out = kernel((q * scale).swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                         segment_ids=SegmentIds(q_seg, kv_seg))
            return out.swapaxes(0, 1)

        return jax.vmap(one)(q, k, v, q_seg, kv_seg)

    args = (q, k, v, mask.q_segments, mask.kv_segments)
    sharding = logical_sharding(("batch", "length", "heads", "head_dim"), q.shape)
    if sharding is None:
        return local(*args)
    rows, heads = sharding.spec[0], sharding.spec[2]
    kv_heads = logical_sharding(("batch", "length", "kv_heads", "head_dim"), k.shape).spec[2]
    if heads != kv_heads:  # query heads split where key heads are not: each device would lose its groups' keys
        heads = kv_heads = None
    qs, kvs, segs = PartitionSpec(rows, None, heads), PartitionSpec(rows, None, kv_heads), PartitionSpec(rows)
    return jax.shard_map(local, mesh=sharding.mesh, in_specs=(qs, kvs, kvs, segs, segs), out_specs=qs,
                         check_vma=False)(*args)

"""GPU flash attention through cuDNN, with packed rows.

`jax.nn.dot_product_attention` (jax 0.10.2) takes no segment ids, and turns a `mask=` into a dense bias,
which is exactly what a fused kernel should not need. The lower-level entry point it wraps,
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, takes the packed form cuDNN itself
understands: for each row, the offset and length of every document (`q_offsets`, `q_seqlen`), padded
with -1 to a static count. That is what this module calls; a private module, so it is imported only
when the path is taken, and `auto` does not take it until it has run on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.attention.mask import AttentionMask


def segment_offsets(segments: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """Packed rows' documents as cuDNN takes them: (lengths [b, M], offsets [b, M + 1]), each document a run
    of equal segment ids, padded with -1 past a row's last document."""
    b, length = segments.shape
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)

    def row(starts_row):
        count = jnp.sum(starts_row)
        offsets = jnp.nonzero(starts_row, size=max_segments + 1, fill_value=length)[0]  # then `length` as the end
        lengths = jnp.where(jnp.arange(max_segments) < count, jnp.diff(offsets), -1)
        return lengths, jnp.where(jnp.arange(max_segments + 1) < count, offsets, -1)

    return jax.vmap(row)(starts)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float) -> jax.Array:
    """Same contract as `dense_attention`, for training and prefill (query and key rows the same slots)."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    if not mask.static_offset or mask.q_offset != 0 or q.shape[1] != k.shape[1]:
        raise ValueError("cudnn attention here takes query and key rows of the same slots (training, prefill)")
    lengths, offsets = segment_offsets(mask.q_segments, q.shape[1])
    return dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets, scale=scale,
        mask_type=MaskType.CAUSAL if mask.causal else MaskType.NO_MASK, sliding_window_length=mask.window,
    )

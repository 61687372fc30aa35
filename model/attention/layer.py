"""The attention layer (causal for decoders, bidirectional for encoders): projections with grouped key/value
heads, rotary positions, a fixed-shape key/value cache for decoding, and `attend` (kernels.py) between them.

Decoding keeps one cache slot per position of a row; rows are left-padded so that
every row writes its next token into the same slot. Row b's real tokens start at
slot start[b]; slots before it are padding and never attended to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention.kernels import attend
from model.attention.mask import AttentionMask
from model.config import ModelConfig
from model.layers import constrain, logical_param, matmul_param, normal, zeros
from model.precision import Numerics


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs (first half, second half) of the head dimension by position-dependent angles.

    x: [batch, length, heads, head_dim]; positions: [batch, length] (restart at 0 in each document).
    """
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None].astype(jnp.float32) * freq  # [b, l, half]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def write_cache(cache: jax.Array, new: jax.Array, index: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Write `new` [batch, q, ...] into `cache` [batch, length, ...] at slot `index` (same for every row)."""
    start = (0, index) + (0,) * (cache.ndim - 2)
    return constrain(jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start), axes)


CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, numerics: Numerics, rngs: nnx.Rngs):
        d, h, kv, hd, p = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, numerics.params
        self.n_heads, self.n_kv_heads, self.head_dim = h, kv, hd
        self.numerics = numerics
        self.implementation, self.block = cfg.attention, cfg.attention_block
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        init = normal(cfg.init_std)
        n = numerics
        self.wq = matmul_param(n, rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), "attention", outputs=2)
        self.wk = matmul_param(n, rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), "attention", outputs=2)
        self.wv = matmul_param(n, rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), "attention", outputs=2)
        self.wo = matmul_param(n, rngs, normal(out_std), (h, hd, d), ("heads", "head_dim", "embed"), "attention",
                               contract=2)
        if cfg.use_bias:
            self.bq = logical_param(None, zeros, (h, hd), p, ("heads", "head_dim"))
            self.bk = logical_param(None, zeros, (kv, hd), p, ("kv_heads", "head_dim"))
            self.bv = logical_param(None, zeros, (kv, hd), p, ("kv_heads", "head_dim"))
            self.bo = logical_param(None, zeros, (d,), p, ("embed",))
        else:
            self.bq = self.bk = self.bv = self.bo = None

    def _project(self, x, w, b, heads_axis: str):
        y = self.numerics.matmul("bld,dhk->blhk", x, w, "attention")
        y = y if b is None else y + self.numerics.weight(b)
        return constrain(y, ("batch", "length", heads_axis, "head_dim"))

    def init_cache(self, batch: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of this layer's decode cache: keys and values of the kv heads only (GQA)."""
        shape = jax.ShapeDtypeStruct((batch, length, self.n_kv_heads, self.head_dim), self.numerics.compute)
        return {"k": shape, "v": shape}

    def __call__(self, x: jax.Array, positions: jax.Array, mask: AttentionMask, cache=None, index=None):
        """x [batch, q, d] -> (y, cache). With a cache, the new keys and values are written at slot `index` and
        the queries attend over the whole cache (the mask's key segments mark its valid range)."""
        q = self._project(x, self.wq, self.bq, "heads")
        k = self._project(x, self.wk, self.bk, "kv_heads")
        v = self._project(x, self.wv, self.bv, "kv_heads")
        if self.rope_theta is not None:
            q = rotary(q, positions, self.rope_theta)
            k = rotary(k, positions, self.rope_theta)
        if cache is not None:
            k = write_cache(cache["k"], k, index, CACHE_AXES)
            v = write_cache(cache["v"], v, index, CACHE_AXES)
            cache = {"k": k, "v": v}
        out = attend(q, k, v, mask, choice=self.implementation, block=self.block)
        y = self.numerics.matmul("blhk,hkd->bld", out, self.wo, "attention")
        return (y if self.bo is None else y + self.numerics.weight(self.bo)), cache

"""The attention layer (causal for decoders, bidirectional for encoders): projections with grouped key/value
heads, rotary positions, a fixed-shape key/value cache for decoding, and `attend` (kernels.py) between them.

Decoding keeps one cache slot per position of a row; rows are left-padded so that
every row writes its next token into the same slot. Row b's real tokens start at
slot start[b]; slots before it are padding and never attended to.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.attention.kernels import attend
from model.attention.mask import AttentionMask
from model.config import ModelConfig, RopeScaling
from model import lora
from model.layers import Norm, constrain, logical_param, matmul_param, normal, zeros
from model.precision import Numerics


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Angular frequency of each rotated pair [head_dim // 2]: theta^(-2i/head_dim), stretched by `scaling`.

    Llama 3.1's rule: wavelengths (2 pi / frequency) shorter than original/high_freq_factor are kept, those longer
    than original/low_freq_factor are divided by `factor`, and between the two the frequency is interpolated
    linearly in original/wavelength."""
    half = head_dim // 2
    freq = theta ** (-np.arange(half, dtype=np.float64) / half)
    if scaling is None:
        return freq.astype(np.float32)
    wavelength = 2 * math.pi / freq
    ratio = scaling.original_max_seq_len / wavelength
    smooth = np.clip((ratio - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor), 0, 1)
    return ((1 - smooth) * freq / scaling.factor + smooth * freq).astype(np.float32)


def rotary(x: jax.Array, positions: jax.Array, freq) -> jax.Array:
    """Rotate pairs (first half, second half) of the head dimension by position-dependent angles.

    This rotate-half layout is the one Hugging Face checkpoints use, so their query and key weights load
    without the interleave permutation that Meta's original checkpoints need.
    x: [batch, length, heads, head_dim]; positions: [batch, length] (restart at 0 in each document);
    freq: head_dim // 2 values (`rope_frequencies`).
    """
    angle = positions[..., None].astype(jnp.float32) * jnp.asarray(freq, jnp.float32)  # [b, l, half]
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
        # A tuple: static, part of the module's structure rather than its state.
        self.rope_freq = (tuple(rope_frequencies(hd, cfg.rope_theta, cfg.rope_scaling).tolist())
                          if cfg.position == "rope" else None)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        init = normal(cfg.init_std)
        n = numerics
        self.wq = matmul_param(n, rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), "attention", outputs=2)
        self.wk = matmul_param(n, rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), "attention", outputs=2)
        self.wv = matmul_param(n, rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), "attention", outputs=2)
        self.wo = matmul_param(n, rngs, normal(out_std), (h, hd, d), ("heads", "head_dim", "embed"), "attention",
                               contract=2)
        if cfg.qkv_bias:
            self.bq = logical_param(None, zeros, (h, hd), p, ("heads", "head_dim"))
            self.bk = logical_param(None, zeros, (kv, hd), p, ("kv_heads", "head_dim"))
            self.bv = logical_param(None, zeros, (kv, hd), p, ("kv_heads", "head_dim"))
        else:
            self.bq = self.bk = self.bv = None
        self.bo = logical_param(None, zeros, (d,), p, ("embed",)) if cfg.attention_out_bias else None
        # Qwen3: each query and key head RMS-normalised (one scale per head dimension) before the rotation.
        self.q_norm = Norm(cfg, numerics, hd, "head_dim") if cfg.qk_norm else None
        self.k_norm = Norm(cfg, numerics, hd, "head_dim") if cfg.qk_norm else None
        lora.attach(self, ("wq", "wk", "wv", "wo"), cfg.lora, p, rngs)

    def _project(self, x, name: str, b, heads_axis: str):
        y = self.numerics.matmul("bld,dhk->blhk", x, getattr(self, name), "attention", lora=lora.adapter(self, name))
        y = y if b is None else y + self.numerics.weight(b)
        return constrain(y, ("batch", "length", heads_axis, "head_dim"))

    def init_cache(self, batch: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of this layer's decode cache: keys and values of the kv heads only (GQA)."""
        shape = jax.ShapeDtypeStruct((batch, length, self.n_kv_heads, self.head_dim), self.numerics.compute)
        return {"k": shape, "v": shape}

    def __call__(self, x: jax.Array, positions: jax.Array, mask: AttentionMask, cache=None, index=None):
        """x [batch, q, d] -> (y, cache). With a cache, the new keys and values are written at slot `index` and
        the queries attend over the whole cache (the mask's key segments mark its valid range)."""
        q = self._project(x, "wq", self.bq, "heads")
        k = self._project(x, "wk", self.bk, "kv_heads")
        v = self._project(x, "wv", self.bv, "kv_heads")
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_freq is not None:
            q = rotary(q, positions, self.rope_freq)
            k = rotary(k, positions, self.rope_freq)
        if cache is not None:
            k = write_cache(cache["k"], k, index, CACHE_AXES)
            v = write_cache(cache["v"], v, index, CACHE_AXES)
            cache = {"k": k, "v": v}
        out = attend(q, k, v, mask, choice=self.implementation, block=self.block)
        y = self.numerics.matmul("blhk,hkd->bld", out, self.wo, "attention", lora=lora.adapter(self, "wo"))
        return (y if self.bo is None else y + self.numerics.weight(self.bo)), cache

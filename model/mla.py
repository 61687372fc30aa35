"""Multi-head latent attention (DeepSeek-V2).

Keys and values are decompressed per head from one normalised latent of width
`kv_lora_rank`; the decode cache holds only that latent and one shared rotary key,
(kv_lora_rank + rope_head_dim) numbers per token and layer, and decompresses the
whole cache at every step. Training runs the same decompressed form: scores over
[nope | rope] query and key parts, then values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import rotary, write_cache
from model.config import ModelConfig
from model.layers import Norm, constrain, logical_param, normal


class LatentAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        mla, d, h, p = cfg.mla, cfg.d_model, cfg.n_heads, cfg.param_dtype
        self.cfg, self.dtype = cfg, jnp.dtype(cfg.dtype)
        init, out_std = normal(cfg.init_std), cfg.init_std / (2 * cfg.n_layers) ** 0.5
        qk = mla.nope_head_dim + mla.rope_head_dim
        if mla.q_lora_rank is None:
            self.wq_a = self.q_norm = None
            self.wq = logical_param(rngs, init, (d, h, qk), p, ("embed", "heads", "head_dim"))
        else:
            self.wq_a = logical_param(rngs, init, (d, mla.q_lora_rank), p, ("embed", None))
            self.q_norm = Norm(cfg, mla.q_lora_rank, axis=None)
            self.wq = logical_param(rngs, init, (mla.q_lora_rank, h, qk), p, (None, "heads", "head_dim"))
        self.wkv_a = logical_param(rngs, init, (d, mla.kv_lora_rank + mla.rope_head_dim), p, ("embed", None))
        self.kv_norm = Norm(cfg, mla.kv_lora_rank, axis=None)
        self.wkv_b = logical_param(
            rngs, init, (mla.kv_lora_rank, h, mla.nope_head_dim + mla.v_head_dim), p, (None, "heads", "head_dim")
        )
        self.wo = logical_param(rngs, normal(out_std), (h, mla.v_head_dim, d), p, ("heads", "head_dim", "embed"))

    def init_cache(self, batch: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
        mla = self.cfg.mla
        return {
            "latent": jax.ShapeDtypeStruct((batch, length, mla.kv_lora_rank), self.dtype),
            "k_rope": jax.ShapeDtypeStruct((batch, length, 1, mla.rope_head_dim), self.dtype),
        }

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache=None, index=None):
        """Same contract as `Attention.__call__`."""
        mla, dt = self.cfg.mla, self.dtype
        w = lambda param: param[...].astype(dt)  # noqa: E731
        q_in = x if self.wq_a is None else self.q_norm(x @ w(self.wq_a))
        q = constrain(jnp.einsum("blr,rhk->blhk", q_in, w(self.wq)), ("batch", "length", "heads", "head_dim"))
        latent, k_rope = jnp.split(x @ w(self.wkv_a), [mla.kv_lora_rank], axis=-1)
        latent = self.kv_norm(latent)
        k_rope = rotary(k_rope[:, :, None, :], positions, self.cfg.rope_theta)  # one rotary key for every head
        if cache is not None:
            latent = write_cache(cache["latent"], latent, index, ("batch", "length", None))
            k_rope = write_cache(cache["k_rope"], k_rope, index, ("batch", "length", None, None))
            cache = {"latent": latent, "k_rope": k_rope}
        kv = jnp.einsum("blr,rhk->blhk", latent, w(self.wkv_b))
        kv = constrain(kv, ("batch", "length", "heads", "head_dim"))
        k_nope, v = jnp.split(kv, [mla.nope_head_dim], axis=-1)
        q_nope, q_rope = jnp.split(q, [mla.nope_head_dim], axis=-1)
        q_rope = rotary(q_rope, positions, self.cfg.rope_theta)
        scores = (
            jnp.einsum("bqhd,bshd->bhqs", q_nope, k_nope, preferred_element_type=jnp.float32)
            + jnp.einsum("bqhd,bsxd->bhqs", q_rope, k_rope, preferred_element_type=jnp.float32)
        ) * (mla.nope_head_dim + mla.rope_head_dim) ** -0.5
        scores = jnp.where(mask[:, 0], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bhqs,bshd->bqhd", probs, v)
        return jnp.einsum("blhk,hkd->bld", out, w(self.wo)), cache

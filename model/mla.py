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

from model.attention.kernels import attend
from model.attention.layer import rope_frequencies, rotary, write_cache
from model.attention.mask import AttentionMask
from model.config import ModelConfig
from model import lora
from model.layers import Norm, constrain, matmul_param, normal
from model.precision import Numerics


class LatentAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, numerics: Numerics, rngs: nnx.Rngs):
        mla, d, h, n = cfg.mla, cfg.d_model, cfg.n_heads, numerics
        self.cfg, self.numerics = cfg, numerics
        init, out_std = normal(cfg.init_std), cfg.init_std / (2 * cfg.n_layers) ** 0.5
        qk = mla.nope_head_dim + mla.rope_head_dim
        self.rope_freq = tuple(rope_frequencies(mla.rope_head_dim, cfg.rope_theta, cfg.rope_scaling).tolist())
        if mla.q_lora_rank is None:
            self.wq_a = self.q_norm = None
            self.wq = matmul_param(n, rngs, init, (d, h, qk), ("embed", "heads", "head_dim"), "attention", outputs=2)
        else:
            self.wq_a = matmul_param(n, rngs, init, (d, mla.q_lora_rank), ("embed", None), "attention")
            self.q_norm = Norm(cfg, n, mla.q_lora_rank, axis=None)
            self.wq = matmul_param(n, rngs, init, (mla.q_lora_rank, h, qk), (None, "heads", "head_dim"), "attention",
                                   outputs=2)
        self.wkv_a = matmul_param(n, rngs, init, (d, mla.kv_lora_rank + mla.rope_head_dim), ("embed", None), "attention")
        self.kv_norm = Norm(cfg, n, mla.kv_lora_rank, axis=None)
        self.wkv_b = matmul_param(
            n, rngs, init, (mla.kv_lora_rank, h, mla.nope_head_dim + mla.v_head_dim), (None, "heads", "head_dim"),
            "attention", outputs=2,
        )
        self.wo = matmul_param(n, rngs, normal(out_std), (h, mla.v_head_dim, d), ("heads", "head_dim", "embed"),
                               "attention", contract=2)
        lora.attach(self, ("wq_a", "wq", "wkv_a", "wkv_b", "wo"), cfg.lora, n.params, rngs)

    def init_cache(self, batch: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
        mla = self.cfg.mla
        return {
            "latent": jax.ShapeDtypeStruct((batch, length, mla.kv_lora_rank), self.numerics.compute),
            "k_rope": jax.ShapeDtypeStruct((batch, length, 1, mla.rope_head_dim), self.numerics.compute),
        }

    def __call__(self, x: jax.Array, positions: jax.Array, mask: AttentionMask, cache=None, index=None):
        """Same contract as `Attention.__call__`."""
        mla, n, a = self.cfg.mla, self.numerics, lambda name: lora.adapter(self, name)  # noqa: E731
        q_in = x if self.wq_a is None else self.q_norm(n.matmul("bld,dr->blr", x, self.wq_a, "attention", lora=a("wq_a")))
        q = constrain(n.matmul("blr,rhk->blhk", q_in, self.wq, "attention", lora=a("wq")),
                      ("batch", "length", "heads", "head_dim"))
        latent, k_rope = jnp.split(n.matmul("bld,dr->blr", x, self.wkv_a, "attention", lora=a("wkv_a")),
                                   [mla.kv_lora_rank], axis=-1)
        latent = self.kv_norm(latent)
        k_rope = rotary(k_rope[:, :, None, :], positions, self.rope_freq)  # one rotary key for every head
        if cache is not None:
            latent = write_cache(cache["latent"], latent, index, ("batch", "length", None))
            k_rope = write_cache(cache["k_rope"], k_rope, index, ("batch", "length", None, None))
            cache = {"latent": latent, "k_rope": k_rope}
        kv = n.matmul("blr,rhk->blhk", latent, self.wkv_b, "attention", lora=a("wkv_b"))
        kv = constrain(kv, ("batch", "length", "heads", "head_dim"))
        k_nope, v = jnp.split(kv, [mla.nope_head_dim], axis=-1)
        q_nope, q_rope = jnp.split(q, [mla.nope_head_dim], axis=-1)
        q = jnp.concatenate([q_nope, rotary(q_rope, positions, self.rope_freq)], axis=-1)
        # Every head's key: its own non-positional part beside the one rotary part all heads share.
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], mla.rope_head_dim))], axis=-1)
        out = attend(q, k, v, mask, choice=self.cfg.attention, block=self.cfg.attention_block)
        return n.matmul("blhk,hkd->bld", out, self.wo, "attention", lora=a("wo")), cache

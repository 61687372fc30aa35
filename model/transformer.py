"""The decoder-only transformer: embeddings, a stack of pre-norm blocks, and the LM head.

Blocks are created once with a leading "layers" axis (nnx.vmap) so that a single
`lax.scan` runs them: compile time stays flat as depth grows. `scan_layers=False`
runs the same stacked parameters in a Python loop, so both modes share checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import Attention
from model.config import ModelConfig
from model.layers import Embed, Mlp, Norm, constrain, logical_param, normal

HIDDEN_AXES = ("batch", "length", "activation_embed")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x, positions, segment_ids):
        x = constrain(x + self.attn(self.attn_norm(x), positions, segment_ids), HIDDEN_AXES)
        return constrain(x + self.mlp(self.mlp_norm(x)), HIDDEN_AXES)


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        self.pos_embed = (
            logical_param(rngs, normal(cfg.init_std), (cfg.max_seq_len, cfg.d_model), cfg.param_dtype, (None, "embed"))
            if cfg.position == "learned"
            else None
        )

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(cfg)
        self.head = (
            None
            if cfg.tie_embeddings
            else logical_param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), cfg.param_dtype, ("embed", "vocab"))
        )

    def hidden(self, tokens, positions, segment_ids):
        """Final-norm hidden states [batch, length, d_model] in the compute dtype."""
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
        x = constrain(x, HIDDEN_AXES)
        graphdef, stacked = nnx.split(self.blocks)

        def body(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, positions, segment_ids), None

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for i in range(self.cfg.n_layers):
                x, _ = body(x, jax.tree.map(lambda a: a[i], stacked))
        return self.final_norm(x)

    def logits(self, x):
        """LM-head logits in float32: [batch, length, vocab]."""
        if self.head is None:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum("bld,dv->blv", x, self.head[...].astype(x.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, tokens, positions=None, segment_ids=None):
        """tokens [batch, length] -> logits [batch, length, vocab] (float32).

        positions default to 0..length-1 and segment_ids to one document per row.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        return self.logits(self.hidden(tokens, positions, segment_ids))

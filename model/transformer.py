"""The transformer: embeddings, stacks of pre-norm blocks, and the LM head.

One class serves both architectures: a decoder (causal attention, next-token head) and
an encoder (bidirectional attention, masked-token head); only the attention mask differs.

Blocks are created once with a leading "layers" axis (nnx.vmap) so that a single
`lax.scan` runs them: compile time stays flat as depth grows. `scan_layers=False`
runs the same stacked parameters in a Python loop, so both modes share checkpoints.
A mixture-of-experts model has two stacks: its leading dense layers, then groups of
(every-1 dense layers, one MoE layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import Attention
from model.config import ModelConfig
from model.layers import Embed, Mlp, Norm, constrain, logical_param, normal
from model.mla import LatentAttention
from model.moe import MoeMlp

HIDDEN_AXES = ("batch", "length", "activation_embed")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); the MLP may be routed experts."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool = False):
        self.attn_norm = Norm(cfg)
        self.attn = LatentAttention(cfg, rngs) if cfg.mla else Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg)
        self.mlp = MoeMlp(cfg, rngs) if moe else Mlp(cfg, rngs)

    def __call__(self, x, positions, segment_ids, key=None):
        """-> (x, aux): aux holds the router's losses and statistics for an MoE block, else nothing."""
        x = constrain(x + self.attn(self.attn_norm(x), positions, segment_ids), HIDDEN_AXES)
        if isinstance(self.mlp, MoeMlp):
            y, aux = self.mlp(self.mlp_norm(x), segment_ids > 0, key)
        else:
            y, aux = self.mlp(self.mlp_norm(x)), {}
        return constrain(x + y, HIDDEN_AXES), aux


class MoeGroup(nnx.Module):
    """The repeating unit of an MoE model: every-1 dense blocks, then one MoE block."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dense = nnx.List([Block(cfg, rngs) for _ in range(cfg.moe.every - 1)])
        self.moe = Block(cfg, rngs, moe=True)

    def __call__(self, x, positions, segment_ids, key=None):
        for block in self.dense:
            x, _ = block(x, positions, segment_ids)
        return self.moe(x, positions, segment_ids, key)


def _stack(make, cfg: ModelConfig, rngs: nnx.Rngs, count: int):
    """`count` copies of a module with a leading "layers" axis on every parameter."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
        return make(cfg, rngs)

    return build(rngs)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        self.pos_embed = (
            logical_param(rngs, normal(cfg.init_std), (cfg.max_seq_len, cfg.d_model), cfg.param_dtype, (None, "embed"))
            if cfg.position == "learned"
            else None
        )
        self.blocks = _stack(Block, cfg, rngs, cfg.n_dense_lead) if cfg.n_dense_lead else None
        self.moe_groups = _stack(MoeGroup, cfg, rngs, cfg.n_moe_groups) if cfg.n_moe_groups else None
        self.final_norm = Norm(cfg)
        self.head = (
            None
            if cfg.tie_embeddings
            else logical_param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), cfg.param_dtype, ("embed", "vocab"))
        )

    def _run_stack(self, stack, count: int, x, positions, segment_ids, key):
        """Run stacked layers (scanned or looped, under the remat policy) -> (x, aux stacked per layer)."""
        graphdef, stacked = nnx.split(stack)

        def body(x, layer):
            layer_state, index = layer
            layer_key = None if key is None else jax.random.fold_in(key, index)
            return nnx.merge(graphdef, layer_state)(x, positions, segment_ids, layer_key)

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        indices = jnp.arange(count)
        if self.cfg.scan_layers:
            return jax.lax.scan(body, x, (stacked, indices))
        auxes = []
        for i in range(count):
            x, aux = body(x, (jax.tree.map(lambda a: a[i], stacked), indices[i]))
            auxes.append(aux)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *auxes)

    def hidden(self, tokens, positions, segment_ids, key=None):
        """Final-norm hidden states [batch, length, d_model] in the compute dtype, and the MoE aux.

        aux is empty for a dense model; otherwise each router statistic averaged over the
        MoE layers. `key` (training only) drives router jitter.
        """
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
        x = constrain(x, HIDDEN_AXES)
        aux = {}
        if self.blocks is not None:
            x, _ = self._run_stack(self.blocks, self.cfg.n_dense_lead, x, positions, segment_ids, None)
        if self.moe_groups is not None:
            x, per_layer = self._run_stack(self.moe_groups, self.cfg.n_moe_groups, x, positions, segment_ids, key)
            aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), per_layer)
        return self.final_norm(x), aux

    def logits(self, x):
        """LM-head logits in float32: [batch, length, vocab]."""
        if self.head is None:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum("bld,dv->blv", x, self.head[...].astype(x.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))

    def forward(self, tokens, positions=None, segment_ids=None, key=None):
        """tokens [batch, length] -> (logits [batch, length, vocab] float32, MoE aux).

        positions default to 0..length-1 and segment_ids to one document per row.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        x, aux = self.hidden(tokens, positions, segment_ids, key)
        return self.logits(x), aux

    def __call__(self, tokens, positions=None, segment_ids=None):
        return self.forward(tokens, positions, segment_ids)[0]

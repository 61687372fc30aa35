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

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model import lora
from model.attention.layer import Attention
from model.attention.mask import AttentionMask, segments_from_start
from model.config import ModelConfig, Precision
from model.layers import Embed, HeadTransform, Mlp, Norm, constrain, logical_param, matmul_param, normal, zeros
from model.mla import LatentAttention
from model.moe import MoeMlp
from model.precision import Numerics

HIDDEN_AXES = ("batch", "length", "activation_embed")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Context(NamedTuple):
    """What every layer of one forward pass shares."""

    positions: jax.Array  # [batch, q] position of each token within its document (rotary/learned)
    segment_ids: jax.Array  # [batch, q] document ids; 0 marks padding
    mask: AttentionMask  # which keys each query attends to, described (segments, causal, window, offset)
    cache_index: jax.Array | int | None = None  # decoding: the cache slot of the first new token


class Block(nnx.Module):
    """Residual block: pre-norm x + attn(norm(x)), then + mlp(norm(x)); or post-norm (BERT) norm(x + attn(x)),
    then norm(x + mlp(x)). The MLP may be routed experts."""

    def __init__(self, cfg: ModelConfig, numerics: Numerics, rngs: nnx.Rngs, moe: bool = False):
        self.post_norm = cfg.norm_position == "post"
        self.attn_norm = Norm(cfg, numerics)
        self.attn = LatentAttention(cfg, numerics, rngs) if cfg.mla else Attention(cfg, numerics, rngs)
        self.mlp_norm = Norm(cfg, numerics)
        self.mlp = MoeMlp(cfg, numerics, rngs) if moe else Mlp(cfg, numerics, rngs)

    def init_cache(self, batch: int, length: int):
        return self.attn.init_cache(batch, length)

    def __call__(self, x, ctx: Context, key=None, cache=None):
        """-> (x, aux, cache): aux holds the router's losses and statistics for an MoE block, else
        nothing; cache is the updated decode cache (None when not decoding)."""
        pre = (lambda norm, x: x) if self.post_norm else (lambda norm, x: norm(x))
        post = (lambda norm, x: norm(x)) if self.post_norm else (lambda norm, x: x)
        y, cache = self.attn(pre(self.attn_norm, x), ctx.positions, ctx.mask, cache, ctx.cache_index)
        x = constrain(post(self.attn_norm, x + y), HIDDEN_AXES)
        if isinstance(self.mlp, MoeMlp):
            y, aux = self.mlp(pre(self.mlp_norm, x), ctx.segment_ids > 0, key)
        else:
            y, aux = self.mlp(pre(self.mlp_norm, x)), {}
        return constrain(post(self.mlp_norm, x + y), HIDDEN_AXES), aux, cache


class MoeGroup(nnx.Module):
    """The repeating unit of an MoE model: every-1 dense blocks, then one MoE block."""

    def __init__(self, cfg: ModelConfig, numerics: Numerics, rngs: nnx.Rngs):
        self.dense = nnx.List([Block(cfg, numerics, rngs) for _ in range(cfg.moe.every - 1)])
        self.moe = Block(cfg, numerics, rngs, moe=True)

    def init_cache(self, batch: int, length: int):
        return {"dense": [b.init_cache(batch, length) for b in self.dense], "moe": self.moe.init_cache(batch, length)}

    def __call__(self, x, ctx: Context, key=None, cache=None):
        dense_caches = []
        for i, block in enumerate(self.dense):
            x, _, c = block(x, ctx, None, None if cache is None else cache["dense"][i])
            dense_caches.append(c)
        x, aux, c = self.moe(x, ctx, key, None if cache is None else cache["moe"])
        return x, aux, None if cache is None else {"dense": dense_caches, "moe": c}


def stack_layers(make, cfg: ModelConfig, numerics: Numerics, rngs: nnx.Rngs, count: int):
    """`count` copies of a module with a leading "layers" axis on every parameter."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
        return make(cfg, numerics, rngs)

    return build(rngs)


def run_stack(cfg: ModelConfig, stack, count: int, x, ctx: Context, key=None, cache=None):
    """Run stacked layers (scanned or looped, under the remat policy)
    -> (x, aux stacked per layer, cache stacked per layer or None)."""
    graphdef, stacked = nnx.split(stack)

    def body(x, layer):
        layer_state, index, layer_cache = layer
        layer_key = None if key is None else jax.random.fold_in(key, index)
        x, aux, layer_cache = nnx.merge(graphdef, layer_state)(x, ctx, layer_key, layer_cache)
        return x, (aux, layer_cache)

    if cfg.remat != "none" and cache is None:
        body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    indices = jnp.arange(count)
    if cfg.scan_layers:
        x, (aux, cache) = jax.lax.scan(body, x, (stacked, indices, cache))
        return x, aux, cache
    outs = []
    for i in range(count):
        x, out = body(x, jax.tree.map(lambda a: a[i], (stacked, indices, cache)))
        outs.append(out)
    aux, cache = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x, aux, cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, precision: Precision = Precision(), lm_head: bool = True):
        """`cfg` is the model's shape; `precision` its dtypes (float32 throughout unless a policy says otherwise).
        `lm_head=False`: no output matrix (a dual encoder's text tower reads hidden states only)."""
        self.cfg = cfg
        self.numerics = n = Numerics.of(cfg, precision)
        self.embed = Embed(cfg, n, rngs)
        self.pos_embed = (
            logical_param(rngs, normal(cfg.init_std), (cfg.max_seq_len, cfg.d_model), n.params, (None, "embed"))
            if cfg.position == "learned"
            else None
        )
        self.token_type_embed = (
            logical_param(rngs, normal(cfg.init_std), (cfg.token_types, cfg.d_model), n.params, (None, "embed"))
            if cfg.token_types
            else None
        )
        post_norm = cfg.norm_position == "post"
        self.embed_norm = Norm(cfg, n) if post_norm else None  # post-norm blocks take normalised embeddings
        self.blocks = stack_layers(Block, cfg, n, rngs, cfg.n_dense_lead) if cfg.n_dense_lead else None
        self.moe_groups = stack_layers(MoeGroup, cfg, n, rngs, cfg.n_moe_groups) if cfg.n_moe_groups else None
        self.final_norm = None if post_norm else Norm(cfg, n)  # post-norm blocks end normalised
        self.head_transform = HeadTransform(cfg, n, rngs) if cfg.head_transform else None
        self.head = (
            None
            if cfg.tie_embeddings or not lm_head
            else matmul_param(n, rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), "lm_head")
        )
        self.head_bias = logical_param(None, zeros, (cfg.vocab_size,), n.params, ("vocab",)) if cfg.head_transform else None
        lora.attach(self, ("head",), cfg.lora, n.params, rngs)
        # Zero at first: an untrained reward model scores every response alike.
        self.score = logical_param(None, zeros, (cfg.d_model,), n.params, ("embed",)) if cfg.score_head else None

    def _stacks(self):
        """(name, stacked module, layer count) of each layer stack, in order."""
        return [
            (name, stack, count)
            for name, stack, count in (
                ("blocks", self.blocks, self.cfg.n_dense_lead),
                ("moe_groups", self.moe_groups, self.cfg.n_moe_groups),
            )
            if stack is not None
        ]

    def hidden(self, tokens, positions, segment_ids, key=None, cache=None, cache_index=None, mask=None):
        """Final-norm hidden states [batch, length, d_model] in the compute dtype, the MoE aux, and the
        updated cache (None without one).

        aux is empty for a dense model; otherwise each router statistic averaged over the
        MoE layers. `key` (training only) drives router jitter.
        """
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.numerics.lookup(self.pos_embed, positions)
        if self.token_type_embed is not None:  # every token is of type 0
            x = x + self.numerics.weight(self.token_type_embed)[0]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = constrain(x, HIDDEN_AXES)
        if mask is None:
            mask = AttentionMask(segment_ids, segment_ids, self.cfg.causal, self.cfg.sliding_window)
        ctx = Context(positions, segment_ids, mask, cache_index)
        aux, new_cache = {}, None if cache is None else {}
        for name, stack, count in self._stacks():
            x, per_layer, stack_cache = run_stack(
                self.cfg, stack, count, x, ctx, key if name == "moe_groups" else None, None if cache is None else cache[name]
            )
            if name == "moe_groups":
                aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), per_layer)
            if cache is not None:
                new_cache[name] = stack_cache
        return (x if self.final_norm is None else self.final_norm(x)), aux, new_cache

    # ------------------------------------------------------------ decoding with a KV cache

    def init_cache(self, batch: int, length: int):
        """An empty decode cache for `batch` rows of `length` slots: per stack, each layer's
        cache with a leading "layers" axis (GQA layers hold only the kv heads)."""
        return {
            name: jax.tree.map(lambda s: jnp.zeros((count, *s.shape), s.dtype), stack.init_cache(batch, length))
            for name, stack, count in self._stacks()
        }

    def decode(self, tokens, positions, cache, cache_index, start, last_only: bool = False):
        """Run q new tokens [batch, q] through the model with the cache -> (logits [batch, q, vocab], cache).

        The tokens go into slots cache_index..cache_index+q-1 of every row; row b's real
        tokens begin at slot start[b] (left padding before it). Prefill is one call with the
        whole (left-padded) prompt at cache_index 0 (a Python int: the attention kernels may then
        skip blocks statically); each decode step is a call with q=1. `last_only`: logits of the last new
        token alone (a prefill needs no others, and the whole prompt's logits are the largest buffer).
        """
        if not self.cfg.causal:
            raise ValueError("decoding needs a causal (decoder) model; this one is an encoder")
        q_len = tokens.shape[1]
        cache_len = jax.tree.leaves(cache)[0].shape[2]
        segment_ids = segments_from_start(start, cache_index + jnp.arange(q_len))
        mask = AttentionMask(segment_ids, segments_from_start(start, jnp.arange(cache_len)), True,
                             self.cfg.sliding_window, cache_index)
        x, _, cache = self.hidden(tokens, positions, segment_ids, None, cache, cache_index, mask)
        return self.logits(x[:, -1:] if last_only else x), cache

    @staticmethod
    def reorder_cache(cache, rows):
        """The cache with its batch rows taken in the order `rows` (beam search)."""
        return jax.tree.map(lambda c: jnp.take(c, rows, axis=1), cache)

    def logits(self, x):
        """LM-head logits in the policy's logits dtype (float32 by default): [batch, length, vocab]."""
        if self.head_transform is not None:
            x = self.head_transform(x)
        if self.head is None:
            logits = self.embed.attend(x)
        else:
            logits = self.numerics.matmul("bld,dv->blv", x, self.head, "lm_head", self.numerics.logits,
                                          lora=lora.adapter(self, "head"))
        if self.head_bias is not None:
            logits = logits + self.numerics.weight(self.head_bias, logits.dtype)
        return constrain(logits, ("batch", "length", "vocab"))

    def scores(self, x, ends):
        """The score head's scalar per row [batch] in float32, read from hidden states x [batch, length, d] at
        each row's end position `ends` [batch] (its end token: whatever padding follows, it is not seen)."""
        last = jnp.take_along_axis(x, ends[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return self.token_scores(last)

    def token_scores(self, x):
        """The score head at every position of hidden states x [..., d] -> [...] float32 (a value model's values)."""
        if self.score is None:
            raise ValueError("this model has no score head (model.score_head)")
        return x.astype(jnp.float32) @ self.numerics.weight(self.score, jnp.float32)

    def forward(self, tokens, positions=None, segment_ids=None, key=None):
        """tokens [batch, length] -> (logits [batch, length, vocab] in the policy's logits dtype, MoE aux).

        positions default to 0..length-1 and segment_ids to one document per row.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        x, aux, _ = self.hidden(tokens, positions, segment_ids, key)
        return self.logits(x), aux

    def __call__(self, tokens, positions=None, segment_ids=None):
        return self.forward(tokens, positions, segment_ids)[0]

"""A CLIP-style dual encoder: an image tower (a vision transformer) and a text tower (the transformer of
model/transformer.py without its LM head, pooled at each caption's end token), each projected to a shared
width and L2-normalised, and the learned temperature (and, for the sigmoid loss, bias) that scales their
cosine similarities.

The image tower reuses the text tower's blocks (attention, MLP, norms) with bidirectional attention. Its
patch embedding is one matmul over flattened patches, the same linear map as CLIP's convolution with
stride = patch size (tests/test_clip.py checks it against that convolution).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention.mask import AttentionMask
from model.config import ModelConfig, Precision, VisionConfig
from model.layers import Norm, constrain, logical_param, normal
from model.precision import Numerics
from model.transformer import HIDDEN_AXES, Block, Context, Transformer, run_stack, stack_layers

CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
SIGLIP_INIT_LOG_SCALE, SIGLIP_INIT_BIAS = math.log(10.0), -10.0  # SigLIP's initialisation
EMBEDDING_AXES = ("batch", None)


def vision_tower_config(cfg: ModelConfig) -> ModelConfig:
    """The settings the image tower's blocks are built from: the text tower's kinds of norm, MLP, biases and
    attention kernel, the vision shapes, bidirectional attention over the patch sequence."""
    v = cfg.clip.vision
    return cfg.model_copy(update=dict(
        architecture="encoder", n_layers=v.n_layers, d_model=v.d_model, n_heads=v.n_heads, n_kv_heads=None,
        head_dim=None, d_ff=v.d_ff, position="learned", max_seq_len=v.tokens, sliding_window=None, clip=None,
    ))


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[batch, H, W, C] -> [batch, (H/p)(W/p), p*p*C]: row-major patches, each flattened (row, column, channel)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def pixels_to_inputs(images: jax.Array, v: VisionConfig, dtype) -> jax.Array:
    """uint8 pixels (what the data pipeline delivers) -> scaled to [0, 1] and normalised per channel, in float32,
    then cast to the compute dtype."""
    mean, std = jnp.asarray(v.pixel_mean, jnp.float32), jnp.asarray(v.pixel_std, jnp.float32)
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def l2_normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


class VisionTransformer(nnx.Module):
    """Patches -> (class token) + learned positions -> norm -> pre-norm blocks -> norm -> pooled [batch, width]."""

    def __init__(self, cfg: ModelConfig, numerics: Numerics, rngs: nnx.Rngs):
        v = cfg.clip.vision
        self.vision, self.tower = v, vision_tower_config(cfg)
        self.numerics = n = numerics
        std = cfg.init_std
        self.patch_embed = logical_param(rngs, normal(std), (v.patch_dim, v.d_model), n.params, (None, "embed"))
        self.class_token = (logical_param(rngs, normal(std), (v.d_model,), n.params, ("embed",))
                            if v.pooling == "class" else None)
        self.pos_embed = logical_param(rngs, normal(std), (v.tokens, v.d_model), n.params, (None, "embed"))
        self.pre_norm = Norm(self.tower, n)
        self.blocks = stack_layers(Block, self.tower, n, rngs, v.n_layers)
        self.final_norm = Norm(self.tower, n)

    def __call__(self, images: jax.Array) -> jax.Array:
        """uint8 images [batch, H, W, C] -> pooled features [batch, width] in the compute dtype."""
        v, n = self.vision, self.numerics
        patches = patchify(pixels_to_inputs(images, v, n.compute), v.patch_size)
        x = jnp.einsum("bnp,pd->bnd", patches, n.weight(self.patch_embed))
        if self.class_token is not None:
            cls = jnp.broadcast_to(n.weight(self.class_token), (x.shape[0], 1, v.d_model))
            x = jnp.concatenate([cls, x], axis=1)
        x = constrain(self.pre_norm(x + n.weight(self.pos_embed)), HIDDEN_AXES)
        ones = jnp.ones(x.shape[:2], jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        ctx = Context(positions, ones, AttentionMask(ones, ones, False, None))
        x, _, _ = run_stack(self.tower, self.blocks, v.n_layers, x, ctx)
        x = self.final_norm(x)
        return x[:, 0] if self.class_token is not None else jnp.mean(x, axis=1)


class ClipModel(nnx.Module):
    """Both towers, their projections to the shared embedding width, and the learned logit scale (and bias)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, precision: Precision = Precision()):
        if cfg.clip is None:
            raise ValueError("ClipModel needs model.clip (the image tower and the shared embedding width)")
        self.cfg, clip = cfg, cfg.clip
        self.numerics = n = Numerics.of(cfg, precision)
        self.text = Transformer(cfg, rngs, precision, lm_head=False)
        self.vision = VisionTransformer(cfg, n, rngs)
        # CLIP scales the projections' initialisation by the input width's inverse square root.
        self.text_proj = logical_param(rngs, normal(cfg.d_model**-0.5), (cfg.d_model, clip.embed_dim), n.params,
                                       ("embed", None))
        self.image_proj = logical_param(rngs, normal(clip.vision.d_model**-0.5), (clip.vision.d_model, clip.embed_dim),
                                        n.params, ("embed", None))
        sigmoid = clip.loss == "sigmoid"
        self.log_scale = logical_param(None, _constant(SIGLIP_INIT_LOG_SCALE if sigmoid else CLIP_INIT_LOG_SCALE),
                                       (), jnp.float32, ())
        self.logit_bias = logical_param(None, _constant(SIGLIP_INIT_BIAS), (), jnp.float32, ()) if sigmoid else None

    def encode_images(self, images: jax.Array) -> jax.Array:
        """uint8 images [batch, H, W, C] -> L2-normalised float32 embeddings [batch, embed_dim]."""
        pooled = self.vision(images)
        return constrain(l2_normalise(pooled @ self.numerics.weight(self.image_proj)), EMBEDDING_AXES)

    def encode_texts(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """tokens [batch, length] (each caption's end token last, padding after) and lengths [batch] ->
        L2-normalised float32 embeddings [batch, embed_dim], read at each caption's end token."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
        x, _, _ = self.text.hidden(tokens, positions, segment_ids)
        ends = jnp.maximum(lengths - 1, 0).astype(jnp.int32)
        pooled = jnp.take_along_axis(x, ends[:, None, None], axis=1)[:, 0]
        return constrain(l2_normalise(pooled @ self.numerics.weight(self.text_proj)), EMBEDDING_AXES)

    def __call__(self, images: jax.Array, tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_images(images), self.encode_texts(tokens, lengths)


def _constant(value: float):
    def init(shape, dtype):
        return jnp.full(shape, value, dtype)

    return init


def build_model(cfg: ModelConfig, rngs: nnx.Rngs, precision: Precision = Precision()):
    """The model a config describes: a dual encoder with model.clip, else a transformer with its LM head."""
    return ClipModel(cfg, rngs, precision) if cfg.clip is not None else Transformer(cfg, rngs, precision)

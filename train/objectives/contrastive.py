"""Contrastive losses of image-text dual encoders over a batch of matched pairs (row i of each side is a pair).

Both take L2-normalised embeddings [N, D] of the whole (global) batch: every other row is a
negative. Under jit with the rows sharded over the batch axes, the [N, N] similarity needs
the other side's rows from every device, so the partitioner gathers them; the loss is the
one-device loss of the same global batch.

- InfoNCE (CLIP, Radford et al. 2021): logits = exp(t) x image . text; the mean of the
  image->text and text->image cross entropies with the diagonal as targets. The scale is
  learned as its log, clamped so exp(t) stays at most 100 as CLIP does (past the clamp its
  gradient is zero).
- Sigmoid (SigLIP, Zhai et al. 2023): every pair is a binary problem, label +1 on the
  diagonal and -1 elsewhere; logits = exp(t) x image . text + b; the loss is
  -sum log sigmoid(label x logit) / N. No softmax over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from model.clip import CLIP_INIT_LOG_SCALE, SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_SCALE  # noqa: F401 (re-exported)

CLIP_MAX_SCALE = 100.0  # CLIP clamps its learned logit scale here


def similarity_logits(image, text, log_scale, bias=0.0, max_scale: float | None = None):
    """[N, N] float32 logits: the (clamped) learned scale times image . text, plus a bias."""
    log_scale = jnp.asarray(log_scale, jnp.float32)
    if max_scale is not None:
        log_scale = jnp.minimum(log_scale, math.log(max_scale))
    sims = jnp.einsum("id,jd->ij", image.astype(jnp.float32), text.astype(jnp.float32))
    return jnp.exp(log_scale) * sims + bias


def info_nce_loss(image, text, log_scale, max_scale: float = CLIP_MAX_SCALE):
    """(loss, metrics): CLIP's symmetric cross entropy over the batch; metrics hold each direction's loss, the
    scale in use, and each direction's top-1 accuracy within the batch."""
    logits = similarity_logits(image, text, log_scale, max_scale=max_scale)
    targets = jnp.arange(logits.shape[0])
    image_to_text = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[targets, targets])
    text_to_image = jnp.mean(jax.nn.logsumexp(logits, axis=0) - logits[targets, targets])
    metrics = {
        "image_to_text_loss": image_to_text,
        "text_to_image_loss": text_to_image,
        "logit_scale": jnp.exp(jnp.minimum(jnp.asarray(log_scale, jnp.float32), math.log(max_scale))),
        "image_to_text_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == targets),
        "text_to_image_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == targets),
    }
    return (image_to_text + text_to_image) / 2, metrics


def sigmoid_loss(image, text, log_scale, bias):
    """(loss, metrics): SigLIP's pairwise sigmoid loss, summed over all N x N pairs and divided by N."""
    logits = similarity_logits(image, text, log_scale, bias)
    n = logits.shape[0]
    labels = 2 * jnp.eye(n, dtype=jnp.float32) - 1
    loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
    metrics = {"logit_scale": jnp.exp(jnp.asarray(log_scale, jnp.float32)), "logit_bias": jnp.asarray(bias),
               "positive_logit_mean": jnp.mean(jnp.diag(logits))}
    return loss, metrics


def _rows(rows):
    return rows


@dataclass(frozen=True)
class Contrastive:
    """Image-text pairs, each row's caption the positive of its image and every other row's a negative."""

    loss_kind: str  # model.clip.loss: softmax (InfoNCE) or sigmoid
    name = "contrastive"
    pairwise = False
    rows = staticmethod(_rows)

    def prepare(self, batch, key):
        return batch

    def loss(self, image, text, log_scale, bias=None):
        """(loss, metrics) of L2-normalised embeddings of the global batch."""
        if self.loss_kind == "sigmoid":
            return sigmoid_loss(image, text, log_scale, bias)
        return info_nce_loss(image, text, log_scale)


def pair_loss(objective: Contrastive, graphdef, params, batch):
    """(loss, metrics) of a dual encoder's parameters on a batch of pairs (images, tokens, lengths)."""
    model = nnx.merge(graphdef, params)
    image, text = model(batch["images"], batch["tokens"], batch["lengths"])
    bias = None if model.logit_bias is None else model.logit_bias.get_value()
    return objective.loss(image, text, model.log_scale.get_value(), bias)

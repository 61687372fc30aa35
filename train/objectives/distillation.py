"""Knowledge distillation's loss: a frozen teacher's softened distribution as the student's target.

    loss = alpha * T^2 * KL + (1 - alpha) * cross entropy with the data

Both distributions are softened by the temperature T (softmax(logits / T)); T^2 keeps the
distillation gradients on the same scale as the data term's as T grows (Hinton et al.).
Forward KL(teacher || student) is the default; reverse KL(student || teacher) is mode-seeking.
With the teacher's top K only (offline, train/teacher.py), the KL covers the top K; the part
left out is the tail's sum p (log p - log q), at most (teacher mass outside the top K) x
(largest |log p - log q| there), which `topk_truncation_bound` computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from train.config import DistillConfig


def softened_log_probs(logits: jax.Array, temperature: float) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def kl_per_position(student_logits, temperature: float, kind: str, teacher_logits=None, topk=None) -> jax.Array:
    """KL between the softened teacher and student at each position, [batch, length], in float32.

    teacher_logits [b, l, vocab] (online), or topk = (teacher log-probs at T, token ids), each
    [b, l, K] (offline, forward KL over the teacher's top K).
    """
    s = softened_log_probs(student_logits, temperature)
    if topk is not None:
        t, ids = topk
        return jnp.sum(jnp.exp(t) * (t - jnp.take_along_axis(s, ids, axis=-1)), axis=-1)
    t = softened_log_probs(teacher_logits, temperature)
    if kind == "forward":
        return jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return jnp.sum(jnp.exp(s) * (s - t), axis=-1)


def combine(cfg: DistillConfig, kl, data_loss):
    """alpha * T^2 * KL + (1 - alpha) * data loss."""
    return cfg.alpha * cfg.temperature**2 * kl + (1 - cfg.alpha) * data_loss


def topk_truncation_bound(teacher_logits, student_logits, temperature: float, k: int) -> jax.Array:
    """Per position, a bound on |full forward KL - top-K KL|: the teacher's mass outside its top K
    times the largest |log p - log q| there."""
    t = softened_log_probs(teacher_logits, temperature)
    s = softened_log_probs(student_logits, temperature)
    kth = jax.lax.top_k(t, k)[0][..., -1:]
    tail = t < kth
    mass = jnp.sum(jnp.where(tail, jnp.exp(t), 0.0), axis=-1)
    return mass * jnp.max(jnp.where(tail, jnp.abs(t - s), 0.0), axis=-1)


@dataclass(frozen=True)
class Distillation:
    """What the train step needs: the config, and the teacher's graph when it runs online."""

    cfg: DistillConfig
    teacher_graphdef: Any | None  # None: the batch carries the teacher's top K

    def kl_sum(self, student_logits, batch, teacher_params) -> jax.Array:
        """The KL summed over the batch's weighted target positions."""
        if self.teacher_graphdef is None:
            per = kl_per_position(student_logits, self.cfg.temperature, "forward",
                                  topk=(batch["teacher_logprobs"], batch["teacher_ids"]))
        else:
            teacher = nnx.merge(self.teacher_graphdef, jax.lax.stop_gradient(teacher_params))
            teacher_logits, _ = teacher.forward(batch["inputs"], batch["positions"], batch["segment_ids"])
            per = kl_per_position(student_logits, self.cfg.temperature, self.cfg.kl, teacher_logits=teacher_logits)
        return jnp.sum(per * batch["weights"])

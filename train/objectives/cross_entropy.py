"""Token cross entropy, the loss of next-token and masked-token training, in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits, targets):
    """Per-position negative log-likelihood of the targets and log(Z), in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def cross_entropy_sums(logits, targets, weights):
    """Weighted sums of the negative log-likelihood and of log(Z)^2 (for z-loss), in float32."""
    nll, log_z = token_nll(logits, targets)
    return jnp.sum(nll * weights), jnp.sum(jnp.square(log_z) * weights)

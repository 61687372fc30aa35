"""Losses over pairs of responses to one prompt (chosen, rejected): the reward model's Bradley-Terry loss and
preference finetuning's DPO family. Pure functions of per-pair numbers, averaged over the pairs; the train
step computes those numbers (scores, or summed response log-probs) in one forward pass over both responses.

    Bradley-Terry  -log σ(r_c - r_r - margin) + c · (r_c + r_r)²          (the centring term keeps scores near 0)
    DPO            -(1-ε) log σ(β h) - ε log σ(-β h),  h = (π_c - ρ_c) - (π_r - ρ_r)   (ε: label smoothing)
    IPO            (h - 1/(2β))²
    hinge          max(0, 1 - β h)
    SimPO          -log σ(β (π_c/|y_c| - π_r/|y_r|) - γ)                   (no reference; length-normalised)

π: the policy's summed log-probs of a response's tokens, ρ: the frozen reference's, |y|: response tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREFERENCE_LOSSES = ("dpo", "ipo", "hinge", "simpo")


def bradley_terry(chosen, rejected, margin: float = 0.0, centering: float = 0.0) -> jax.Array:
    """Per-pair reward-model loss from the two scores."""
    return -jax.nn.log_sigmoid(chosen - rejected - margin) + centering * jnp.square(chosen + rejected)


def log_ratio_gap(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> jax.Array:
    """h: how much more the policy prefers chosen over rejected than the reference does (nats)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def preference_loss(kind: str, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, *,
                    beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                    chosen_tokens=None, rejected_tokens=None) -> jax.Array:
    """Per-pair loss of preference finetuning `kind` (one of PREFERENCE_LOSSES)."""
    if kind == "simpo":
        gap = policy_chosen / chosen_tokens - policy_rejected / rejected_tokens
        return -jax.nn.log_sigmoid(beta * gap - simpo_gamma)
    h = log_ratio_gap(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if kind == "dpo":
        return -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    if kind == "ipo":
        return jnp.square(h - 1 / (2 * beta))
    if kind == "hinge":
        return jax.nn.relu(1 - beta * h)
    raise ValueError(f"unknown preference loss {kind!r}; one of {', '.join(PREFERENCE_LOSSES)}")

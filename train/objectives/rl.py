"""Reinforcement learning from rewards: advantages, KL estimators and the clipped losses of GRPO and PPO.
Pure functions of per-token arrays [rows, length] with a mask of the completion's tokens; the RL step
(train/rl_step.py) computes the log-probs and values they take.

    group advantage   A_i = (r_i - mean_g r) / (std_g r + eps)          std: the sample std (ddof 1) of the group
    k1                logπ - logρ                                        (unbiased, can be negative)
    k3                exp(logρ - logπ) - (logρ - logπ) - 1               (unbiased, never negative; Schulman 2020)
    GAE               δ_t = r_t + γ V_{t+1} - V_t,  A_t = δ_t + γλ A_{t+1},  returns R_t = A_t + V_t
    policy loss       -min(ρ_t A_t, clip(ρ_t, 1 - ε_low, 1 + ε_high) A_t),  ρ_t = exp(logπ_t - logπ_old,t)
    value loss        ½ max((V - R)², (V_old + clip(V - V_old, ±c) - R)²)

Token-level means: every completion token of the batch weighs the same (a long answer is not scaled down).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k3")


def group_advantages(rewards: jax.Array, group_size: int, eps: float, scale: bool = True) -> jax.Array:
    """[rows] rewards, rows grouped by consecutive `group_size` (completions of one prompt) -> [rows]
    advantages: each reward's distance from its group's mean, in units of the group's sample std (+ eps)."""
    grouped = rewards.reshape(-1, group_size)
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale:
        centred = centred / (jnp.std(grouped, axis=1, keepdims=True, ddof=1) + eps)
    return centred.reshape(-1)


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(π || ρ) from the sampled token's log-probs under the policy and the reference."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return jnp.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; one of {', '.join(KL_ESTIMATORS)}")


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation along each row's completion -> (advantages, returns), both [rows, T].
    rewards, values, mask [rows, T]; the value after a row's last masked-in token is 0 (the episode ends)."""
    mask = mask.astype(jnp.float32)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1) * jnp.concatenate(
        [mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values - values) * mask

    def back(carry, xs):
        delta, m = xs
        advantage = delta + gamma * lam * carry * m
        return advantage * m, advantage * m

    _, advantages = jax.lax.scan(back, jnp.zeros(rewards.shape[0], jnp.float32), (deltas.T, mask.T), reverse=True)
    advantages = advantages.T
    return advantages, (advantages + values) * mask


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """x shifted to mean 0 and scaled to variance 1 over the masked-in entries (0 elsewhere)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def clipped_policy_loss(logp, old_logp, advantages, clip_low: float, clip_high: float):
    """Per-token clipped surrogate loss and (ratio, whether the clip is what the loss sees)."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1 - clip_low, 1 + clip_high) * advantages
    return -jnp.minimum(unclipped, clipped), (ratio, clipped < unclipped)


def clipped_value_loss(values, old_values, returns, clip: float) -> jax.Array:
    """Per-token value loss; the new value may move at most `clip` from the value the rollout was scored with."""
    moved = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(moved - returns))

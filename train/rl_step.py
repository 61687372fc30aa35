"""The compiled halves of an RL step (train/rl_loop.py runs them):

- the scoring pass, one program over the whole rollout: the old policy's per-token log-probs, the reference's
  (the LoRA base inside the same program, or a frozen reference's parameters; none when no KL is asked for),
  a PPO value model's values, then the advantages (GRPO's group-normalised rewards, or PPO's GAE whitened);
- the update, one optimizer step on a minibatch through the train step's pieces (microbatch accumulation,
  the optimizer, the bad-step guard): the clipped policy loss, the KL term when it is in the loss, and PPO's
  clipped value loss, whose gradients go to the value model's own optimizer.

Log-probs on both sides are of the sampling distribution: the logits divided by the temperature, with the
tokens generation may never produce masked out, as model/generate.py samples them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from train.config import ExperimentConfig
from train.objectives import rl as losses
from train.pairs import without_adapters
from train.sharding import Rules, activation_rules, batch_sharding, replicated
from train.state import State, Trainable
from train.step import (
    _split_microbatches, accumulated_gradients, advanced_state, guard_verdict, guarded_update, next_guard, optimizer_update,
    router_losses,
)


def token_log_probs(logits, targets, temperature: float, allowed):
    """(log-prob of each target [rows, L], entropy of each position's distribution [rows, L]) under the sampling
    distribution."""
    z = jnp.where(allowed, logits.astype(jnp.float32) / temperature, -jnp.inf)
    logp_all = jax.nn.log_softmax(z)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    logp = jnp.where(jnp.asarray(allowed)[targets], logp, 0.0)  # off the completion a target may be padding
    probs = jnp.exp(logp_all)
    entropy = -jnp.sum(jnp.where(allowed, probs * logp_all, 0.0), axis=-1)
    return logp, entropy


def _hidden(graphdef, params, rows):
    model = nnx.merge(graphdef, params)
    x, aux, _ = model.hidden(rows["inputs"], rows["positions"], rows["segment_ids"])
    return model, x, aux


def policy_log_probs(graphdef, params, rows, temperature, allowed):
    model, x, aux = _hidden(graphdef, params, rows)
    logp, entropy = token_log_probs(model.logits(x), rows["targets"], temperature, allowed)
    return logp, entropy, aux


def values_of(graphdef, params, rows):
    model, x, _ = _hidden(graphdef, params, rows)
    return model.token_scores(x)


@dataclass(frozen=True)
class RlPrograms:
    score: Any  # jitted (params, reference params | None, value params | None, rows, rewards, failed) -> scored
    update: Any  # jitted (state, minibatch) -> (state, metrics), state donated


def reference_kind(cfg: ExperimentConfig) -> str:
    """none (no KL measured), lora_base (the policy without its adapters) or params (a frozen copy)."""
    rl = cfg.rl
    if rl.kl_coef == 0 and not rl.track_kl:
        return "none"
    return "lora_base" if cfg.model.lora is not None else "params"


def make_scoring(cfg: ExperimentConfig, graphdef, value_graphdef, allowed, mesh, rules: Rules):
    """The scoring pass. The rows go through the models in as many chunks as the update has microbatches
    (a lax.map), so scoring never holds more logits at once than an update does."""
    rl, kind = cfg.rl, reference_kind(cfg)
    chunks = rl.minibatches * cfg.train.microbatches
    rows_sharding = batch_sharding(mesh, rules)

    def per_row(params, reference, value_params, rows):
        logp, entropy, _ = policy_log_probs(graphdef, params, rows, rl.temperature, allowed)
        out = {"old_logp": logp, "entropy": entropy}
        if kind != "none":
            ref_params = without_adapters(params) if kind == "lora_base" else reference
            out["ref_logp"], _, _ = policy_log_probs(graphdef, ref_params, rows, rl.temperature, allowed)
        if rl.algorithm == "ppo":
            out["values"] = values_of(value_graphdef, value_params, rows)
        return out

    def chunked(params, reference, value_params, rows):
        if chunks == 1:
            return per_row(params, reference, value_params, rows)
        split = _split_microbatches(rows, chunks, mesh, rows_sharding.spec[0])  # [chunks, R/chunks, L]
        out = jax.lax.map(lambda r: per_row(params, reference, value_params, r), split)
        return {k: jax.lax.with_sharding_constraint(v.swapaxes(0, 1).reshape(-1, v.shape[-1]), rows_sharding)
                for k, v in out.items()}

    def score(params, reference, value_params, rows, rewards, failed):
        with activation_rules(mesh, rules):
            return scored(params, reference, value_params, rows, rewards, failed)

    def scored(params, reference, value_params, rows, rewards, failed):
        mask = rows["weights"] * (1.0 - failed[:, None])  # a failed group is skipped: it weighs nothing
        per = chunked(params, reference, value_params, rows)
        old_logp = per["old_logp"]
        out, stats = {"old_logp": old_logp}, {"entropy": losses.masked_mean(per["entropy"], mask)}
        kl = None
        if kind != "none":
            out["ref_logp"] = per["ref_logp"]
            kl = losses.kl_estimate(old_logp, out["ref_logp"], rl.kl_estimator)
            stats["kl"] = losses.masked_mean(kl, mask)
        penalty = rl.kl_coef * kl if kl is not None and rl.kl_placement == "reward" else jnp.zeros_like(old_logp)
        if rl.algorithm == "grpo":
            sequence = rewards - jnp.sum(penalty * mask, axis=1)
            advantages = losses.group_advantages(sequence, rl.group_size, rl.std_eps, rl.scale_rewards)
            out["advantages"] = advantages[:, None] * mask
        else:
            values = per["values"] * mask
            last = jnp.cumsum(mask, axis=1) == jnp.sum(mask, axis=1, keepdims=True)  # the completion's last token
            token_rewards = (rewards[:, None] * (last & (mask > 0)) - penalty) * mask
            advantages, returns = losses.gae(token_rewards, values, mask, rl.gamma, rl.lam)
            out.update(advantages=losses.whiten(advantages, mask), old_values=values, returns=returns)
            stats["value_mean"] = losses.masked_mean(values, mask)
        out["weights"] = mask
        return out, stats

    return score


def make_update(cfg: ExperimentConfig, graphdef, value_graphdef, tx, value_tx, schedule, *, mesh, rules: Rules,
                trainable: Trainable, allowed, moe=None):
    """(state, minibatch) -> (state, metrics): one guarded optimizer step of the policy (and the value model)."""
    rl, train_cfg = cfg.rl, cfg.train
    batch_axes = batch_sharding(mesh, rules).spec[0]
    kl_in_loss = reference_kind(cfg) != "none" and rl.kl_placement == "loss" and rl.kl_coef > 0

    def loss_fn(params, mb, total):
        learned, frozen, value_params = params
        model, x, aux = _hidden(graphdef, Trainable.join(learned, frozen), mb)
        logp, entropy = token_log_probs(model.logits(x), mb["targets"], rl.temperature, allowed)
        w = mb["weights"]
        per_token, (ratio, clipped) = losses.clipped_policy_loss(logp, mb["old_logp"], mb["advantages"],
                                                                 rl.clip_low, rl.clip_high)
        stats = {"policy_loss": jnp.sum(per_token * w) / total}
        if kl_in_loss:
            kl = losses.kl_estimate(logp, mb["ref_logp"], rl.kl_estimator)
            per_token = per_token + rl.kl_coef * kl
            stats["kl_loss"] = jnp.sum(kl * w) / total
        loss = jnp.sum(per_token * w) / total
        if value_params is not None:
            values = values_of(value_graphdef, value_params, mb)
            value_loss = jnp.sum(losses.clipped_value_loss(values, mb["old_values"], mb["returns"], rl.value_clip)
                                 * w) / total
            loss, stats["value_loss"] = loss + value_loss, value_loss
        if aux:  # an MoE policy's routers keep their regularisers
            loss = loss + router_losses(moe, aux) * jnp.sum(w) / total
        stats.update(
            clip_fraction=jnp.sum(clipped * w) / total, entropy=jnp.sum(entropy * w) / total,
            ratio_max=jnp.max(jnp.where(w > 0, ratio, 0.0)), inverse_ratio_max=jnp.max(jnp.where(w > 0, 1 / ratio, 0.0)),
        )
        return loss, (loss, stats)

    def combine(a, b):  # microbatches: sums add, maxima take the larger
        loss_a, stats_a = a
        loss_b, stats_b = b
        return loss_a + loss_b, {k: jnp.maximum(v, stats_b[k]) if k.endswith("_max") else v + stats_b[k]
                                 for k, v in stats_a.items()}

    def update(state: State, mb):
        with activation_rules(mesh, rules):
            total = jnp.maximum(jnp.sum(mb["weights"]), 1.0)  # token-level mean over the minibatch
            learned, frozen = trainable.split(state["params"])
            value_params = state["value"]["params"] if "value" in state else None
            grads, (loss, stats) = accumulated_gradients(
                lambda p, m: loss_fn((p[0], frozen, p[1]), m, total), (learned, value_params), mb,
                train_cfg.microbatches, mesh, batch_axes, combine=combine)
            policy_grads, value_grads = grads
            grad_norm = optax.tree.norm(grads)
            optimized, params, opt_state, learning_rate = optimizer_update(tx, schedule, state, policy_grads, trainable)
            accept, finite, spike = guard_verdict(state["guard"], loss, grad_norm, train_cfg.spike_factor)
            guard = next_guard(state["guard"], loss, accept, finite, spike)
            new_state = advanced_state(state, accept, optimized, params, opt_state, guard)
            if value_params is not None:  # the value model's own optimizer, on the same schedule and guard
                value = {**state["value"], "step": state["step"], "guard": state["guard"]}
                updated = optimizer_update(value_tx, schedule, value, value_grads, Trainable(False))[:3]
                new_state["value"] = guarded_update(state["value"], accept, *updated)
            ratio_min = 1 / jnp.maximum(stats.pop("inverse_ratio_max"), 1e-30)
            metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate, "ratio_min": ratio_min,
                       "skipped_nonfinite_total": guard["skipped_nonfinite"], "skipped_spike_total": guard["skipped_spike"],
                       "bad_streak": guard["bad_streak"], **stats}
            return new_state, metrics

    return update


def compile_rl(cfg, graphdef, value_graphdef, tx, value_tx, schedule, *, mesh, rules, trainable, allowed,
               state_shardings, reference_shardings, value_shardings) -> RlPrograms:
    rows = batch_sharding(mesh, rules)
    score = make_scoring(cfg, graphdef, value_graphdef, allowed, mesh, rules)
    per_row = NamedSharding(mesh, PartitionSpec(rows.spec[0]))
    score = jax.jit(score, in_shardings=(state_shardings["params"], reference_shardings, value_shardings, rows,
                                         per_row, per_row),
                    out_shardings=replicated(mesh))  # every process reads the whole scored rollout
    update = make_update(cfg, graphdef, value_graphdef, tx, value_tx, schedule, mesh=mesh, rules=rules,
                         trainable=trainable, allowed=allowed, moe=cfg.model.moe)
    update = jax.jit(update, in_shardings=(state_shardings, rows), out_shardings=(state_shardings, replicated(mesh)),
                     donate_argnums=0)
    return RlPrograms(score, update)


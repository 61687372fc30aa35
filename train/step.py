"""The jitted train and eval steps: next-token cross entropy in float32, gradient accumulation."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from model.config import MoeConfig
from train.config import TrainConfig
from train.objectives import Objective
from train.objectives.cross_entropy import cross_entropy_sums
from train.objectives.distillation import Distillation, combine
from train.objectives.next_token import NextToken
from train.sharding import Rules, activation_rules, batch_sharding, replicated
from train.state import State

Batch = dict[str, jax.Array]

LOSS_EMA_DECAY = 0.99
SPIKE_MIN_HISTORY = 10  # accepted steps before the running mean is trusted to call a spike


def model_sums(graphdef, params, batch: Batch, key=None):
    """Loss sums over the batch's weighted targets, the logits, and the model's MoE aux (empty if dense)."""
    model = nnx.merge(graphdef, params)
    logits, aux = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"], key)
    nll, z = cross_entropy_sums(logits, batch["targets"], batch["weights"])
    return nll, z, logits, aux


def router_losses(moe, aux: dict) -> jax.Array:
    """The MoE routers' regularisers with their configured coefficients (0 for a dense model)."""
    if not aux:
        return jnp.zeros((), jnp.float32)
    return moe.aux_loss_coef * aux["moe_aux_loss"] + moe.z_loss_coef * aux["moe_z_loss"]


def step_keys(rng) -> tuple[jax.Array, jax.Array]:
    """This step's keys for the objective (e.g. masking) and the model (router jitter)."""
    key = jax.random.wrap_key_data(rng)
    return jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)


def _split_microbatches(batch: Batch, n: int, mesh, batch_axes) -> Batch:
    """[B, ...] -> [n, B/n, ...], microbatch j taking rows j, j+n, ...: every device keeps its share."""

    def split(x):
        y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, batch_axes, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def _guarded(accept, new, old):
    return jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)


def _to_float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def make_train_step(
    graphdef, tx: optax.GradientTransformation, schedule, cfg: TrainConfig, *, mesh, rules: Rules,
    objective: Objective = NextToken(), moe: MoeConfig | None = None, kd: Distillation | None = None,
) -> Callable[..., tuple[State, dict]]:
    """One optimizer step over the global batch (split into cfg.microbatches): (state, batch[, teacher
    params]) -> (state, metrics).

    A step whose loss or gradient norm is not finite, or whose loss exceeds
    cfg.spike_factor times the running mean, leaves parameters and optimizer state
    unchanged; the metrics say so. An MoE model (`moe`) adds its routers'
    losses, weighted by each microbatch's share of the targets, and logs them.
    With `kd` the loss is distillation's (train/objectives/distillation.py): the teacher's parameters come
    in as their own argument, outside the state, so they get no gradients and no
    optimizer state. A state with a float32 "master" copy is updated through it.
    Gradients are accumulated, clipped and fed to the optimizer in float32, whatever
    dtype the backward pass produced them in.
    """
    microbatches, z_loss = cfg.microbatches, cfg.z_loss
    jitter = moe is not None and moe.router_jitter > 0
    batch_axes = batch_sharding(mesh, rules).spec[0]

    def step(state: State, batch: Batch, teacher_params=None):
        with activation_rules(mesh, rules):
            return guarded_step(state, batch, teacher_params)

    def guarded_step(state: State, batch: Batch, teacher_params):
        objective_key, model_key = step_keys(state["rng"])
        batch = objective.prepare(batch, objective_key)
        total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

        def loss_fn(params, mb):
            nll, z, logits, aux = model_sums(graphdef, params, mb, model_key if jitter else None)
            share = jnp.sum(mb["weights"]) / total_weight
            data_loss, extra = nll / total_weight, {}
            if kd is not None:
                kl = kd.kl_sum(logits, mb, teacher_params) / total_weight
                data_loss, extra = combine(kd.cfg, kl, data_loss), {"distill_kl": kl}
            # The regularisers (z-loss, the routers') keep their own weights whatever the objective.
            loss = data_loss + z_loss * z / total_weight + share * router_losses(moe, aux)
            return loss, (nll, {**extra, **jax.tree.map(lambda a: a * share, aux)})

        grad_fn = jax.grad(loss_fn, has_aux=True)
        if microbatches == 1:
            grads, (nll, aux) = grad_fn(state["params"], batch)
            grads = _to_float32(grads)
        else:

            def accumulate(carry, mb):
                grads, rest = grad_fn(state["params"], mb)
                return jax.tree.map(jnp.add, carry, (_to_float32(grads), rest)), None

            mbs = _split_microbatches(batch, microbatches, mesh, batch_axes)
            shapes = jax.eval_shape(grad_fn, state["params"], jax.tree.map(lambda a: a[0], mbs))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes[0]), jax.tree.map(jnp.zeros_like, shapes[1])
            (grads, (nll, aux)), _ = jax.lax.scan(accumulate, zeros, mbs)

        guard = state["guard"]
        loss, grad_norm = nll / total_weight, optax.tree.norm(grads)
        optimized = state.get("master", state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], optimized)
        learning_rate = schedule(state["step"]) * guard["lr_scale"]
        updates = jax.tree.map(lambda u: u * learning_rate.astype(u.dtype), updates)
        optimized = optax.apply_updates(optimized, updates)
        params = jax.tree.map(lambda new, old: new.astype(old.dtype), optimized, state["params"])

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        mean_loss = guard["loss_ema"] / (1 - LOSS_EMA_DECAY ** guard["accepted"].astype(jnp.float32))
        spike = (
            (guard["accepted"] >= SPIKE_MIN_HISTORY) & (loss > cfg.spike_factor * mean_loss)
            if cfg.spike_factor is not None
            else jnp.zeros((), bool)
        )
        accept = finite & ~spike
        new_state = {
            **({"master": _guarded(accept, optimized, state["master"])} if "master" in state else {}),
            "params": _guarded(accept, params, state["params"]),
            "opt_state": _guarded(accept, opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            # Advanced every step so stochastic objectives draw fresh, resumable randomness.
            "rng": jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0]),
            "guard": {
                "lr_scale": guard["lr_scale"],
                "loss_ema": jnp.where(accept, LOSS_EMA_DECAY * guard["loss_ema"] + (1 - LOSS_EMA_DECAY) * loss,
                                      guard["loss_ema"]),
                "accepted": guard["accepted"] + accept.astype(jnp.int32),
                "bad_streak": jnp.where(finite, 0, guard["bad_streak"] + 1),
                "skipped_nonfinite": guard["skipped_nonfinite"] + (~finite).astype(jnp.int32),
                "skipped_spike": guard["skipped_spike"] + spike.astype(jnp.int32),
            },
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "skipped_nonfinite_total": new_state["guard"]["skipped_nonfinite"],
            "skipped_spike_total": new_state["guard"]["skipped_spike"],
            "bad_streak": new_state["guard"]["bad_streak"],
            **aux,
        }
        return new_state, metrics

    return step


def jit_train_step(step, state_shardings, batch_sharding, mesh, teacher_shardings=None):
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding) + ((teacher_shardings,) if teacher_shardings else ()),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )

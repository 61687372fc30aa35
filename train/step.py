"""The jitted train and eval steps: next-token cross entropy in float32, gradient accumulation."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from model.layers import activation_sharding
from train.config import TrainConfig
from train.sharding import Rules, batch_sharding, mesh_spec, replicated
from train.state import State

Batch = dict[str, jax.Array]

LOSS_EMA_DECAY = 0.99
SPIKE_MIN_HISTORY = 10  # accepted steps before the running mean is trusted to call a spike


def cross_entropy_sums(logits, targets, weights):
    """Weighted sums of the negative log-likelihood and of log(Z)^2 (for z-loss), in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * weights), jnp.sum(jnp.square(log_z) * weights)


def activation_rules(mesh, rules: Rules):
    """The model's activation hints resolved through the same rules as its parameters."""
    return activation_sharding(lambda axes, shape: NamedSharding(mesh, mesh_spec(PartitionSpec(*axes), shape, mesh, rules)))


def model_sums(graphdef, params, batch: Batch):
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return cross_entropy_sums(logits, batch["targets"], batch["weights"])


def _split_microbatches(batch: Batch, n: int, mesh, batch_axes) -> Batch:
    """[B, ...] -> [n, B/n, ...], microbatch j taking rows j, j+n, ...: every device keeps its share."""

    def split(x):
        y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, batch_axes, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))

    return jax.tree.map(split, batch)


def _guarded(accept, new, old):
    return jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)


def make_train_step(
    graphdef, tx: optax.GradientTransformation, schedule, cfg: TrainConfig, *, mesh, rules: Rules
) -> Callable[[State, Batch], tuple[State, dict]]:
    """One optimizer step over the global batch (split into cfg.microbatches).

    A step whose loss or gradient norm is not finite, or whose loss exceeds
    cfg.spike_factor times the running mean, leaves parameters and optimizer state
    unchanged; the metrics say so.
    """
    microbatches, z_loss = cfg.microbatches, cfg.z_loss
    batch_axes = batch_sharding(mesh, rules).spec[0]

    def step(state: State, batch: Batch):
        with activation_rules(mesh, rules):
            return guarded_step(state, batch)

    def guarded_step(state: State, batch: Batch):
        total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

        def objective(params, mb):
            nll, z = model_sums(graphdef, params, mb)
            return (nll + z_loss * z) / total_weight, nll

        grad_fn = jax.grad(objective, has_aux=True)
        if microbatches == 1:
            grads, nll = grad_fn(state["params"], batch)
        else:

            def accumulate(carry, mb):
                grads, nll = grad_fn(state["params"], mb)
                return jax.tree.map(jnp.add, carry, (grads, nll)), None

            zeros = (jax.tree.map(jnp.zeros_like, state["params"]), jnp.zeros((), jnp.float32))
            (grads, nll), _ = jax.lax.scan(accumulate, zeros, _split_microbatches(batch, microbatches, mesh, batch_axes))

        guard = state["guard"]
        loss, grad_norm = nll / total_weight, optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        learning_rate = schedule(state["step"]) * guard["lr_scale"]
        updates = jax.tree.map(lambda u: u * learning_rate.astype(u.dtype), updates)
        params = optax.apply_updates(state["params"], updates)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        mean_loss = guard["loss_ema"] / (1 - LOSS_EMA_DECAY ** guard["accepted"].astype(jnp.float32))
        spike = (
            (guard["accepted"] >= SPIKE_MIN_HISTORY) & (loss > cfg.spike_factor * mean_loss)
            if cfg.spike_factor is not None
            else jnp.zeros((), bool)
        )
        accept = finite & ~spike
        new_state = {
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
        }
        return new_state, metrics

    return step


def make_eval_step(graphdef, token_bytes: jax.Array, *, mesh, rules: Rules):
    """Sums over one batch: nll (nats), predicted tokens, and the UTF-8 bytes those tokens spell."""

    def step(params, batch: Batch):
        with activation_rules(mesh, rules):
            nll, _ = model_sums(graphdef, params, batch)
        return {
            "nll": nll,
            "tokens": jnp.sum(batch["weights"]),
            "bytes": jnp.sum(token_bytes[batch["targets"]] * batch["weights"]),
        }

    return step


def jit_train_step(step, state_shardings, batch_sharding, mesh):
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )


def jit_eval_step(step, param_shardings, batch_sharding, mesh):
    return jax.jit(step, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated(mesh))

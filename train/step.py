"""The jitted train and eval steps: next-token cross entropy in float32, gradient accumulation."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from train.sharding import replicated
from train.state import State

Batch = dict[str, jax.Array]


def cross_entropy_sums(logits, targets, weights):
    """Weighted sums of the negative log-likelihood and of log(Z)^2 (for z-loss), in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * weights), jnp.sum(jnp.square(log_z) * weights)


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


def make_train_step(
    graphdef, tx: optax.GradientTransformation, schedule, *, microbatches: int, z_loss: float, mesh, batch_axes
) -> Callable[[State, Batch], tuple[State, dict]]:
    def step(state: State, batch: Batch):
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

        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            # Advanced every step so stochastic objectives draw fresh, resumable randomness.
            "rng": jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0]),
        }
        metrics = {
            "loss": nll / total_weight,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
            "target_tokens": total_weight,
        }
        return new_state, metrics

    return step


def make_eval_step(graphdef, token_bytes: jax.Array):
    """Sums over one batch: nll (nats), predicted tokens, and the UTF-8 bytes those tokens spell."""

    def step(params, batch: Batch):
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

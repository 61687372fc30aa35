"""The jitted train step: the objective's loss (next-token or masked-token cross entropy, a distillation's
mix, or a pairwise objective's over preference pairs) with its regularisers, gradients of the trained
parameters accumulated over microbatches, the optimizer update, and the guard that skips non-finite or
spiking steps."""

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
from train.objectives.contrastive import pair_loss
from train.objectives.cross_entropy import cross_entropy_sums
from train.objectives.distillation import Distillation, combine
from train.objectives.next_token import NextToken
from train.pairs import pair_terms
from train.sharding import Rules, activation_rules, batch_sharding, replicated
from train.state import State, Trainable

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


def _to_float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def make_loss_fn(graphdef, cfg: TrainConfig, total_weight, *, model_key=None, moe: MoeConfig | None = None,
                 kd: Distillation | None = None, teacher_params=None):
    """(params, microbatch) -> (loss, (nll sum, aux)): the objective's term (cross entropy, or distillation's
    mix of KL and cross entropy) over the whole batch's weight, plus the regularisers (z-loss and the
    MoE routers' losses, weighted by the microbatch's share of the targets)."""

    def loss_fn(params, mb):
        nll, z, logits, aux = model_sums(graphdef, params, mb, model_key)
        share = jnp.sum(mb["weights"]) / total_weight
        data_loss, extra = nll / total_weight, {}
        if kd is not None:
            kl = kd.kl_sum(logits, mb, teacher_params) / total_weight
            data_loss, extra = combine(kd.cfg, kl, data_loss), {"distill_kl": kl}
        # The regularisers (z-loss, the routers') keep their own weights whatever the objective.
        loss = data_loss + cfg.z_loss * z / total_weight + share * router_losses(moe, aux)
        return loss, (nll, {**extra, **jax.tree.map(lambda a: a * share, aux)})

    return loss_fn


def make_pair_loss_fn(graphdef, objective, total_pairs, *, model_key=None, moe: MoeConfig | None = None,
                      reference_params=None):
    """(params, microbatch of pairs) -> (loss, (loss sum, metrics summed over the pairs / total, aux)): the
    pairwise objective's mean over the whole batch's pairs, plus the MoE routers' losses."""

    def loss_fn(params, mb):
        per_pair, stats, aux = pair_terms(objective, graphdef, params, mb, reference_params, model_key)
        share = mb["inputs"].shape[0] / total_pairs
        loss = jnp.sum(per_pair) / total_pairs + share * router_losses(moe, aux)
        stats = {f"{objective.name}_{k}": jnp.sum(v) / total_pairs for k, v in stats.items()}
        return loss, (jnp.sum(per_pair), {**stats, **jax.tree.map(lambda a: a * share, aux)})

    return loss_fn


def make_contrastive_loss_fn(graphdef, objective):
    """(params, batch of image-text pairs) -> (loss, (loss, metrics)): the contrastive loss of the global batch
    (one microbatch: every pair is compared with all the others)."""

    def loss_fn(params, batch):
        loss, metrics = pair_loss(objective, graphdef, params, batch)
        return loss, (loss, metrics)

    return loss_fn


def accumulated_gradients(loss_fn, params, batch: Batch, microbatches: int, mesh, batch_axes, combine=None):
    """(float32 gradients, (nll sum, aux)) summed over the batch's microbatches (a scan when more than one);
    `combine(a, b)` merges two microbatches' aux where a sum is not the merge (default: sum)."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if microbatches == 1:
        grads, rest = grad_fn(params, batch)
        return _to_float32(grads), rest
    combine = combine or (lambda a, b: jax.tree.map(jnp.add, a, b))

    def accumulate(carry, mb):
        grads, rest = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, carry[0], _to_float32(grads)), combine(carry[1], rest)), None

    mbs = _split_microbatches(batch, microbatches, mesh, batch_axes)
    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda a: a[0], mbs))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes[0]), jax.tree.map(jnp.zeros_like, shapes[1])
    total, _ = jax.lax.scan(accumulate, zeros, mbs)
    return total


def optimizer_update(tx: optax.GradientTransformation, schedule, state: State, grads, trainable: Trainable):
    """The optimizer's step on the trained parameters at the scheduled learning rate (times the guard's
    scale) -> (the updated float32 master copy, or trained parameters; all parameters in their own dtypes;
    the optimizer state; the rate)."""
    learned, frozen = trainable.split(state["params"])
    optimized = state.get("master", learned)
    updates, opt_state = tx.update(grads, state["opt_state"], optimized)
    learning_rate = schedule(state["step"]) * state["guard"]["lr_scale"]
    updates = jax.tree.map(lambda u: u * learning_rate.astype(u.dtype), updates)
    optimized = optax.apply_updates(optimized, updates)
    learned = jax.tree.map(lambda new, old: new.astype(old.dtype), optimized, learned)
    return optimized, trainable.join(learned, frozen), opt_state, learning_rate


def guard_verdict(guard: dict, loss, grad_norm, spike_factor: float | None):
    """(accept, finite, spike): a step is applied only if its loss and gradient norm are finite and, with a
    spike factor, its loss is not that many times the running mean (once the mean has enough history)."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    mean_loss = guard["loss_ema"] / (1 - LOSS_EMA_DECAY ** guard["accepted"].astype(jnp.float32))
    spike = (
        (guard["accepted"] >= SPIKE_MIN_HISTORY) & (loss > spike_factor * mean_loss)
        if spike_factor is not None
        else jnp.zeros((), bool)
    )
    return finite & ~spike, finite, spike


def next_guard(guard: dict, loss, accept, finite, spike) -> dict:
    """The guard's bookkeeping after this step (checkpointed with the state)."""
    return {
        "lr_scale": guard["lr_scale"],
        "loss_ema": jnp.where(accept, LOSS_EMA_DECAY * guard["loss_ema"] + (1 - LOSS_EMA_DECAY) * loss,
                              guard["loss_ema"]),
        "accepted": guard["accepted"] + accept.astype(jnp.int32),
        "bad_streak": jnp.where(finite, 0, guard["bad_streak"] + 1),
        "skipped_nonfinite": guard["skipped_nonfinite"] + (~finite).astype(jnp.int32),
        "skipped_spike": guard["skipped_spike"] + spike.astype(jnp.int32),
    }


def weight_and_stop_totals(weights, stop):
    """The batch's total token weight and its count of stop requests (None without `stop`, one [rows, 1] flag
    per row), from one reduction over the rows. A collective of its own for the stop requests would depend on
    nothing else in the step, and XLA:CPU may run independent collectives in a different order on different
    devices: gloo then pairs one device's message with another's and aborts the job."""
    if stop is None:
        return jnp.sum(weights), None
    per_row = jnp.stack([jnp.sum(weights, axis=1), stop[:, 0].astype(weights.dtype)], axis=1)
    totals = jnp.sum(per_row, axis=0)
    return totals[0], totals[1]


def _guarded(accept, new, old):
    return jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)


def guarded_update(state: State, accept, optimized, params, opt_state) -> State:
    """A model's trained parts after a step: the optimizer's update where the guard accepts it, else unchanged."""
    return {
        **({"master": _guarded(accept, optimized, state["master"])} if "master" in state else {}),
        "params": _guarded(accept, params, state["params"]),
        "opt_state": _guarded(accept, opt_state, state["opt_state"]),
    }


def advanced_state(state: State, accept, optimized, params, opt_state, guard) -> State:
    """The state after a step: the guarded update, the step counted, the key advanced (every step, so stochastic
    objectives draw fresh, resumable randomness) and the guard's bookkeeping."""
    return {
        **guarded_update(state, accept, optimized, params, opt_state),
        "step": state["step"] + 1,
        "rng": jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0]),
        "guard": guard,
    }


def make_train_step(
    graphdef, tx: optax.GradientTransformation, schedule, cfg: TrainConfig, *, mesh, rules: Rules,
    objective: Objective = NextToken(), moe: MoeConfig | None = None, kd: Distillation | None = None,
    trainable: Trainable = Trainable(False),
) -> Callable[..., tuple[State, dict]]:
    """One optimizer step over the global batch (split into cfg.microbatches): (state, batch[, teacher
    params]) -> (state, metrics).

    The objective prepares the batch (masked-token models draw this step's masks), the loss is assembled
    (`make_loss_fn`), gradients are accumulated over the microbatches, clipped and fed to the optimizer in
    float32 whatever dtype the backward pass produced them in (`accumulated_gradients`,
    `optimizer_update`), and the guard decides whether the update is applied (`guard_verdict`): a step
    whose loss or gradient norm is not finite, or whose loss exceeds cfg.spike_factor times the running
    mean, leaves parameters and optimizer state unchanged; the metrics say so. With `kd` the teacher's
    parameters come in as their own argument, outside the state, so they get no gradients and no
    optimizer state; so do a preference objective's frozen reference parameters. A state with a float32
    "master" copy is updated through it. Only `trainable`'s part of the parameters gets gradients (a LoRA
    model's adapters).
    """
    jitter = moe is not None and moe.router_jitter > 0
    batch_axes = batch_sharding(mesh, rules).spec[0]

    def step(state: State, batch: Batch, teacher_params=None):
        batch = dict(batch)
        stop = batch.pop("stop", None)  # the rows' stop requests (train/loop.py)
        with activation_rules(mesh, rules):
            return guarded_step(state, batch, teacher_params, stop)

    def guarded_step(state: State, batch: Batch, frozen_params, stop):
        objective_key, model_key = step_keys(state["rng"])
        batch = objective.prepare(batch, objective_key)
        rows = jax.tree.leaves(batch)[0].shape[0]
        weights = batch["weights"].reshape(rows, -1) if "weights" in batch else jnp.ones((rows, 1), jnp.float32)
        total_weight, stops = weight_and_stop_totals(weights, stop)
        model_key = model_key if jitter else None
        if objective.name == "contrastive":  # a mean over the global batch's pairs already
            total, loss_fn = jnp.ones((), jnp.float32), make_contrastive_loss_fn(graphdef, objective)
        elif objective.pairwise:  # the loss is a mean over pairs; frozen_params: the reference model's
            total = jnp.asarray(rows, jnp.float32)
            loss_fn = make_pair_loss_fn(graphdef, objective, rows, model_key=model_key, moe=moe,
                                        reference_params=frozen_params)
        else:  # frozen_params: the distillation teacher's
            total = jnp.maximum(total_weight, 1.0)
            loss_fn = make_loss_fn(graphdef, cfg, total, model_key=model_key, moe=moe, kd=kd,
                                   teacher_params=frozen_params)
        learned, frozen = trainable.split(state["params"])
        grads, (loss_sum, aux) = accumulated_gradients(
            lambda p, mb: loss_fn(trainable.join(p, frozen), mb), learned, batch, cfg.microbatches, mesh, batch_axes)
        loss, grad_norm = loss_sum / total, optax.tree.norm(grads)
        optimized, params, opt_state, learning_rate = optimizer_update(tx, schedule, state, grads, trainable)
        accept, finite, spike = guard_verdict(state["guard"], loss, grad_norm, cfg.spike_factor)
        guard = next_guard(state["guard"], loss, accept, finite, spike)
        new_state = advanced_state(state, accept, optimized, params, opt_state, guard)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "skipped_nonfinite_total": guard["skipped_nonfinite"],
            "skipped_spike_total": guard["skipped_spike"],
            "bad_streak": guard["bad_streak"],
            **aux,
            **({"stop": stops} if stop is not None else {}),
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

"""AdamW with linear warmup and cosine decay, global-norm clipping; weight decay on matrices only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from train.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(logical_specs):
    """Decay matrices only: a parameter with two or more axes besides the stacked "layers" axis.

    Norm scales and biases are vectors; decaying them pulls them toward zero for no gain.
    """
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return jax.tree.map(lambda spec: sum(name != "layers" for name in spec) >= 2, logical_specs, is_leaf=is_spec)


def _floats_to(dtype, tree):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def store_state_in(tx: optax.GradientTransformation, dtype=None) -> optax.GradientTransformation:
    """tx whose floating-point state (the moments) keeps one dtype: `dtype`, or by default the dtype
    of the parameters it updates. Updates may arrive in float32; the new state is cast back."""

    def init(params):
        state = tx.init(params)
        return state if dtype is None else _floats_to(dtype, state)

    def update(updates, state, params=None):
        new_updates, new_state = tx.update(updates, state, params)
        return new_updates, jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig, decay, state_dtype=None) -> optax.GradientTransformation:
    """Clipping and AdamW at unit learning rate; `decay` is a tree of booleans (see decay_mask).

    The train step multiplies the updates by the scheduled learning rate of its own
    step counter, so the rate logged is the rate applied, skipped steps included.
    """
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts.append(
        optax.adamw(
            learning_rate=1.0,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay,
        )
    )
    return store_state_in(optax.chain(*parts), state_dtype)

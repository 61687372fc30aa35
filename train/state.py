"""The training state as one pytree, created directly sharded on the mesh.

state = {"params": ..., "opt_state": ..., "step": int32[], "rng": uint32[2], "guard": {...}}
plus "master": a float32 copy of the parameters when the precision policy keeps one (the
optimizer updates it; "params" is its low-precision cast, what the model computes with).

Nothing is materialised whole on one device: shapes come from `nnx.eval_shape`,
shardings from the parameters' logical axes and the rules, and the state is built
inside a `jax.jit` whose out_shardings place every piece where it belongs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from model.config import ModelConfig, Precision
from model.transformer import Transformer
from train.sharding import Rules, replicated, tree_shardings

State = dict[str, Any]


def initial_guard() -> dict[str, jax.Array]:
    """Bookkeeping that decides whether a step's update is applied; part of the checkpointed state."""
    return {
        "lr_scale": jnp.ones((), jnp.float32),  # lowered after a run of bad steps
        "loss_ema": jnp.zeros((), jnp.float32),  # running mean of accepted losses (bias-corrected on use)
        "accepted": jnp.zeros((), jnp.int32),
        "bad_streak": jnp.zeros((), jnp.int32),  # consecutive steps with non-finite loss or gradients
        "skipped_nonfinite": jnp.zeros((), jnp.int32),  # run totals, checkpointed with the rest
        "skipped_spike": jnp.zeros((), jnp.int32),
    }


@dataclass(frozen=True)
class AbstractModel:
    graphdef: nnx.GraphDef
    params: Any  # pure dict of ShapeDtypeStruct
    logical_specs: Any  # pure dict of PartitionSpec with logical names


def abstract_model(cfg: ModelConfig, precision: Precision) -> AbstractModel:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), precision)))
    return AbstractModel(graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state)))


def master_shapes(params):
    """The float32 master copy's shapes: the parameters' own, in float32."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), params)


def param_shardings(model: AbstractModel, mesh: Mesh, rules: Rules):
    return tree_shardings(model.logical_specs, model.params, mesh, rules)


def state_shardings(
    model: AbstractModel, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules, master: bool = False
) -> State:
    params = param_shardings(model, mesh, rules)
    opt_shapes = jax.eval_shape(tx.init, master_shapes(model.params) if master else model.params)
    # Optimizer moments mirror the parameters and take their shardings; counters are replicated.
    opt_state = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_shapes, params, transform_non_params=lambda _: replicated(mesh)
    )
    guard = jax.tree.map(lambda _: replicated(mesh), initial_guard())
    state = {"params": params, "opt_state": opt_state, "step": replicated(mesh), "rng": replicated(mesh), "guard": guard}
    return {**state, "master": params} if master else state


def abstract_state(model: AbstractModel, tx, shardings: State) -> State:
    master = "master" in shardings
    optimized = master_shapes(model.params) if master else model.params
    shapes = {
        "params": model.params,
        "opt_state": jax.eval_shape(tx.init, optimized),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        "guard": jax.eval_shape(initial_guard),
    }
    if master:
        shapes["master"] = optimized
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(cfg: ModelConfig, precision: Precision, tx, shardings: State, seed: int, params=None) -> State:
    """A fresh state at step 0: the model initialised from `seed`, or given `params` (placed in the state's
    shardings and dtypes; given arrays are donated) with a fresh optimizer."""
    master = "master" in shardings

    def build(params):
        if params is None:
            params = nnx.to_pure_dict(nnx.split(Transformer(cfg, nnx.Rngs(params=seed), precision))[1])
        optimized = jax.tree.map(lambda p: p.astype(jnp.float32), params) if master else params
        state = {
            "params": params,
            "opt_state": tx.init(optimized),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
            "guard": initial_guard(),
        }
        return {**state, "master": optimized} if master else state

    return jax.jit(build, out_shardings=shardings, donate_argnums=0)(params)

"""The training state as one pytree, created directly sharded on the mesh.

state = {"params": ..., "opt_state": ..., "step": int32[], "rng": uint32[2], "guard": {...}}

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

from model.config import ModelConfig
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


def abstract_model(cfg: ModelConfig) -> AbstractModel:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    return AbstractModel(graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state)))


def state_shardings(model: AbstractModel, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules) -> State:
    params = tree_shardings(model.logical_specs, model.params, mesh, rules)
    opt_shapes = jax.eval_shape(tx.init, model.params)
    # Optimizer moments mirror the parameters and take their shardings; counters are replicated.
    opt_state = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_shapes, params, transform_non_params=lambda _: replicated(mesh)
    )
    guard = jax.tree.map(lambda _: replicated(mesh), initial_guard())
    return {"params": params, "opt_state": opt_state, "step": replicated(mesh), "rng": replicated(mesh), "guard": guard}


def abstract_state(model: AbstractModel, tx, shardings: State) -> State:
    shapes = {
        "params": model.params,
        "opt_state": jax.eval_shape(tx.init, model.params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        "guard": jax.eval_shape(initial_guard),
    }
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(cfg: ModelConfig, model: AbstractModel, tx, shardings: State, seed: int) -> State:
    def build():
        params = nnx.to_pure_dict(nnx.split(Transformer(cfg, nnx.Rngs(params=seed)))[1])
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
            "guard": initial_guard(),
        }

    return jax.jit(build, out_shardings=shardings)()

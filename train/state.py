"""The training state as one pytree, created directly sharded on the mesh.

state = {"params": ..., "opt_state": ..., "step": int32[], "rng": uint32[2], "guard": {...}}
plus "master": a float32 copy of the parameters when the precision policy keeps one (the
optimizer updates it; "params" is its low-precision cast, what the model computes with).

A model with LoRA adapters trains only them (and a score head): the optimizer state and the master copy
cover that trainable part alone (`Trainable`), the frozen base weights live in "params" beside it.

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

from model import lora
from model.config import ModelConfig, Precision
from model.clip import build_model
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
    trainable: "Trainable"


def _partition(tree: dict, keep, path=()) -> tuple[dict, dict]:
    kept, rest = {}, {}
    for key, value in tree.items():
        where = (*path, str(key))
        if isinstance(value, dict):
            a, b = _partition(value, keep, where)
            if a:
                kept[key] = a
            if b:
                rest[key] = b
        elif keep(where):
            kept[key] = value
        else:
            rest[key] = value
    return kept, rest


def _join(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _join(out[key], value) if isinstance(value, dict) and key in out else value
    return out


@dataclass(frozen=True)
class Trainable:
    """Which parameters learn: all of them, or, in a model with LoRA adapters, the adapters and a score head."""

    adapters_only: bool

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Trainable":
        return cls(cfg.lora is not None)

    def learns(self, path: tuple[str, ...]) -> bool:
        return not self.adapters_only or lora.is_adapter(path) or path == ("score",)

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) parts of a pure parameter dict (frozen: empty when all learn)."""
        if not self.adapters_only:
            return params, {}
        return _partition(params, self.learns)

    def part(self, params: dict) -> dict:
        return self.split(params)[0]

    @staticmethod
    def join(trainable: dict, frozen: dict) -> dict:
        return _join(trainable, frozen) if frozen else trainable


def abstract_model(cfg: ModelConfig, precision: Precision) -> AbstractModel:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0), precision)))
    return AbstractModel(graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state)),
                         Trainable.of(cfg))


def master_shapes(params):
    """The float32 master copy's shapes: the parameters' own, in float32."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), params)


def param_shardings(model: AbstractModel, mesh: Mesh, rules: Rules):
    return tree_shardings(model.logical_specs, model.params, mesh, rules)


def state_shardings(
    model: AbstractModel, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules, master: bool = False
) -> State:
    params = param_shardings(model, mesh, rules)
    learned = model.trainable.part(model.params)
    opt_shapes = jax.eval_shape(tx.init, master_shapes(learned) if master else learned)
    # Optimizer moments mirror the trained parameters and take their shardings; counters are replicated.
    opt_state = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_shapes, model.trainable.part(params),
        transform_non_params=lambda _: replicated(mesh),
    )
    guard = jax.tree.map(lambda _: replicated(mesh), initial_guard())
    state = {"params": params, "opt_state": opt_state, "step": replicated(mesh), "rng": replicated(mesh), "guard": guard}
    return {**state, "master": model.trainable.part(params)} if master else state


def abstract_state(model: AbstractModel, tx, shardings: State) -> State:
    master = "master" in shardings
    learned = model.trainable.part(model.params)
    optimized = master_shapes(learned) if master else learned
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
    shardings and dtypes; given arrays are donated) with a fresh optimizer. Given parameters may leave some
    out (another run's model without this one's adapters or score head): those start fresh."""
    master, trainable = "master" in shardings, Trainable.of(cfg)

    def build(params):
        if params is None or jax.tree.structure(params) != jax.tree.structure(shardings["params"]):
            fresh = nnx.to_pure_dict(nnx.split(build_model(cfg, nnx.Rngs(params=seed), precision))[1])
            params = fresh if params is None else _join(fresh, params)
        learned = trainable.part(params)
        optimized = jax.tree.map(lambda p: p.astype(jnp.float32), learned) if master else learned
        state = {
            "params": params,
            "opt_state": tx.init(optimized),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
            "guard": initial_guard(),
        }
        return {**state, "master": optimized} if master else state

    return jax.jit(build, out_shardings=shardings, donate_argnums=0)(params)

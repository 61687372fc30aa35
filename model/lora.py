"""LoRA: low-rank adapters beside a model's weights, native to the stacked layers.

An adapted weight W (contracting its `in` axes into its `out` axes, as `matmul_param` records) gets
A [*in, rank] and B [rank, *out] with the same logical axes as the dimensions they mirror, so the rules
shard them like W; created inside the layer stack's vmap, they carry its "layers" axis too. B starts at
zero, so an adapted model starts equal to its base. The matmul adds (x·A)·B·alpha/rank; the experts'
grouped matmul, which takes whole weights, uses W + A·B·alpha/rank. Only adapters (and a score head)
are trained when a model has them (train/state.py); `merge` folds them into plain weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import LoraConfig

PREFIX = "lora_"  # an adapter of weight `wq` is the attribute `lora_wq` of the same module


class Lora(nnx.Module):
    def __init__(self, weight: nnx.Param, cfg: LoraConfig, dtype, rngs: nnx.Rngs):
        meta = weight.get_metadata()
        _, contract, outputs = meta["quant"]
        shape, axes = tuple(weight.get_value().shape), tuple(meta["out_sharding"])
        k = contract + outputs
        self.contract, self.outputs = contract, outputs
        lead, ins, outs = shape[:-k], shape[-k:-outputs], shape[-outputs:]
        lead_axes, in_axes, out_axes = axes[:-k], axes[-k:-outputs], axes[-outputs:]
        # A as a Kaiming-style normal over its fan-in; B zero: the adapter's first output is exactly zero.
        # (Parameters with logical axes as model/layers.py's logical_param makes them; that module imports this one.)
        a = jax.random.normal(rngs.params(), (*lead, *ins, cfg.rank), dtype) / math.sqrt(math.prod(ins))
        self.a = nnx.Param(a, out_sharding=(*lead_axes, *in_axes, None), eager_sharding=False)
        self.b = nnx.Param(jnp.zeros((*lead, cfg.rank, *outs), dtype), out_sharding=(*lead_axes, None, *out_axes),
                           eager_sharding=False)
        self.scale = cfg.alpha / cfg.rank

    def delta(self, spec: str, x: jax.Array, compute) -> jax.Array:
        """(x·A)·B·scale for the einsum `spec` of x with the adapted weight."""
        inputs, out = spec.split("->")
        lhs, w = inputs.split(",")
        k = self.contract + self.outputs
        lead, ins, outs = w[: -k], w[-k: -self.outputs], w[-self.outputs:]
        r = next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in spec)
        mid = "".join(c for c in out if c not in outs) + r
        xa = jnp.einsum(f"{lhs},{lead}{ins}{r}->{mid}", x, self.a.get_value().astype(compute))
        return jnp.einsum(f"{mid},{lead}{r}{outs}->{out}", xa, self.b.get_value().astype(compute)) * self.scale

    def adapted(self, w: jax.Array) -> jax.Array:
        """The whole adapted weight W + A·B·scale (for matmuls that take weights whole)."""
        return w + merged_delta(self.a.get_value(), self.b.get_value(), w.shape).astype(w.dtype) * self.scale


def attach(module: nnx.Module, names: tuple[str, ...], cfg: LoraConfig | None, dtype, rngs: nnx.Rngs) -> None:
    """Adapters for the module's weights `names` whose role cfg.targets names (nothing without LoRA)."""
    if cfg is None:
        return
    for name in names:
        weight = getattr(module, name, None)
        if weight is not None and weight.get_metadata()["quant"][0] in cfg.targets:
            setattr(module, PREFIX + name, Lora(weight, cfg, dtype, rngs))


def adapter(module: nnx.Module, name: str) -> Lora | None:
    return getattr(module, PREFIX + name, None)


def merged_delta(a, b, shape) -> jax.Array:
    """A·B reshaped to the adapted weight's `shape`: A [*pre, *in, r] and B [*pre, r, *out], where `pre` (the
    stacked layers, experts) is shared and in/out are what the weight contracts and produces."""
    pre = a.ndim + b.ndim - 2 - len(shape)
    p, r = int(np.prod(a.shape[:pre])), a.shape[-1]
    flat = jnp.matmul(a.reshape(p, -1, r), b.reshape(p, r, -1))
    return flat.reshape(shape)


def is_adapter(path: tuple[str, ...]) -> bool:
    return any(str(part).startswith(PREFIX) for part in path)


def merge(params: dict, scale: float) -> dict:
    """Pure parameters with every adapter folded into its weight (W + A·B·scale) and removed."""
    out = {}
    for key, value in params.items():
        if str(key).startswith(PREFIX):
            continue
        if isinstance(value, dict):
            out[key] = merge(value, scale)
        elif isinstance(params.get(PREFIX + str(key)), dict):
            lora = params[PREFIX + str(key)]
            delta = merged_delta(jnp.asarray(lora["a"], jnp.float32), jnp.asarray(lora["b"], jnp.float32), value.shape)
            out[key] = (jnp.asarray(value, jnp.float32) + delta * scale).astype(value.dtype)
        else:
            out[key] = value
    return out

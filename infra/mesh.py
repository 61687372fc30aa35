"""Device meshes and the one table that maps the model's logical axes onto mesh axes."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

from train.config import ConfigError, ExperimentConfig, resolve_mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axes. Batches split over data, fsdp and expert; parameters are
# sharded over fsdp along the model dimension (ZeRO-3 style, gathered per layer), over
# tensor along heads, MLP width and vocabulary (Megatron style), and MoE experts over
# expert (each device runs its own experts on the tokens sent to it).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "embed": "fsdp",
    "activation_embed": None,  # activations keep the model dimension whole; only weights are fsdp-sharded
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "expert": "expert",
}


def logical_rules(cfg: ExperimentConfig) -> dict[str, str | tuple[str, ...] | None]:
    """The default rules with the config's overrides (`mesh.rules`) applied."""
    rules = dict(DEFAULT_RULES)
    for name, target in cfg.mesh.rules.items():
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ConfigError(f"mesh.rules.{name}={target!r} names unknown mesh axes {unknown}; mesh axes are {MESH_AXES}")
        rules[name] = axes or None
    return rules


def build_mesh(cfg: ExperimentConfig, devices=None) -> Mesh:
    """A mesh of all (or the given) devices with the config's axis sizes; -1 fills the rest."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: XLA propagates shardings from the annotated parameters and batches.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)

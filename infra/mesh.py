"""Device meshes and the one table that maps the model's logical axes onto mesh axes."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
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
    """A mesh of all (or the given) devices with the config's axis sizes; -1 fills the rest. With
    `mesh.dcn_*` > 1 the mesh is hybrid: those ways of an axis run across slices (DCN), the rest within."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: XLA propagates shardings from the annotated parameters and batches.
    auto = (AxisType.Auto,) * len(MESH_AXES)
    dcn = tuple(cfg.mesh.dcn_sizes()[a] for a in MESH_AXES)
    if dcn == (1,) * len(MESH_AXES):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(hybrid_device_grid(shape, dcn, devices), MESH_AXES, axis_types=auto)


def dcn_granules(devices: list, count: int) -> list[list]:
    """The devices in `count` groups joined over DCN: TPU slices, else processes (hosts), else, for
    one emulated host, equal consecutive blocks (rehearsing a multi-slice mesh on CPU)."""
    for key in ("slice_index", "process_index"):
        groups: dict = {}
        for d in devices:
            groups.setdefault(getattr(d, key, None), []).append(d)
        if len(groups) == count and None not in groups:
            return [groups[k] for k in sorted(groups)]
    processes = len({d.process_index for d in devices})
    if processes > 1:
        raise ConfigError(
            f"mesh.dcn_* multiply to {count}, but the devices form {processes} processes and no {count} slices; "
            f"make the dcn_* sizes multiply to the number of slices (or hosts)"
        )
    if len(devices) % count:
        raise ConfigError(f"{len(devices)} devices cannot form {count} equal DCN groups (mesh.dcn_* multiply to {count})")
    n = len(devices) // count
    return [devices[i * n:(i + 1) * n] for i in range(count)]


def hybrid_device_grid(shape: tuple[int, ...], dcn: tuple[int, ...], devices: list) -> np.ndarray:
    """Device array of `shape` whose axis i is dcn[i] granules (outer) x shape[i]/dcn[i] devices within one."""
    ici = tuple(s // d for s, d in zip(shape, dcn))
    granules = dcn_granules(devices, math.prod(dcn))
    # Within a granule, the topology-aware order (on TPU, neighbours on the ICI torus).
    blocks = [mesh_utils.create_device_mesh(ici, g, allow_split_physical_axes=True) for g in granules]
    grid = np.stack(blocks).reshape(dcn + ici)
    rank = len(shape)
    # (dcn_0, ..., ici_0, ...) -> (dcn_0, ici_0, dcn_1, ici_1, ...) -> shape
    order = [i for pair in zip(range(rank), range(rank, 2 * rank)) for i in pair]
    return grid.transpose(order).reshape(shape)

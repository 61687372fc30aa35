"""Device meshes and the one table that maps the model's logical axes onto mesh axes.

One path builds every mesh: real accelerators, emulated CPU devices and the device descriptions of
a TPU topology compiled for ahead of time all go through `build_mesh` (or `device_mesh` when the
sizes are given outright).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from model.config import LOGICAL_AXES
from train.config import MESH_AXES, ConfigError, ExperimentConfig, check_mesh_sizes

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
assert set(DEFAULT_RULES) == set(LOGICAL_AXES), "every logical axis has a default rule"


def logical_rules(cfg: ExperimentConfig) -> dict[str, str | tuple[str, ...] | None]:
    """The default rules with the config's overrides (`mesh.rules`, checked at load) applied."""
    rules = dict(DEFAULT_RULES)
    for name, target in cfg.mesh.rules.items():
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        rules[name] = axes or None
    return rules


def resolve_mesh(cfg: ExperimentConfig, device_count: int) -> dict[str, int]:
    """Concrete axis sizes for this many devices (filling a -1 axis); ConfigError naming the keys if the
    sizes cannot match them, or break a rule that ties them to the rest of the config."""
    sizes = cfg.mesh.axis_sizes()
    sized = {name: size for name, size in sizes.items() if size > 1}
    named = " x ".join(f"mesh.{name}={size}" for name, size in sized.items()) or "all 1"
    fixed = math.prod(sized.values())
    if -1 in sizes.values():
        fill = next(n for n, s in sizes.items() if s == -1)
        if device_count % fixed:
            raise ConfigError(
                f"mesh.{fill}=-1 cannot fill {device_count} devices: the other mesh axes ({named}) multiply to {fixed}, "
                f"which does not divide {device_count}; choose sizes whose product divides the device count"
            )
        sizes[fill] = device_count // fixed
    elif fixed != device_count:
        raise ConfigError(
            f"the mesh axes ({named}) multiply to {fixed} but there are {device_count} devices; make the product equal "
            "the device count, or set one axis to -1 to fill the rest"
        )
    try:
        check_mesh_sizes(cfg, sizes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return sizes


def build_mesh(cfg: ExperimentConfig, devices=None) -> Mesh:
    """The config's mesh on all local (or the given) devices; -1 fills the rest. With `mesh.dcn_*` > 1
    the mesh is hybrid: those ways of an axis run across slices (DCN), the rest within one."""
    devices = list(devices if devices is not None else jax.devices())
    return device_mesh(resolve_mesh(cfg, len(devices)), devices, cfg.mesh.dcn_sizes())


def device_mesh(sizes: dict[str, int], devices: list, dcn: dict[str, int] | None = None) -> Mesh:
    """The one constructor of meshes: `sizes` of MESH_AXES over `devices`, in the topology-aware order
    within each DCN granule (on TPU, neighbours on the ICI torus)."""
    shape = tuple(sizes[a] for a in MESH_AXES)
    dcn_shape = tuple((dcn or {}).get(a, 1) for a in MESH_AXES)
    ici = tuple(s // d for s, d in zip(shape, dcn_shape, strict=True))
    granules = dcn_granules(list(devices), math.prod(dcn_shape))
    blocks = [mesh_utils.create_device_mesh(ici, g, allow_split_physical_axes=True) for g in granules]
    grid = np.stack(blocks).reshape(dcn_shape + ici)
    rank = len(shape)
    # (dcn_0, ..., ici_0, ...) -> (dcn_0, ici_0, dcn_1, ici_1, ...) -> shape
    order = [i for pair in zip(range(rank), range(rank, 2 * rank)) for i in pair]
    # Auto axes: XLA propagates shardings from the annotated parameters and batches.
    return Mesh(grid.transpose(order).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * rank)


def dcn_granules(devices: list, count: int) -> list[list]:
    """The devices in `count` groups joined over DCN: TPU slices, else processes (hosts), else, for
    one emulated host, equal consecutive blocks (rehearsing a multi-slice mesh on CPU)."""
    if count == 1:
        return [devices]
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

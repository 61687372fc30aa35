"""Where a plan compiles for: the local (emulated) devices, or a TPU slice described by name.

TPU names follow Cloud TPU: `v5e-16` and `v6e-256` count chips, `v4-32` and `v5p-128`
count TensorCores (two per chip); `x2` asks for that many slices joined over DCN.
TPU targets compile through libtpu's topology descriptions, so no TPU is needed.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

import jax

from infra.devices import DEVICES, DeviceSpec, device_spec, local_peak_flops
from train.config import ConfigError

# Generation -> (table entry, slice name counts cores (True) or chips, topology rank).
TPU_GENERATIONS: dict[str, tuple[str, bool, int]] = {
    "v4": ("TPU v4", True, 3),
    "v5p": ("TPU v5p", True, 3),
    "v5e": ("TPU v5e", False, 2),
    "v6e": ("TPU v6e", False, 2),
}
MAX_CHIPS = {2: 256, 3: 8960}  # largest single slice per topology rank
TPU_NAME = r"(v4|v5p|v5e|v6e)-(\d+)(?:x(\d+))?"
TARGET_HELP = "targets are 'cpu' or a TPU slice like v5e-16, v5p-128, v6e-256, v4-32, or v5e-256x2 (two slices)"


@dataclass(frozen=True)
class Target:
    name: str
    devices: tuple  # jax devices, or a TPU topology's device descriptions
    memory_bytes: int  # per device: HBM, or on CPU the host memory shared by the emulated devices
    peak_bf16: float | None = None  # FLOP/s per device; None: this machine's, measured when first asked
    peak_f32: float | None = None
    slices: int = 1
    is_tpu: bool = False
    sharing: int = 1  # local devices that share one measured peak (emulated CPU devices)

    def peak(self, dtype_name: str) -> float:
        table = self.peak_f32 if dtype_name == "float32" else self.peak_bf16
        return table if table is not None else local_peak_flops(dtype_name) / self.sharing


def topology_shape(chips: int, rank: int) -> tuple[int, ...]:
    """Chip grid of a slice: 2D slices grow 1x1, 2x2, 2x4, 4x4, ...; 3D ones 2x2x1, 2x2x2, 2x2x4, 2x4x4, ..."""
    if rank == 2 and chips == 2:
        raise ValueError(chips)
    dims = [2, 2, 1] if rank == 3 else [2, 2] if chips >= 4 else [1, 1]
    while True:
        size = 1
        for d in dims:
            size *= d
        if size >= chips:
            break
        smallest = min(dims)
        i = len(dims) - 1 - dims[::-1].index(smallest)  # double the last of the smallest sides
        dims[i] *= 2
    if size != chips:
        raise ValueError(chips)
    return tuple(dims)


def _is_slice(chips: int, rank: int) -> bool:
    try:
        topology_shape(chips, rank)
        return True
    except ValueError:
        return False


def _silence_libtpu_probe(accelerator_type: str) -> None:
    """Off a TPU VM, libtpu looks for TPU metadata and logs errors; topology compiles don't need it."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    # Compiling for a topology touches no chip, so several planning processes (a sweep's
    # workers, the tests) may hold libtpu at once; by default its lockfile forbids that.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


@dataclass(frozen=True)
class TpuSlice:
    """A Cloud TPU slice type by name, with what launching on it needs; no libtpu involved."""

    name: str  # as given: v5p-128, v5e-256x2
    generation: str
    count: int  # the number in the name: chips (v5e, v6e) or TensorCores (v4, v5p)
    chips: int  # per slice
    slices: int
    topology: tuple[int, ...]

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name for one slice (gcloud's --accelerator-type)."""
        return f"{'v5litepod' if self.generation == 'v5e' else self.generation}-{self.count}"

    @property
    def hosts(self) -> int:
        """VMs per slice: 4 chips each, except single-host v5e/v6e slices of up to 8 chips."""
        single_host = 8 if self.generation in ("v5e", "v6e") else 4
        return 1 if self.chips <= single_host else self.chips // 4

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def devices(self) -> int:
        """jax devices in the whole job: one per chip (v4 and v5p run their two cores as one)."""
        return self.chips * self.slices


def tpu_slice(name: str) -> TpuSlice:
    match = re.fullmatch(TPU_NAME, name)
    if not match:
        raise ConfigError(
            f"unknown TPU type {name!r}; TPU types look like v5e-16, v5p-128, v6e-256, v4-32, or v5e-256x2 (two slices)"
        )
    generation, count, slices = match.group(1), int(match.group(2)), int(match.group(3) or 1)
    _, counts_cores, rank = TPU_GENERATIONS[generation]
    chips = count // 2 if counts_cores else count
    try:
        if counts_cores and count % 2 or slices < 1 or chips > MAX_CHIPS[rank]:
            raise ValueError(count)
        shape = topology_shape(chips, rank)
    except ValueError:
        unit = "TensorCores (2 per chip)" if counts_cores else "chips"
        sizes = [c * (2 if counts_cores else 1) for c in (1, 2, 4, 8, 16, 32, 64, 128) if _is_slice(c, rank)]
        raise ConfigError(
            f"{name!r} is not a {generation} slice: its number counts {unit}; try one of "
            f"{', '.join(f'{generation}-{n}' for n in sizes)}, ..."
        ) from None
    return TpuSlice(name, generation, count, chips, slices, shape)


def tpu_target(name: str) -> Target:
    if not re.fullmatch(TPU_NAME, name):
        raise ConfigError(f"unknown target {name!r}; {TARGET_HELP}")
    tpu = tpu_slice(name)
    generation, count, slices, chips, shape = tpu.generation, tpu.count, tpu.slices, tpu.chips, tpu.topology
    table_name = TPU_GENERATIONS[generation][0]
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"target {name} needs libtpu to compile for TPU: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    _silence_libtpu_probe(f"{'v5litepod' if generation == 'v5e' else generation}-{count}")
    topology = topologies.get_topology_desc(
        f"{generation}:{'x'.join(map(str, shape))}", "tpu", num_slices=slices
    )
    devices = tuple(topology.devices)
    spec: DeviceSpec = next(d for d in DEVICES if d.name == table_name)
    # Topologies may expose each TensorCore as a device (v4); the chip's figures are shared among them.
    per_chip = len(devices) // (chips * slices)
    return Target(
        name=name,
        devices=devices,
        peak_bf16=spec.peak_bf16 / per_chip,
        peak_f32=spec.peak_f32 / per_chip,
        memory_bytes=spec.hbm_bytes // per_chip,
        slices=slices,
        is_tpu=True,
    )


def local_target() -> Target:
    """This machine's devices: on CPU the emulated ones, sharing the measured peak and the host memory."""
    devices = tuple(jax.devices())
    if devices[0].platform == "cpu":
        shared = len(devices)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // shared
    else:
        shared = 1
        memory = device_spec(devices[0].device_kind).hbm_bytes
    return Target(
        name="cpu" if devices[0].platform == "cpu" else devices[0].platform,
        devices=devices,
        memory_bytes=memory,
        sharing=shared,
    )


def resolve_target(name: str) -> Target:
    return local_target() if name == "cpu" else tpu_target(name)

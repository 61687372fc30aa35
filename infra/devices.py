"""What each accelerator can do: dense peak FLOP/s and memory, found from jax's `device_kind`.

Figures are the vendors' published dense (not 2:4-sparse) numbers per device as jax
sees it. "f32" is the rate an f32 matmul gets under jax's default precision: on TPU
that is a bf16 MXU pass (so the bf16 rate), on NVIDIA GPUs since Ampere it is TF32.
On CPU there is no table: the peak is measured (`infra.hardware.measured_matmul_peak`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

TERA = 1e12
GIB = 1024**3
GB = 1000**3


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    peak_bf16: float  # FLOP/s per jax device
    peak_f32: float
    hbm_bytes: int
    kinds: tuple[str, ...]  # lower-case device_kind strings jax reports for it

    def peak(self, dtype_name: str) -> float:
        return self.peak_f32 if dtype_name == "float32" else self.peak_bf16


# Ordered so that a more specific name wins (GH200 before H200, H100 PCIe before H100).
DEVICES: tuple[DeviceSpec, ...] = (
    # Per chip; on TPU v4 a running jax shows one device per chip (megacore).
    DeviceSpec("TPU v4", 275 * TERA, 275 * TERA, 32 * GIB, ("tpu v4",)),
    DeviceSpec("TPU v5e", 197 * TERA, 197 * TERA, 16 * GIB, ("tpu v5 lite", "tpu v5e", "tpu v5litepod")),
    DeviceSpec("TPU v5p", 459 * TERA, 459 * TERA, 95 * GIB, ("tpu v5p", "tpu v5")),
    DeviceSpec("TPU v6e", 918 * TERA, 918 * TERA, 32 * GIB, ("tpu v6 lite", "tpu v6e", "tpu trillium")),
    DeviceSpec("NVIDIA A100 40GB", 312 * TERA, 156 * TERA, 40 * GB, ("nvidia a100-sxm4-40gb", "nvidia a100-pcie-40gb")),
    DeviceSpec("NVIDIA A100 80GB", 312 * TERA, 156 * TERA, 80 * GB, ("nvidia a100",)),
    DeviceSpec("NVIDIA H100 PCIe", 756 * TERA, 378 * TERA, 80 * GB, ("nvidia h100 pcie",)),
    DeviceSpec("NVIDIA H100 NVL", 835 * TERA, 418 * TERA, 94 * GB, ("nvidia h100 nvl",)),
    DeviceSpec("NVIDIA GH200", 989 * TERA, 494 * TERA, 96 * GB, ("nvidia gh200",)),
    DeviceSpec("NVIDIA H100 SXM", 989 * TERA, 494 * TERA, 80 * GB, ("nvidia h100",)),
    DeviceSpec("NVIDIA H200 NVL", 835 * TERA, 418 * TERA, 141 * GB, ("nvidia h200 nvl",)),
    DeviceSpec("NVIDIA H200", 989 * TERA, 494 * TERA, 141 * GB, ("nvidia h200",)),
    DeviceSpec("NVIDIA B200", 2250 * TERA, 1100 * TERA, 180 * GB, ("nvidia b200",)),
)


class UnknownDevice(LookupError):
    pass


def device_spec(device_kind: str) -> DeviceSpec:
    """The table entry for a jax `device_kind`; raises UnknownDevice rather than guessing."""
    kind = re.sub(r"\s+", " ", device_kind.strip().lower())
    for spec in DEVICES:
        # A listed name matches as a prefix followed by nothing, a space or a dash, so
        # "tpu v5" (v5p) does not claim "tpu v5 lite" once that has been tried first.
        for known in spec.kinds:
            if kind == known or kind.startswith(known + " ") or kind.startswith(known + "-"):
                return spec
    names = ", ".join(s.name for s in DEVICES)
    raise UnknownDevice(f"no peak FLOP/s known for device kind {device_kind!r}; known: {names}")


@functools.cache
def local_peak_flops(dtype_name: str) -> float:
    """Peak FLOP/s of one local device: the table for accelerators, measured once per process on CPU."""
    import jax
    import jax.numpy as jnp

    from infra.hardware import measured_matmul_peak

    device = jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_peak(jnp.dtype(dtype_name))
    return device_spec(device.device_kind).peak(dtype_name)

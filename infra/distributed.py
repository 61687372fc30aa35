"""Starting JAX's multi-controller runtime: every host (or GPU) runs the same program as one job.

Settings come from the environment, so one `tessera train` command runs alone, under
`tessera launch local`, under SLURM's `srun`, on TPU VMs and on GKE:

- `TESSERA_COORDINATOR_ADDRESS`, `TESSERA_NUM_PROCESSES`, `TESSERA_PROCESS_ID` (and
  optionally `TESSERA_LOCAL_DEVICE_IDS`, comma-separated): explicit settings;
- `TESSERA_DISTRIBUTED=auto`: jax detects the cluster (TPU VM, GKE, SLURM, Open MPI);
  `TESSERA_DISTRIBUTED=off` runs alone whatever the environment says;
- a SLURM job step with more than one task is detected without being asked;
- `TESSERA_CPU_DEVICES=D`: this process emulates D CPU devices (rehearsing on one machine).

On CPU the processes exchange collectives through gloo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from train.config import ConfigError, first_line

COORDINATOR = "TESSERA_COORDINATOR_ADDRESS"
NUM_PROCESSES = "TESSERA_NUM_PROCESSES"
PROCESS_ID = "TESSERA_PROCESS_ID"
LOCAL_DEVICE_IDS = "TESSERA_LOCAL_DEVICE_IDS"
MODE = "TESSERA_DISTRIBUTED"
CPU_DEVICES = "TESSERA_CPU_DEVICES"
EXPLICIT = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
# What jax's own SLURM detection reads; present only inside a job step (srun).
SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclass(frozen=True)
class DistributedSettings:
    mode: str  # "single": one process; "explicit": the settings below; "auto": jax detects the cluster
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_devices: int | None = None


def _positive_int(env: Mapping[str, str], name: str, minimum: int = 1) -> int:
    value = env[name]
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    return number


def settings_from_env(env: Mapping[str, str] = os.environ) -> DistributedSettings:
    """What this process should join, read (and checked) from the environment."""
    cpu_devices = _positive_int(env, CPU_DEVICES) if env.get(CPU_DEVICES) else None
    mode = env.get(MODE, "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ConfigError(f"{MODE}={env[MODE]!r} is not a mode; use 'auto' (detect the cluster) or 'off' (one process)")
    given = [name for name in EXPLICIT if env.get(name)]
    if mode == "off":
        return DistributedSettings("single", cpu_devices=cpu_devices)
    if given:
        missing = [name for name in EXPLICIT if name not in given]
        if missing:
            raise ConfigError(f"{given[0]} is set but {', '.join(missing)} is not; set all of {', '.join(EXPLICIT)}")
        count = _positive_int(env, NUM_PROCESSES)
        index = _positive_int(env, PROCESS_ID, minimum=0)
        if index >= count:
            raise ConfigError(f"{PROCESS_ID}={index} must be below {NUM_PROCESSES}={count} (ids count from 0)")
        ids = None
        if env.get(LOCAL_DEVICE_IDS):
            try:
                ids = tuple(int(i) for i in env[LOCAL_DEVICE_IDS].split(","))
            except ValueError:
                raise ConfigError(f"{LOCAL_DEVICE_IDS}={env[LOCAL_DEVICE_IDS]!r} must be comma-separated integers") from None
        return DistributedSettings("explicit", env[COORDINATOR], count, index, ids, cpu_devices)
    if mode == "auto":
        return DistributedSettings("auto", cpu_devices=cpu_devices)
    if all(name in env for name in SLURM_STEP) and int(env["SLURM_NTASKS"]) > 1:
        return DistributedSettings("auto", cpu_devices=cpu_devices)
    return DistributedSettings("single", cpu_devices=cpu_devices)


def initialize(settings: DistributedSettings) -> None:
    """Configure this process's devices and join the job; call before anything touches a device."""
    import jax

    if settings.cpu_devices:
        jax.config.update("jax_num_cpu_devices", settings.cpu_devices)
    if settings.mode == "single":
        return
    # Only the CPU backend reads this; accelerators use their own collectives (NCCL, ICI/DCN).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
        )
    except (ValueError, RuntimeError) as e:  # no cluster detected, or the coordinator never answered
        first = first_line(e, 300)
        raise ConfigError(
            f"could not join the distributed job ({settings.mode} settings): {first}; set {', '.join(EXPLICIT)}, "
            f"or {MODE}=off to run alone"
        ) from None


def start_from_env() -> DistributedSettings:
    settings = settings_from_env()
    initialize(settings)
    return settings

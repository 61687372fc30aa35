"""What the commands share at run time: the compilation cache, signal handling, this machine's peak,
and a trained run opened on this machine's devices."""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

COMPILATION_CACHE = Path.home() / ".cache" / "tessera" / "jax"

# XLA:CPU options that measurably help (bench/compare_torch.py, 2 cores): fusing elementwise work into
# YNNPACK's matmuls instead of running it (often as a strided transpose) beside them, 845 -> 992 tokens/s
# on the d512 Llama case. Other accelerators ignore them.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)
CPU_THREADS_PER_EMULATED_DEVICE = 4


def apply_platform_flags(environ=os.environ, flags=CPU_XLA_FLAGS, override: bool = False) -> None:
    """Add `flags` to XLA_FLAGS, before jax starts a backend: an option already set there wins, unless
    `override` (the tests' fixed options). Emulated CPU devices also get threads to spare (NPROC), unless set."""
    def name(flag: str) -> str:
        return flag.split("=")[0]

    given = environ.get("XLA_FLAGS", "").split()
    if override:
        given = [f for f in given if name(f) not in {name(g) for g in flags}]
    names = {name(f) for f in given}
    environ["XLA_FLAGS"] = " ".join([*given, *(f for f in flags if name(f) not in names)])
    devices = emulated_cpu_devices(environ)
    if devices > 1 and (override or "NPROC" not in environ):
        # XLA:CPU runs every emulated device's program on one thread pool, sized max(cores, devices) unless
        # NPROC says otherwise. A program whose independent branches (a dual encoder's two towers) reach
        # collectives at once can block more threads than there are devices, and then the devices still to
        # arrive have no thread: a deadlock that XLA ends with an abort after 40 s. Four threads a device
        # left none in 60 repeated 8-device steps that deadlocked within 8 at the default.
        environ["NPROC"] = str(max(os.cpu_count() or 1, CPU_THREADS_PER_EMULATED_DEVICE * devices))


def emulated_cpu_devices(environ) -> int:
    """How many CPU devices this process will emulate: XLA's `--xla_force_host_platform_device_count`, jax's
    JAX_NUM_CPU_DEVICES or our TESSERA_CPU_DEVICES (infra/distributed.py), whichever asks for most (1 if none)."""
    counts = re.findall(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    counts += [environ.get(k, "") for k in ("JAX_NUM_CPU_DEVICES", "TESSERA_CPU_DEVICES")]
    return max([1, *(int(c) for c in counts if c.strip().isdigit())])


def enable_compilation_cache() -> None:
    """Persist compiled programs so a resumed or repeated run skips recompiling (override with
    JAX_COMPILATION_CACHE_DIR)."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))


class StopOnSignal:
    """First SIGTERM/SIGINT: the run stops two steps on (the request rides in the next batch read, and every
    process stops after the step that learns of it), checkpoints and exits 0. A second one aborts at once."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received: str | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            # Abort at once, wherever the main thread is (even inside a checkpoint's commit): an
            # unfinished save is never the latest (orbax renames a finished one into place).
            os.write(2, f"tessera: interrupted by a second {name}; the newest complete checkpoint is kept\n".encode())
            os._exit(130)
        self.received = name
        # os.write, not print: a handler that interrupts a print to stderr may not print itself.
        os.write(2, f"tessera: {name} received: finishing the steps in flight and saving a checkpoint "
                    "(send it again to abort at once)\n".encode())

    def __call__(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def local_peak_flops_or_none(dtype_name: str) -> float | None:
    """This machine's peak FLOP/s per device for MFU, or None (with a warning) for an unknown accelerator."""
    from infra.devices import UnknownDevice
    from infra.targets import local_target

    try:
        return local_target().peak(dtype_name)
    except UnknownDevice as e:
        logging.getLogger(__name__).warning("%s; mfu is not reported", e)
        return None


def open_trained_run(run_dir: str, overrides: list[str], dual_encoder: bool = False):
    """A run directory's latest checkpoint on a mesh of this machine's devices (`mesh.*` overrides
    choose the layout: inference needs no particular one). A dual encoder (model.clip) is opened only by
    the commands that take one (`dual_encoder`): the others generate or transform a language model."""
    from infra.mesh import build_mesh, logical_rules
    from train.config import ConfigError
    from train.recipes import with_overrides
    from train.inference import load_trained, run_config

    cfg = run_config(run_dir)
    if cfg.model.clip is not None and not dual_encoder:
        raise ConfigError(f"{run_dir} holds a dual encoder (model.clip), which embeds images and texts: use "
                          "`tessera embed`, `tessera eval` or `tessera export-hf` with it")
    foreign = [o for o in overrides if not o.startswith("mesh.")]
    if foreign:
        raise ConfigError(f"only mesh.* overrides apply to a trained run, got {foreign[0]!r}")
    import jax

    # The training mesh may not fit this machine: default to all devices on the batch axis, with
    # scoring batches a multiple of the device count.
    n = jax.device_count()
    batch = -(-cfg.data.batch_size // n) * n
    cfg = with_overrides(
        cfg, ["mesh.data=-1", "mesh.fsdp=1", "mesh.expert=1", "mesh.tensor=1", f"data.batch_size={batch}",
              "train.microbatches=1", *overrides]
    )
    enable_compilation_cache()
    rules = logical_rules(cfg)
    mesh = build_mesh(cfg)
    return load_trained(run_dir, mesh, rules, cfg), mesh, rules

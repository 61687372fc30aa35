"""`tessera plan --sweep`: compile candidate plans for a target and rank those that fit.

Candidates vary the mesh split (tensor x fsdp, data filling the rest), the remat policy
and the microbatch count. Each compiles in its own process, a few at a time, and one
that runs past the timeout is killed and reported as such. The ranking is by the
step's hardware FLOPs at the target's peak (compute, not communication), then by the
memory left over.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from infra.plan import compiled_memory, hardware_flops_per_step, target_mesh
from infra.targets import Target, resolve_target
from model.attention.kernels import training_kernel
from model.flops import param_counts
from infra.mesh import resolve_mesh
from train.config import ConfigError, ExperimentConfig, build_config
from train.recipes import with_overrides


@dataclass
class Candidate:
    overrides: list[str]
    fits: bool
    memory_bytes: int | None  # compiler's per-device total, or what it asked for
    step_time_s: float  # hardware FLOPs at peak: the sweep ranks compute, not communication
    error: str | None = None


def sweep_candidates(cfg: ExperimentConfig, n_devices: int) -> list[list[str]]:
    """Mesh splits (tensor x fsdp, data filling the rest), remat policies and microbatch counts to try."""
    m, batch = cfg.model, cfg.data.batch_size
    out = []
    for tensor in (1, 2, 4, 8):
        if n_devices % tensor or m.kv_heads % tensor or m.d_ff % tensor:
            continue
        for fsdp in sorted({n_devices // tensor, 1}):
            data = n_devices // tensor // fsdp
            for micro in (1, 2, 4):
                if batch % micro or (batch // micro) % (data * fsdp):
                    continue
                for remat in ("none", "save_dots", "full"):
                    out.append([f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
                                f"model.remat={remat}", f"train.microbatches={micro}"])
    return out


def step_time_at_peak(candidate: ExperimentConfig, target: Target) -> float:
    m = candidate.model
    kernel = training_kernel(m, target.devices[0].platform, candidate.data.seq_len)
    peak = target.peak(candidate.precision.policy.compute)
    return hardware_flops_per_step(candidate, kernel, param_counts(m).total) / len(target.devices) / peak


def try_candidate(cfg: ExperimentConfig, target: Target, overrides: list[str]) -> Candidate:
    candidate = with_overrides(cfg, overrides)
    step_time = step_time_at_peak(candidate, target)
    try:
        memory, required = compiled_memory(candidate, target_mesh(candidate, target))
    except ConfigError as e:
        return Candidate(overrides, False, None, step_time, str(e))
    if memory is None:
        return Candidate(overrides, False, required, step_time)
    return Candidate(overrides, memory.total <= target.memory_bytes, memory.total, step_time)


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Fitting candidates first, fastest first; among equals the one with the most memory to spare."""
    return sorted(candidates, key=lambda c: (not c.fits, c.step_time_s, c.memory_bytes or math.inf))


def largest_batch(cfg: ExperimentConfig, target: Target, overrides: list[str], limit: int = 1 << 16) -> int | None:
    """Largest global batch (a multiple of the data-parallel size) that fits, by bisection on compiles."""
    base = with_overrides(cfg, overrides)
    sizes = resolve_mesh(base, len(target.devices))
    unit = sizes["data"] * sizes["fsdp"] * base.train.microbatches

    def fits(multiple: int) -> bool:
        c = try_candidate(cfg, target, [*overrides, f"data.batch_size={multiple * unit}"])
        return c.fits

    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi * unit <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * unit




def _candidate_worker(tree: dict, target_name: str, overrides: list[str], queue) -> None:
    logging.disable(logging.WARNING)  # each candidate would repeat the same sharding notices
    queue.put(asdict(try_candidate(build_config(tree), resolve_target(target_name), overrides)))


def run_sweep(
    cfg: ExperimentConfig,
    target: Target,
    candidates: list[list[str]],
    *,
    jobs: int = 1,
    timeout_s: float = 600.0,
    progress: Callable[[Candidate], None] = lambda c: None,
) -> list[Candidate]:
    """Compile every candidate (at most `jobs` at once, each killed after timeout_s) and rank them."""
    context = multiprocessing.get_context("spawn")
    tree = cfg.model_dump(mode="json")
    pending, running, done = list(candidates), [], []
    while pending or running:
        while pending and len(running) < jobs:
            overrides = pending.pop(0)
            queue = context.Queue()
            process = context.Process(target=_candidate_worker, args=(tree, target.name, overrides, queue), daemon=True)
            process.start()
            running.append((process, queue, overrides, time.monotonic()))
        time.sleep(0.2)
        for item in list(running):
            process, queue, overrides, started = item
            result = None
            if not queue.empty():
                result = Candidate(**queue.get())
            elif not process.is_alive():
                # It may have put its result between the check above and exiting.
                try:
                    result = Candidate(**queue.get(timeout=2))
                except Exception:
                    result = Candidate(overrides, False, None, math.inf, f"compile process exited with {process.exitcode}")
            elif time.monotonic() - started > timeout_s:
                process.kill()
                result = Candidate(overrides, False, None, math.inf, f"compile took over {timeout_s:g} s")
            if result is not None:
                if math.isfinite(result.step_time_s):
                    # Ranked with this process's peak: a CPU peak measured in each worker varies with load.
                    result.step_time_s = step_time_at_peak(with_overrides(cfg, overrides), target)
                process.join(timeout=5)
                running.remove(item)
                done.append(result)
                progress(result)
    return rank(done)

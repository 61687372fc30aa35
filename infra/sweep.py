"""`tessera plan --sweep`: rank candidate plans for a target by predicted step time.

Candidates vary the mesh split (tensor x fsdp, data filling the rest), the remat policy
and the microbatch count. Each is first placed by the analytic models (train/memory.py for
memory; FLOPs at peak plus ring costs of the weight gathers, gradient reductions and
tensor-parallel all-reduces for time); the `compile_top` best that fit by that account are
then compiled, each in its own process (a few at a time, killed past the timeout), and
ranked by the step time the compiled program predicts (infra/step_time.py; on CPU targets
its FLOPs at peak), then by the memory left over. Compiled results are cached on disk by
config, candidate, target and the versions of jax, libtpu and this code, so a re-run of a
sweep compiles nothing it has compiled before.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.mesh import logical_rules, resolve_mesh
from infra.plan import compile_for_plan, hardware_flops_per_step, predict_step_time, target_mesh
from infra.targets import Target, resolve_target
from model.attention.kernels import training_kernel
from model.flops import param_counts
from model.memory import dtype_bytes
from train.config import ConfigError, ExperimentConfig, build_config
from train.recipes import with_overrides

ANALYTIC_SLACK = 1.10  # the memory model is held within 10% of the compiler: keep candidates that close
CODE_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Candidate:
    overrides: list[str]
    fits: bool
    memory_bytes: int | None  # compiler's per-device total, or what it asked for
    step_time_s: float  # predicted from the compiled program (TPU), else FLOPs at peak
    compute_s: float | None = None
    exposed_communication_s: float | None = None
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


def analytic_step_time(cfg: ExperimentConfig, target: Target) -> float:
    """FLOPs at peak, with ring costs over one bidirectional link per mesh axis for: FSDP's weight gathers
    (forward and backward) and gradient reduce-scatter per microbatch and the data axis's gradient all-reduce,
    hidden behind compute as XLA overlaps them; tensor parallelism's activation all-reduces (two per layer
    each way, two more under full remat), exposed."""
    from infra.interconnect import chip_links

    compute = step_time_at_peak(cfg, target)
    if not target.is_tpu:
        return compute
    sizes, m = resolve_mesh(cfg, len(target.devices)), cfg.model
    link = 2 * chip_links(target.devices[0].device_kind).ici_link_bytes_per_s
    weights = param_counts(m).total * dtype_bytes(cfg.precision.policy.compute) / sizes["tensor"]
    fsdp, data, tensor = sizes["fsdp"], sizes["data"], sizes["tensor"]
    hidden = cfg.train.microbatches * 3 * weights * (fsdp - 1) / fsdp / link
    hidden += 2 * param_counts(m).total * 4 / (fsdp * tensor) * (data - 1) / data / link
    tokens = cfg.data.batch_size * cfg.data.seq_len / (data * fsdp)
    all_reduces = m.n_layers * (6 if m.remat == "full" else 4)
    exposed = all_reduces * 2 * (tensor - 1) / tensor * tokens * m.d_model * dtype_bytes(cfg.precision.policy.compute) / link
    return max(compute, hidden) + exposed


def analytic_memory(cfg: ExperimentConfig, target: Target) -> int:
    from train.memory import estimate_memory
    from train.program import build_program

    return estimate_memory(build_program(cfg, target_mesh(cfg, target), logical_rules(cfg))).total


def analytic_order(cfg: ExperimentConfig, target: Target, candidates: list[list[str]]):
    """(overrides, analytic memory, analytic step time) of the candidates that fit by the analytic memory
    model (with its slack), fastest first."""
    placed = []
    for overrides in candidates:
        try:
            candidate = with_overrides(cfg, overrides)
            memory = analytic_memory(candidate, target)
        except ConfigError:
            continue
        if memory <= target.memory_bytes * ANALYTIC_SLACK:
            placed.append((overrides, memory, analytic_step_time(candidate, target)))
    return sorted(placed, key=lambda c: (c[2], c[1]))


def fitting_changes(cfg: ExperimentConfig, target: Target, n: int = 3) -> list[dict]:
    """For a step that does not fit: the cheapest changes that fit by the analytic models with their error to spare
    (mesh split, remat, microbatches, and a smaller global batch, which changes the recipe), by predicted time per
    token."""
    candidates = sweep_candidates(cfg, len(target.devices))
    batch = cfg.data.batch_size
    for smaller in (batch // 2, batch // 4):
        if smaller >= 1:
            reduced = cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": smaller})})
            candidates += [[f"data.batch_size={smaller}", *c] for c in sweep_candidates(reduced, len(target.devices))]
    out = []
    for overrides, memory, seconds in analytic_order(cfg, target, candidates):
        if memory > target.memory_bytes / ANALYTIC_SLACK:  # offered only with the model's error to spare
            continue
        tokens = with_overrides(cfg, overrides).data.batch_size * cfg.data.seq_len
        out.append({"overrides": overrides, "analytic_memory_bytes": memory, "analytic_step_time_s": seconds,
                    "seconds_per_million_tokens": seconds / tokens * 1e6})
    return sorted(out, key=lambda c: c["seconds_per_million_tokens"])[:n]


def try_candidate(cfg: ExperimentConfig, target: Target, overrides: list[str]) -> Candidate:
    candidate = with_overrides(cfg, overrides)
    step_time = step_time_at_peak(candidate, target)
    try:
        mesh = target_mesh(candidate, target)
        memory, required, compiled = compile_for_plan(candidate, mesh)
    except ConfigError as e:
        return Candidate(overrides, False, None, step_time, error=str(e))
    if memory is None:
        return Candidate(overrides, False, required, step_time)
    predicted = predict_step_time(compiled, candidate, target, mesh)
    if predicted is None:
        return Candidate(overrides, memory.total <= target.memory_bytes, memory.total, step_time)
    return Candidate(overrides, memory.total <= target.memory_bytes, memory.total, predicted.total_s,
                     predicted.compute_s, predicted.exposed_communication_s)


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




def cache_dir() -> Path:
    return Path(os.environ.get("TESSERA_CACHE_DIR", Path.home() / ".cache" / "tessera")) / "sweep"


@functools.cache
def _code_version() -> str:
    digest = hashlib.sha256()
    for folder in ("infra", "model", "train"):
        for path in sorted((CODE_ROOT / folder).rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(tree: dict, target_name: str, overrides: list[str]) -> str:
    versions = {}
    for package in ("jax", "jaxlib", "libtpu"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    blob = json.dumps([tree, target_name, overrides, versions, os.environ.get("LIBTPU_INIT_ARGS", ""),
                       _code_version()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


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
    pending, running, done = [], [], []
    cached_at = {tuple(o): cache_dir() / f"{cache_key(tree, target.name, o)}.json" for o in candidates}
    for overrides in candidates:
        cached = cached_at[tuple(overrides)]
        if cached.exists():
            done.append(Candidate(**json.loads(cached.read_text())))
            progress(done[-1])
        else:
            pending.append(overrides)
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
                    result = Candidate(overrides, False, None, math.inf,
                                       error=f"compile process exited with {process.exitcode}")
            elif time.monotonic() - started > timeout_s:
                process.kill()
                result = Candidate(overrides, False, None, math.inf, error=f"compile took over {timeout_s:g} s")
            if result is not None:
                if math.isfinite(result.step_time_s) and not target.is_tpu:
                    # Ranked with this process's peak: a CPU peak measured in each worker varies with load.
                    result.step_time_s = step_time_at_peak(with_overrides(cfg, overrides), target)
                elif target.is_tpu and result.error is None and math.isfinite(result.step_time_s):
                    cached = cached_at[tuple(overrides)]
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_text(json.dumps(asdict(result)))
                process.join(timeout=5)
                running.remove(item)
                done.append(result)
                progress(result)
    return rank(done)

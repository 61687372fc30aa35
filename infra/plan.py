"""`tessera plan`: compile the real train step ahead of time for a target and set the
compiler's FLOP and memory figures beside our analytic ones.

Nothing is allocated: the state and batch are ShapeDtypeStructs carrying the target
mesh's shardings, and the step is lowered and compiled for the target's devices.

XLA's cost analysis counts the body of a loop once, whatever its trip count. The layer
scan and the microbatch scan are such loops, so XLA's FLOPs come from two extra compiles
of the same step with 1 and 2 unrolled layers and one microbatch, extrapolated linearly
to the model's depth (every layer is the same computation). The reference count compiles
the whole (global) step for one CPU device: the TPU compiler also turns collective
matmuls into loops of its own, so its per-device count falls short by a share that
grows with the mesh; it is reported beside, with its time estimate. Memory comes from
the real, unchanged step on the target.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import jax
from jax.sharding import Mesh

from infra.mesh import build_mesh, device_mesh, logical_rules, resolve_mesh
from infra.step_time import StepTime, StepTimeModel
from infra.targets import Target
from model.attention.kernels import training_kernel
from model.flops import (
    attention_train_flops_per_token, hardware_flops_per_token, kernel_keys, optimizer_flops_per_param,
    param_counts, train_flops_per_token,
)
from model.memory import kv_cache_bytes_per_token
from train.config import MESH_AXES, ConfigError, ExperimentConfig
from train.recipes import with_overrides
from train.memory import MemoryEstimate, estimate_memory
from train.program import build_program
from train.sharding import unsplit_dimensions

SECONDS_PER_DAY = 86400.0
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022: compute-optimal D is about 20 N


def target_mesh(cfg: ExperimentConfig, target: Target) -> Mesh:
    """The config's mesh on the target's devices; with several slices, the `mesh.dcn_*` axes span them
    (by default the data axis)."""
    dcn = cfg.mesh.dcn_sizes()
    if target.slices > 1 and math.prod(dcn.values()) == 1:
        data = resolve_mesh(cfg, len(target.devices))["data"]
        if data % target.slices:
            raise ConfigError(
                f"target {target.name} has {target.slices} slices joined over DCN, which split the data axis, "
                f"but mesh.data={data} is not divisible by {target.slices}"
            )
        cfg = with_overrides(cfg, [f"mesh.dcn_data={target.slices}"])
    elif math.prod(dcn.values()) != target.slices:
        raise ConfigError(
            f"the mesh.dcn_* sizes {dcn} multiply to {math.prod(dcn.values())}, but target {target.name} has "
            f"{target.slices} slice(s) joined over DCN"
        )
    return build_mesh(cfg, list(target.devices))


class DoesNotFit(Exception):
    """The compiler refused the step for lack of device memory; `required` is what it asked for."""

    def __init__(self, required: int | None, message: str):
        super().__init__(message)
        self.required = required


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compile_train_step(cfg: ExperimentConfig, mesh: Mesh):
    program = build_program(cfg, mesh, logical_rules(cfg))
    try:
        compiled = program.train_step.lower(program.abstract_state(), program.abstract_batch()).compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        # "...required for HLO temporaries (17.28G) exceeds available HBM (15.75G)."
        found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", text)
        required = int(float(found.group(1)) * _UNITS[found.group(2)]) if found else None
        raise DoesNotFit(required, text.splitlines()[0]) from None
    return program, compiled


def _flop_probe(cfg: ExperimentConfig, mesh: Mesh, n_layers: int) -> dict[str, float]:
    probe = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"n_layers": n_layers, "scan_layers": False}),
            "train": cfg.train.model_copy(update={"microbatches": 1}),
        }
    )
    _, compiled = compile_train_step(probe, mesh)
    return compiled.cost_analysis()


def xla_step_costs(cfg: ExperimentConfig, mesh: Mesh) -> tuple[float, float | None]:
    """Per-device FLOPs of one train step, and the TPU compiler's own time estimate (None elsewhere).

    Depth is extrapolated from one and two repeating units: layers for a dense model, MoE
    groups (after the dense lead) for an MoE model.
    """
    m = cfg.model
    lead, unit = (m.moe.first_dense_layers, m.moe.every) if m.moe else (0, 1)
    one, two = _flop_probe(cfg, mesh, lead + unit), _flop_probe(cfg, mesh, lead + 2 * unit)
    n = (m.n_layers - lead) // unit

    def extrapolate(key: str) -> float | None:
        if key not in one or key not in two:
            return None
        return one[key] + (n - 1) * (two[key] - one[key])

    seconds = extrapolate("optimal_seconds")
    # The estimate is only meaningful while it grows with depth from a positive start.
    sane = seconds is not None and 0 < one["optimal_seconds"] < two["optimal_seconds"]
    return extrapolate("flops"), seconds if sane else None


def xla_total_flops(cfg: ExperimentConfig) -> float:
    """FLOPs of the whole train step (global batch) as XLA counts them, compiled for one CPU device with dense
    attention: XLA counts a loop body once (blockwise attention scans its key blocks) and a Pallas kernel not
    at all, so the comparison is made on the dense step, and the kernels' own FLOPs are analytic."""
    mesh = device_mesh(dict.fromkeys(MESH_AXES, 1), [jax.devices("cpu")[0]])
    dense = cfg.model_copy(update={"model": cfg.model.model_copy(update={"attention": "dense"})})
    flops, _ = xla_step_costs(dense, mesh)
    return flops


@dataclass
class XlaMemory:
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        """Peak bytes the step needs on a device: donated outputs reuse their arguments' buffers."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code


@dataclass
class TargetPlan:
    target: str
    precision: str  # the policy's dtypes, in words
    mesh: dict[str, int]
    attention: str  # the attention implementation the step runs on the target
    devices: int
    parameters: int
    non_embedding_parameters: int
    kv_cache_bytes_per_token: int  # for serving: keys and values of every layer, compute dtype
    tokens_per_step: int
    model_flops_per_step: float  # causal attention halved: the MFU numerator
    active_parameters: int  # what one token is multiplied through (MoE: its top_k experts)
    hardware_flops_per_step: float  # what the step executes: attention as its kernel computes it, remat recompute
    xla_flops_per_step: float  # the whole step compiled for one CPU device
    flops_error: float  # analytic hardware FLOPs vs that count, relative
    tpu_cost_flops_per_step: float | None  # the TPU compiler's per-device count x devices (undercounts)
    analytic_memory: MemoryEstimate
    xla_memory: XlaMemory | None  # None when the compiler refused the step: it does not fit
    xla_required_temporaries: int | None  # what the compiler asked for when it refused
    memory_error: float | None
    device_memory_bytes: int
    fits: bool
    peak_flops_per_device: float
    step_time_lower_bound_s: float  # hardware FLOPs at peak
    xla_step_time_s: float | None
    predicted: StepTime | None  # the roofline and collective model on the compiled step (TPU targets)
    predicted_mfu: float | None
    assumed_mfu: float
    step_time_at_mfu_s: float
    tokens_per_second: float  # predicted where there is a prediction, else at the assumed MFU
    token_budget: float
    days_for_budget: float
    notes: list[str] = field(default_factory=list)
    would_fit: list[dict] = field(default_factory=list)  # when it does not fit: changes that do (infra/sweep.py)

    def to_json(self) -> dict:
        return plan_json(self)


def plan_json(plan) -> dict:
    """A plan (a dataclass with analytic_memory and xla_memory) as JSON, both memories with their totals."""
    out = asdict(plan)
    out["analytic_memory"] = plan.analytic_memory.as_dict()
    if plan.xla_memory is not None:
        out["xla_memory"]["total"] = plan.xla_memory.total
    return out


def compiled_memory(cfg: ExperimentConfig, mesh: Mesh) -> tuple[XlaMemory | None, int | None]:
    """The compiler's memory figures for the step, or (None, what it asked for) when it does not fit."""
    memory, required, _ = compile_for_plan(cfg, mesh)
    return memory, required


def compile_for_plan(cfg: ExperimentConfig, mesh: Mesh):
    """(the compiler's memory figures, None, the compiled step), or (None, what it asked for, None) when the
    step does not fit."""
    try:
        _, compiled = compile_train_step(cfg, mesh)
    except DoesNotFit as e:
        return None, e.required, None
    stats = compiled.memory_analysis()
    memory = XlaMemory(
        arguments=stats.argument_size_in_bytes,
        outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes,
        temporaries=stats.temp_size_in_bytes,
        generated_code=stats.generated_code_size_in_bytes,
    )
    return memory, None, compiled


def predict_step_time(compiled, cfg: ExperimentConfig, target: Target, mesh: Mesh) -> StepTime | None:
    """The roofline and collective model (infra/step_time.py) on the compiled step; TPU targets only (the link
    table is TPU's). Splash's kernels are custom calls: their FLOPs are the kernel's analytic work."""
    if compiled is None or not target.is_tpu:
        return None
    from infra.hlo import parse_module
    from infra.interconnect import Topology, chip_links

    links = chip_links(target.devices[0].device_kind)
    model = StepTimeModel(parse_module(compiled.as_text()), Topology(list(mesh.devices.flat), links),
                          target.peak(cfg.precision.policy.compute), splash_flops(cfg.model))
    return model.estimate()


SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}  # the forward; the dQ and dK/dV kernels each recompute the scores


def splash_flops(m):
    """FLOPs of one splash kernel call from its q and k operands ([..., length, head_dim]): its matmuls over the
    key blocks it visits (model/flops.py kernel_keys)."""

    def flops(instruction, operands):
        kernel = re.search(r"splash_mha_(fwd|dq|dkv)", instruction.name)
        if kernel is None or len(operands) < 4:
            return None
        q, k = operands[2], operands[3]
        return 2.0 * SPLASH_MATMULS[kernel.group(1)] * math.prod(q.dims) * kernel_keys(m, k.dims[-2], "splash")

    return flops


def hardware_flops_per_step(cfg: ExperimentConfig, kernel: str, parameters: int) -> float:
    """FLOPs one train step executes on all devices: the model with `kernel`'s attention, remat recompute and
    capacity slots, plus the optimizer update."""
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return (hardware_flops_per_token(cfg.model, cfg.data.seq_len, kernel) * tokens
            + optimizer_flops_per_param() * parameters)


def tpu_cost_estimate(cfg: ExperimentConfig, target: Target, mesh: Mesh, kernel: str) -> tuple[float | None, float | None]:
    """The TPU compiler's own (FLOPs for all devices, step seconds), or Nones off TPU or when even one or two
    layers exceed the device. A splash kernel is a custom call XLA counts no FLOPs for: its analytic
    FLOPs are added."""
    if not target.is_tpu:
        return None, None
    try:
        per_device, seconds = xla_step_costs(cfg, mesh)
    except DoesNotFit:
        return None, None
    flops = per_device * len(target.devices)
    if kernel == "splash":
        tokens = cfg.data.batch_size * cfg.data.seq_len
        flops += attention_train_flops_per_token(cfg.model, cfg.data.seq_len, "splash") * tokens
    return flops, seconds


def memory_error(analytic: MemoryEstimate, xla: XlaMemory | None, required: int | None) -> float | None:
    """Analytic total vs the compiler's; when it refused the step, vs the (exactly known) state plus the
    temporaries it asked for."""
    if xla is not None:
        return analytic.total / xla.total - 1.0
    if required is not None:
        return analytic.total / (analytic.parameters + analytic.optimizer + required) - 1.0
    return None


def plan_notes(cfg: ExperimentConfig, program, target: Target, kernel: str, refused: bool) -> list[str]:
    """What a reader of the plan should know about its figures."""
    model = program.model
    notes = [f"layout: {n}" for n in unsplit_dimensions(model.logical_specs, model.params, program.mesh, program.rules)]
    if cfg.model.moe is not None and cfg.model.moe.dispatch == "dropless":
        notes.append("XLA counts ragged_dot (dropless experts) as if every token ran every expert; "
                     "the analytic figure is the grouped matmul's real work")
    if kernel != "dense":
        notes.append("the FLOP check against XLA compiles the step with dense attention (XLA counts a loop body "
                     "once and a Pallas kernel not at all); hardware FLOPs count the attention kernel's own work")
    if cfg.precision.policy.compute == "float32" and target.is_tpu:
        notes.append("float32 matmuls run as one bf16 MXU pass under jax's default precision; peak is the bf16 rate")
    if refused:
        notes.append("does not fit: memory vs XLA compares with the state plus the temporaries the compiler asked for")
    return notes


def plan_target(cfg: ExperimentConfig, target: Target, *, mfu: float, token_budget: float | None) -> TargetPlan:
    """Analytic figures beside the compiler's for the config's train step on the target."""
    mesh = target_mesh(cfg, target)
    program = build_program(cfg, mesh, logical_rules(cfg))
    analytic = estimate_memory(program)
    xla_memory, required, compiled = compile_for_plan(cfg, mesh)
    predicted = predict_step_time(compiled, cfg, target, mesh)
    m, seq, policy = cfg.model, cfg.data.seq_len, cfg.precision.policy
    kernel = training_kernel(m, target.devices[0].platform, seq)
    xla_flops = xla_total_flops(cfg)
    tpu_flops, xla_seconds = tpu_cost_estimate(cfg, target, mesh, kernel)
    tokens, n_devices, parameters = cfg.data.batch_size * seq, len(target.devices), program_parameters(program)
    model_flops = train_flops_per_token(m, seq) * tokens
    hardware_flops = hardware_flops_per_step(cfg, kernel, parameters)
    # The check against XLA is made on the dense step (see xla_total_flops).
    dense_flops = hardware_flops_per_step(cfg, "dense", parameters)
    peak = target.peak(policy.compute)
    step_at_mfu = model_flops / (peak * n_devices * mfu)
    budget = token_budget if token_budget is not None else CHINCHILLA_TOKENS_PER_PARAM * parameters
    step_time = predicted.total_s if predicted is not None else step_at_mfu
    return TargetPlan(
        target=target.name,
        precision=f"{cfg.precision.preset}: {policy.describe()}",
        mesh=dict(mesh.shape),
        devices=n_devices,
        parameters=parameters,
        non_embedding_parameters=param_counts(m).non_embedding,
        active_parameters=param_counts(m).active,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(m, policy.compute),
        tokens_per_step=tokens,
        model_flops_per_step=model_flops,
        hardware_flops_per_step=hardware_flops,
        xla_flops_per_step=xla_flops,
        flops_error=dense_flops / xla_flops - 1.0,
        attention=kernel,
        tpu_cost_flops_per_step=tpu_flops,
        analytic_memory=analytic,
        xla_memory=xla_memory,
        xla_required_temporaries=required,
        memory_error=memory_error(analytic, xla_memory, required),
        device_memory_bytes=target.memory_bytes,
        fits=xla_memory is not None and xla_memory.total <= target.memory_bytes,
        peak_flops_per_device=peak,
        step_time_lower_bound_s=hardware_flops / n_devices / peak,
        xla_step_time_s=xla_seconds,
        predicted=predicted,
        predicted_mfu=None if predicted is None else model_flops / (peak * n_devices * predicted.total_s),
        assumed_mfu=mfu,
        step_time_at_mfu_s=step_at_mfu,
        tokens_per_second=tokens / step_time,
        token_budget=budget,
        days_for_budget=budget / (tokens / step_time) / SECONDS_PER_DAY,
        notes=plan_notes(cfg, program, target, kernel, refused=xla_memory is None and required is not None),
    )


def program_parameters(program) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(program.model.params))


@dataclass
class ComputeOptimal:
    flops: float
    parameters: float
    tokens: float
    seconds_on_target: float | None


def compute_optimal(flops: float, peak_flops: float | None = None, mfu: float = 0.4) -> ComputeOptimal:
    """Chinchilla: C = 6 N D with D = 20 N, so N = sqrt(C / 120)."""
    n = math.sqrt(flops / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    seconds = flops / (peak_flops * mfu) if peak_flops else None
    return ComputeOptimal(flops, n, CHINCHILLA_TOKENS_PER_PARAM * n, seconds)

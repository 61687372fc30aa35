"""`tessera plan` for a dual encoder (model.clip): both towers' parameters, FLOPs and per-device memory, analytic
beside the compiler's, and the predicted step time on TPU targets.

FLOPs are checked as for the language models (infra/plan.py): XLA counts a scanned layer once, so the whole
step is compiled for one CPU device with dense attention at one and two unrolled layers per tower, and the
count is extrapolated to each tower's depth. Memory is the real step compiled for the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax

from infra.mesh import device_mesh, logical_rules
from infra.plan import (
    XlaMemory, compile_for_plan, compile_train_step, memory_error, plan_json, predict_step_time, target_mesh,
)
from infra.step_time import StepTime
from infra.targets import Target
from model.attention.kernels import implementation
from model.clip_flops import clip_param_counts, clip_train_flops_per_pair
from model.flops import optimizer_flops_per_param
from train.clip_memory import estimate_clip_memory
from train.config import MESH_AXES, ExperimentConfig
from train.memory import MemoryEstimate
from train.program import build_program


@dataclass
class ClipPlan:
    target: str
    mesh: dict[str, int]
    devices: int
    pairs_per_step: int
    parameters: dict[str, int]  # text, vision, projections, scalars, total
    attention: dict[str, str]  # each tower's attention implementation on the target
    model_flops_per_step: float  # the MFU numerator: causal text attention over the keys each query sees
    hardware_flops_per_step: float  # what the step executes: attention as its kernel computes it, the optimizer
    xla_flops_per_step: float  # the whole step compiled for one CPU device (dense attention)
    flops_error: float
    analytic_memory: MemoryEstimate
    xla_memory: XlaMemory | None
    xla_required_temporaries: int | None
    memory_error: float | None
    device_memory_bytes: int
    fits: bool
    peak_flops_per_device: float
    step_time_lower_bound_s: float
    predicted: StepTime | None
    predicted_mfu: float | None

    def to_json(self) -> dict:
        return plan_json(self)


def _step_flops(cfg: ExperimentConfig, kernel: str | None, parameters: int) -> float:
    b = cfg.data.batch_size
    return clip_train_flops_per_pair(cfg.model, cfg.data.seq_len, b, kernel) * b + optimizer_flops_per_param() * parameters


def xla_clip_flops(cfg: ExperimentConfig) -> float:
    """The whole step's FLOPs as XLA counts them on one CPU device, dense attention, each tower's depth
    extrapolated from probes with one and two unrolled layers."""
    mesh = device_mesh(dict.fromkeys(MESH_AXES, 1), [jax.devices("cpu")[0]])
    m, v = cfg.model, cfg.model.clip.vision

    def probe(text_layers: int, vision_layers: int) -> float:
        vision = v.model_copy(update={"n_layers": vision_layers})
        model = m.model_copy(update={"n_layers": text_layers, "scan_layers": False, "attention": "dense",
                                     "clip": m.clip.model_copy(update={"vision": vision})})
        probe_cfg = cfg.model_copy(update={"model": model})
        _, compiled = compile_train_step(probe_cfg, mesh)
        return compiled.cost_analysis()["flops"]

    base = probe(1, 1)
    return base + (m.n_layers - 1) * (probe(2, 1) - base) + (v.n_layers - 1) * (probe(1, 2) - base)


def plan_clip(cfg: ExperimentConfig, target: Target) -> ClipPlan:
    mesh = target_mesh(cfg, target)
    program = build_program(cfg, mesh, logical_rules(cfg))
    analytic = estimate_clip_memory(program)
    xla_memory, required, compiled = compile_for_plan(cfg, mesh)
    predicted = predict_step_time(compiled, cfg, target, mesh)
    m, platform = cfg.model, target.devices[0].platform
    kernels = {"text": implementation(m.attention, platform, cfg.data.seq_len, cfg.data.seq_len),
               "vision": implementation(m.attention, platform, m.clip.vision.tokens, m.clip.vision.tokens)}
    parameters = sum(math.prod(p.shape) for p in jax.tree.leaves(program.model.params))
    # One kernel per step for the hardware count: the towers' lengths differ, but both run dense or both a kernel.
    kernel = kernels["vision"] if kernels["vision"] == kernels["text"] else "dense"
    hardware = _step_flops(cfg, kernel, parameters)
    xla = xla_clip_flops(cfg)
    model_flops = _step_flops(cfg, None, 0)
    peak, n = target.peak(cfg.precision.policy.compute), len(target.devices)
    return ClipPlan(
        target=target.name, mesh=dict(mesh.shape), devices=n, pairs_per_step=cfg.data.batch_size,
        parameters=clip_param_counts(m), attention=kernels, model_flops_per_step=model_flops,
        hardware_flops_per_step=hardware, xla_flops_per_step=xla, flops_error=_step_flops(cfg, "dense", parameters) / xla - 1,
        analytic_memory=analytic, xla_memory=xla_memory, xla_required_temporaries=required,
        memory_error=memory_error(analytic, xla_memory, required), device_memory_bytes=target.memory_bytes,
        fits=xla_memory is not None and xla_memory.total <= target.memory_bytes, peak_flops_per_device=peak,
        step_time_lower_bound_s=hardware / n / peak, predicted=predicted,
        predicted_mfu=None if predicted is None else model_flops / (peak * n * predicted.total_s),
    )


def plan_rows(plan: ClipPlan) -> list[tuple[str, str]]:
    gib = lambda x: "-" if x is None else f"{x / 2**30:.3f} GiB"  # noqa: E731
    p, mem = plan.parameters, plan.analytic_memory
    rows = [
        ("mesh", " x ".join(f"{k}={v}" for k, v in plan.mesh.items())),
        ("parameters: total", f"{p['total']:,}"),
        ("  image tower / text tower", f"{p['vision']:,} / {p['text']:,}"),
        ("  projections / scale (bias)", f"{p['projections']:,} / {p['scalars']}"),
        ("image-text pairs per step", f"{plan.pairs_per_step:,}"),
        ("attention: text / image", f"{plan.attention['text']} / {plan.attention['vision']}"),
        ("model FLOPs per step", f"{plan.model_flops_per_step:.4g}"),
        ("hardware FLOPs per step", f"{plan.hardware_flops_per_step:.4g}"),
        ("XLA FLOPs (1 CPU device, dense)", f"{plan.xla_flops_per_step:.4g} (analytic {plan.flops_error:+.1%})"),
        ("memory: state", gib(mem.parameters + mem.optimizer)),
        ("memory: saved activations", gib(mem.saved_activations)),
        ("memory: backward peak phase", gib(mem.peak_phase)),
        ("memory: analytic total", gib(mem.total)),
        ("memory: XLA total", gib(None if plan.xla_memory is None else plan.xla_memory.total)
         + ("" if plan.memory_error is None else f" (analytic {plan.memory_error:+.1%})")),
        ("device memory", gib(plan.device_memory_bytes)),
        ("fits (XLA)", "yes" if plan.fits else "NO"),
        ("step time at peak (lower bound)", f"{plan.step_time_lower_bound_s * 1e3:.1f} ms"),
    ]
    if plan.predicted is not None:
        rows += [("predicted step time", f"{plan.predicted.total_s * 1e3:.1f} ms"),
                 ("predicted MFU", f"{plan.predicted_mfu:.1%}")]
    return rows

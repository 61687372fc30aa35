"""`tessera plan`: per-target plans, sweeps and compute-optimal sizing, printed or written out."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from infra.commands.arguments import add_config_arguments, split_config_arg
from train.config import ConfigError, ExperimentConfig, dump_config
from model.config import ModelConfig
from train.recipes import is_model_preset_file, load_config, model_preset, overrides_tree

# A bare model preset carries no data or mesh sections; planning then uses a realistic
# training shape: 2048-token sequences, one per device, weights fully sharded (FSDP).
PLANNING_SEQ_LEN = 2048
CLIP_PAIRS_PER_DEVICE = 32  # a dual encoder preset is planned with this many image-text pairs per device


@dataclass
class PlanRequest:
    config: str | None
    overrides: list[str]
    targets: list[str]
    json: bool = False
    out: str | None = None
    mfu: float = 0.4
    tokens: float | None = None
    sweep: bool = False
    jobs: int = 1
    timeout_s: float = 600.0
    max_batch: bool = False
    compile_top: int = 8
    budget_flops: float | None = None
    chip_hours: float | None = None


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="FLOPs, memory per device and time for a config on a target, checked against the XLA compiler",
        description="Compile the real train step ahead of time for each --target (cpu: this machine's devices; "
        "a TPU slice such as v5e-16, v5p-128, v6e-256 or v5e-256x2, compiled through libtpu, no TPU needed) and "
        "set analytic FLOPs and memory beside the compiler's. A bare model preset is planned at 2048-token "
        "sequences, one per device, fully sharded (FSDP); overrides change that.",
    )
    add_config_arguments(p, "experiment YAML or model preset file")
    p.add_argument("--target", action="append", default=[], help="cpu, or a TPU slice like v5p-128 (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", help="write report.md, memory.png and plan.json into this directory")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for times (default 0.4)")
    p.add_argument("--tokens", type=float, help="token budget for the time estimate (default: 20 x parameters)")
    p.add_argument("--sweep", action="store_true", help="try mesh splits, remat policies and microbatches; rank them")
    p.add_argument("--jobs", type=int, default=1, help="sweep compiles at once (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one sweep compile may take (default 600)")
    p.add_argument("--max-batch", action="store_true", help="with --sweep: bisect the largest global batch that fits")
    p.add_argument("--compile-top", type=int, default=8,
                   help="with --sweep: compile the N candidates the analytic models place fastest (default 8)")
    p.add_argument("--budget-flops", type=float, help="compute budget C: suggest parameters and tokens (Chinchilla)")
    p.add_argument("--chip-hours", type=float, help="compute budget in device-hours on the target at --mfu")
    p.set_defaults(func=run)


def run(args) -> int:
    path, overrides = split_config_arg(args)
    return run_plan(
        PlanRequest(
            config=path, overrides=overrides, targets=args.target, json=args.json, out=args.out, mfu=args.mfu,
            tokens=args.tokens, sweep=args.sweep, jobs=args.jobs, timeout_s=args.timeout, max_batch=args.max_batch,
            compile_top=args.compile_top,
            budget_flops=args.budget_flops, chip_hours=args.chip_hours,
        )
    )


def config_for(request: PlanRequest, n_devices: int) -> ExperimentConfig:
    defaults: list[str] = []
    if request.config and is_model_preset_file(request.config):
        model = model_preset(request.config)
        seq = min(PLANNING_SEQ_LEN, model.get("max_seq_len", ModelConfig.model_fields["max_seq_len"].default))
        defaults = [f"data.seq_len={seq}", f"data.batch_size={n_devices}", "mesh.data=1", "mesh.fsdp=-1"]
        if model.get("clip") is not None:  # a dual encoder plans on image-text pairs (the files are never read)
            defaults = [*defaults, "data.source=images", "data.paths=[captions.jsonl]",
                        f"data.batch_size={CLIP_PAIRS_PER_DEVICE * n_devices}"]
    cfg = load_config(request.config, [*defaults, *request.overrides])
    if cfg.model.clip is not None and (request.sweep or request.budget_flops is not None or request.chip_hours is not None):
        raise ConfigError("--sweep and compute budgets plan a language model's step; plan a dual encoder without them")
    if cfg.rl is not None and (request.sweep or request.budget_flops is not None or request.chip_hours is not None):
        raise ConfigError("--sweep and compute budgets plan a training step; plan an RL config without them (its "
                          "step's memory per device, phase by phase)")
    if cfg.distill is not None:
        raise ConfigError("tessera plan plans one model's training step; a distillation's also runs its teacher. "
                          "Plan the student without the distill section, and the teacher's run from its config")
    return cfg


def _check_mfu(mfu: float) -> None:
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} must be in (0, 1], e.g. 0.4 for 40% model FLOPs utilisation")


def run_plan(request: PlanRequest) -> int:
    _check_mfu(request.mfu)
    if not request.targets:
        raise ConfigError("name at least one --target, e.g. --target cpu or --target v5e-16")
    from infra.targets import resolve_target

    targets = [resolve_target(name) for name in request.targets]  # bad names fail before any compile
    if request.budget_flops is not None or request.chip_hours is not None:
        return _run_budget(request, targets)
    if request.sweep:
        return _run_sweep(request, targets)
    from infra.plan import plan_target, target_mesh
    from infra.plan_report import as_json, print_table, write_report

    configs = [config_for(request, len(t.devices)) for t in targets]
    if any(cfg.rl is not None for cfg in configs):
        return _run_rl_plan(request, configs, targets)
    if any(cfg.model.clip is not None for cfg in configs):
        return _run_clip_plan(request, configs, targets)
    for cfg, target in zip(configs, targets, strict=True):
        target_mesh(cfg, target)  # every mesh is checked before the first (slow) compile
    plans, texts = [], []
    for cfg, target in zip(configs, targets, strict=True):
        texts.append(f"# {target.name}\n{dump_config(cfg)}")
        print(f"compiling the train step for {target.name} ({len(target.devices)} devices)...", file=sys.stderr)
        plan = plan_target(cfg, target, mfu=request.mfu, token_budget=request.tokens)
        if not plan.fits:
            from infra.sweep import fitting_changes

            plan.would_fit = fitting_changes(cfg, target)
        plans.append(plan)
    if request.json:
        print(as_json(plans))
    else:
        print_table(plans)
    if request.out:
        path = write_report(plans, "\n".join(texts), Path(request.out))
        print(f"report: {path}", file=sys.stderr)
    return 0


def _run_rl_plan(request: PlanRequest, configs: list[ExperimentConfig], targets) -> int:
    """An RL step's memory per device, phase by phase (infra/plan_rl.py)."""
    import json as jsonlib

    from infra.plan_report import print_columns
    from infra.plan_rl import plan_rl, plan_rows

    if request.out:
        raise ConfigError("--out writes a training step's report; for an RL config use --json > FILE")
    plans = []
    for cfg, target in zip(configs, targets, strict=True):
        print(f"compiling the RL step's programs for {target.name} ({len(target.devices)} devices)...", file=sys.stderr)
        plans.append(plan_rl(cfg, target))
    if request.json:
        print(jsonlib.dumps([p.to_json() for p in plans], indent=2))
        return 0
    print_columns(f"tessera plan: one {configs[0].rl.algorithm} step, memory per device", [p.target for p in plans],
                  [plan_rows(p) for p in plans])
    return 0


def _run_clip_plan(request: PlanRequest, configs: list[ExperimentConfig], targets) -> int:
    """A dual encoder's step: both towers' FLOPs and memory per device (infra/plan_clip.py)."""
    import json as jsonlib

    from infra.plan import target_mesh
    from infra.plan_clip import plan_clip, plan_rows
    from infra.plan_report import print_columns

    if request.out:
        raise ConfigError("--out writes a language model's report; for a dual encoder use --json > FILE")
    for cfg, target in zip(configs, targets, strict=True):
        target_mesh(cfg, target)
    plans = []
    for cfg, target in zip(configs, targets, strict=True):
        print(f"compiling the dual encoder's train step for {target.name} ({len(target.devices)} devices)...",
              file=sys.stderr)
        plans.append(plan_clip(cfg, target))
    if request.json:
        print(jsonlib.dumps([p.to_json() for p in plans], indent=2, default=str))
        return 0
    print_columns(f"tessera plan: {configs[0].model.name}, one contrastive step", [p.target for p in plans],
                  [plan_rows(p) for p in plans])
    return 0


def _run_sweep(request: PlanRequest, targets) -> int:
    import json as jsonlib
    from dataclasses import asdict

    from rich.progress import Progress

    from infra.sweep import analytic_order, largest_batch, run_sweep, sweep_candidates

    results = {}
    for target in targets:
        cfg = config_for(request, len(target.devices))
        placed = analytic_order(cfg, target, sweep_candidates(cfg, len(target.devices)))
        candidates = [overrides for overrides, _, _ in placed[:request.compile_top]]
        if not candidates:
            raise ConfigError(
                f"no candidate fits on {target.name} by the analytic memory model; use more devices (a larger "
                "slice), a smaller data.batch_size or data.seq_len, or a smaller model"
            )
        with Progress(transient=True) as progress:
            task = progress.add_task(f"{target.name}: {len(candidates)} candidates", total=len(candidates))
            ranked = run_sweep(cfg, target, candidates, jobs=request.jobs, timeout_s=request.timeout_s,
                               progress=lambda c: progress.advance(task))
        fitting = [c for c in ranked if c.fits]
        if not fitting:
            raise ConfigError(
                f"no candidate fits on {target.name} ({len(ranked)} tried); use more devices (a larger slice), "
                "a smaller data.batch_size or data.seq_len, or a smaller model"
            )
        best = fitting[0]
        entry = {"best": best.overrides, "ranked": [asdict(c) for c in ranked]}
        if request.max_batch:
            batch_overrides = [o for o in best.overrides if not o.startswith("data.batch_size=")]
            entry["largest_global_batch"] = largest_batch(cfg, target, batch_overrides)
        results[target.name] = entry
        if not request.json:
            _print_sweep(target.name, ranked, entry)
    if request.json:
        print(jsonlib.dumps(results, indent=2, default=str))
    return 0


def _print_sweep(name: str, ranked, entry) -> None:
    from rich.console import Console
    from rich.table import Table

    predicted = any(c.compute_s is not None for c in ranked)
    basis = "predicted step time" if predicted else "step time at peak"
    table = Table(title=f"sweep on {name} (ranked by {basis}, then memory)")
    for col in ("rank", "candidate", "fits", "memory / device", basis, "compute", "exposed comm."):
        table.add_column(col)

    def ms(x):
        return "-" if x is None else f"{x * 1e3:,.1f} ms"

    for i, c in enumerate(ranked[:15], 1):
        memory = "-" if c.memory_bytes is None else f"{c.memory_bytes / 2**30:.2f} GiB"
        table.add_row(str(i), " ".join(c.overrides), "yes" if c.fits else (c.error or "no"), memory,
                      ms(c.step_time_s), ms(c.compute_s), ms(c.exposed_communication_s))
    console = Console()
    console.print(table)
    console.print(f"best plan for {name}, as a config overlay (or pass the overrides to tessera train):")
    console.print(yaml.safe_dump(overrides_tree(entry["best"]), sort_keys=False), markup=False)
    if "largest_global_batch" in entry:
        console.print(f"largest global batch that fits: {entry['largest_global_batch']}")


def _run_budget(request: PlanRequest, targets) -> int:
    import json as jsonlib

    from infra.plan import compute_optimal

    rows = []
    for target in targets:
        peak = target.peak("bfloat16") * len(target.devices)
        if request.chip_hours is not None:
            flops = request.chip_hours * 3600 * target.peak("bfloat16") * request.mfu
        else:
            flops = request.budget_flops
        plan = compute_optimal(flops, peak, request.mfu)
        rows.append({"target": target.name, "flops": plan.flops, "parameters": plan.parameters,
                     "tokens": plan.tokens, "days_on_target": plan.seconds_on_target / 86400})
    if request.json:
        print(jsonlib.dumps(rows, indent=2))
    else:
        for r in rows:
            print(
                f"{r['target']}: C={r['flops']:.3g} FLOPs -> compute-optimal N={r['parameters']:.3g} parameters, "
                f"D={r['tokens']:.3g} tokens (D = 20 N, C = 6 N D); {r['days_on_target']:.2f} days on "
                f"{r['target']} at {request.mfu:.0%} MFU"
            )
    return 0

"""How a plan is shown: a rich table, JSON, and a report.md with a memory chart (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

from infra.plan import TargetPlan

GIB = 2**30


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f} ms"


def top_op_lines(plan: TargetPlan, n: int = 8) -> list[str]:
    """The ops that take most of the predicted step, one line each."""
    if plan.predicted is None:
        return []
    total = plan.predicted.total_s
    return [f"{o.seconds * 1e3:9.2f} ms {o.seconds / total:6.1%}  x{o.count:<4d} {o.kind:<10s} {o.what} ({o.name})"
            for o in plan.predicted.top_ops[:n]]


def would_fit_lines(plan: TargetPlan) -> list[str]:
    return [f"{' '.join(c['overrides'])}: {c['analytic_memory_bytes'] / GIB:.2f} GiB, "
            f"{c['analytic_step_time_s'] * 1e3:,.1f} ms per step ({c['seconds_per_million_tokens']:.2f} s per million "
            "tokens)" for c in plan.would_fit]


def rows(plan: TargetPlan) -> list[tuple[str, str]]:
    xla, p = plan.xla_memory, plan.predicted
    fit = "yes" if plan.fits else "NO"
    if xla is None and plan.xla_required_temporaries:
        fit += f" (compiler: temporaries need {_gib(plan.xla_required_temporaries)})"
    days = f"{plan.days_for_budget:.1f} days for {plan.token_budget:.3g} tokens"
    return [
        ("mesh", " x ".join(f"{k}={v}" for k, v in plan.mesh.items())),
        ("precision", plan.precision),
        ("attention", plan.attention),
        ("parameters", f"{plan.parameters:,}"),
        ("  non-embedding", f"{plan.non_embedding_parameters:,}"),
        ("  active per token", f"{plan.active_parameters:,}"),
        ("KV cache / token (serving)", f"{plan.kv_cache_bytes_per_token / 1024:,.0f} KiB"),
        ("tokens per step", f"{plan.tokens_per_step:,}"),
        ("model FLOPs / step", _sci(plan.model_flops_per_step)),
        ("hardware FLOPs / step (analytic)", _sci(plan.hardware_flops_per_step)),
        ("hardware FLOPs / step (XLA)", _sci(plan.xla_flops_per_step)),
        ("FLOPs: analytic vs XLA (dense attention)", _pct(plan.flops_error)),
        ("TPU cost analysis FLOPs / step", _sci(plan.tpu_cost_flops_per_step)),
        ("memory / device (analytic)", _gib(plan.analytic_memory.total)),
        ("  parameters", _gib(plan.analytic_memory.parameters)),
        ("  optimizer moments and master copy", _gib(plan.analytic_memory.optimizer)),
        ("  gradient sums over microbatches", _gib(plan.analytic_memory.gradient_accumulator)),
        ("  activations and step buffers", _gib(plan.analytic_memory.saved_activations + plan.analytic_memory.peak_phase)),
        ("memory / device (XLA)", _gib(None if xla is None else xla.total)),
        ("  XLA arguments / outputs", "-" if xla is None else f"{_gib(xla.arguments)} / {_gib(xla.outputs)}"),
        ("  XLA temporaries / code", "-" if xla is None else f"{_gib(xla.temporaries)} / {_gib(xla.generated_code)}"),
        ("memory: analytic vs XLA", _pct(plan.memory_error)),
        ("device memory", _gib(plan.device_memory_bytes)),
        ("fits", fit),
        ("step time lower bound (peak)", _ms(plan.step_time_lower_bound_s)),
        ("step time (predicted)", _ms(None if p is None else p.total_s)),
        ("  compute", _ms(None if p is None else p.compute_s)),
        ("    at each op's roofline (lower bound)", _ms(None if p is None else p.roofline_compute_s)),
        ("    by the compiler's own per-op cycles", _ms(None if p is None else p.compiler_compute_s)),
        ("  exposed communication", _ms(None if p is None else p.exposed_communication_s)),
        ("  all collectives, hidden or not", _ms(None if p is None else p.communication_s)),
        ("predicted MFU", "-" if plan.predicted_mfu is None else f"{plan.predicted_mfu:.1%}"),
        ("step time (TPU cost analysis, by depth)", _ms(plan.xla_step_time_s)),
        (f"step time at {plan.assumed_mfu:.0%} MFU", _ms(plan.step_time_at_mfu_s)),
        ("tokens / s" + (" (predicted)" if p is not None else f" (at {plan.assumed_mfu:.0%} MFU)"),
         f"{plan.tokens_per_second:,.0f}"),
        ("tokens / s / device", f"{plan.tokens_per_second / plan.devices:,.0f}"),
        ("token budget", days),
    ]


def print_columns(title: str, targets: list[str], columns: list[list[tuple[str, str]]]):
    """A table with one column of (label, value) rows per target; returns the console it printed on."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    for target in targets:
        table.add_column(target, justify="right")
    for i, (label, _) in enumerate(columns[0]):
        table.add_row(label, *(c[i][1] for c in columns))
    console = Console()
    console.print(table)
    return console


def print_table(plans: list[TargetPlan]) -> None:
    console = print_columns("tessera plan", [p.target for p in plans], [rows(p) for p in plans])
    for plan in plans:
        for note in plan.notes:
            console.print(f"{plan.target}: {note}")
        if plan.would_fit:
            console.print(f"{plan.target}: does not fit; by the analytic models these would (confirm with --sweep):")
            for line in would_fit_lines(plan):
                console.print(f"  {line}", markup=False)
        if plan.predicted is not None:
            console.print(f"{plan.target}: top ops by predicted time (a loop's ops summed over its trips):")
            for line in top_op_lines(plan):
                console.print(f"  {line}", markup=False)


def as_json(plans: list[TargetPlan]) -> str:
    return json.dumps([p.to_json() for p in plans], indent=2)


def peak_terms(m) -> dict[str, int]:
    """The analytic terms that add up to the peak."""
    return {"parameters": m.parameters, "optimizer": m.optimizer, "gradient_accumulator": m.gradient_accumulator,
            "saved_activations": m.saved_activations, "peak_phase": m.peak_phase}


def memory_chart(plans: list[TargetPlan], path: Path) -> None:
    """Stacked analytic memory terms per target, the compiler's total, and the device's capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(plans), 4.5))
    xs = range(len(plans))
    bottom = [0.0] * len(plans)
    for term in peak_terms(plans[0].analytic_memory):
        values = [peak_terms(p.analytic_memory)[term] / GIB for p in plans]
        ax.bar(xs, values, bottom=bottom, label=term.replace("_", " "), width=0.5)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for x, p in zip(xs, plans, strict=True):
        ax.hlines(p.device_memory_bytes / GIB, x - 0.35, x + 0.35, colors="red", linestyles="--",
                  label="device memory")
        if p.xla_memory is not None:
            ax.plot([x], [p.xla_memory.total / GIB], marker="D", color="black", linestyle="none", label="XLA total")
        elif p.xla_required_temporaries:
            refused = p.analytic_memory.parameters + p.analytic_memory.optimizer + p.xla_required_temporaries
            ax.plot([x], [refused / GIB], marker="X", color="black", linestyle="none", label="XLA asked (refused)")
    ax.set_xticks(list(xs), [p.target for p in plans])
    ax.set_ylabel("GiB per device")
    ax.set_title("Memory per device")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one legend entry per kind of mark
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(plans: list[TargetPlan], config_text: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    memory_chart(plans, out / "memory.png")
    header = "| | " + " | ".join(p.target for p in plans) + " |"
    lines = [
        "# tessera plan",
        "",
        "Analytic figures are pure functions of the config (model/flops.py, model/memory.py, train/memory.py).",
        "XLA figures come from compiling the real train step ahead of time for each target.",
        "XLA counts a loop body once, so its FLOPs are extrapolated from compiles with 1 and 2 unrolled layers,",
        "of the whole step for one CPU device. The TPU compiler's own per-device count (x devices) is shown beside:",
        "it also counts once the loops it makes of collective matmuls, so it falls short on large meshes.",
        "Hardware FLOPs count attention as the target's implementation computes it (dense: the whole score matrix;",
        "a flash kernel: the key blocks it visits and its recomputed scores) and the remat recompute; the check",
        "against XLA is made on the dense step. Model FLOPs (the MFU numerator) count causal attention over the",
        "keys each query sees, (L+1)/2 on average.",
        "The predicted step time (TPU targets) reads the compiled step's own program: each op at its roofline (the",
        "larger of its FLOPs at peak and its HBM bytes at the chip's bandwidth) or the compiler's own cycle estimate",
        "for it if longer, each collective at ring cost over the links its chips span, overlapped as the compiler",
        "scheduled it (infra/step_time.py, infra/interconnect.py).",
        "",
        header,
        "|" + "---|" * (len(plans) + 1),
    ]
    columns = [rows(p) for p in plans]
    for i, (label, _) in enumerate(columns[0]):
        lines.append(f"| {label.strip()} | " + " | ".join(c[i][1] for c in columns) + " |")
    lines += ["", "![memory per device](memory.png)", ""]
    for plan in plans:
        lines += [f"- {plan.target}: {note}" for note in plan.notes]
        if plan.would_fit:
            lines += ["", f"Does not fit on {plan.target}; by the analytic models these would (confirm with --sweep):",
                      "", *[f"- `{line}`" for line in would_fit_lines(plan)]]
        if plan.predicted is not None:
            lines += ["", f"Top ops by predicted time on {plan.target}:", "", "```", *top_op_lines(plan), "```"]
    lines += ["", "## Config", "", "```yaml", config_text.rstrip(), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "plan.json").write_text(as_json(plans))
    return path

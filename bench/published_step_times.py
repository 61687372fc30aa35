"""Predicted step times against step times nobody here measured: MaxText's published TPU v5e runs.

MaxText's v5e table (MaxText/configs/v5e/README.md at AI-Hypercomputer/maxtext commit
76bd53b0f44caf989c88189afadeb1062f9254f0, measured with the code of e47fa1b5d377ee1043e663f1414024f4d0f12df0)
gives TFLOP/s per chip for 16B, 32B, 64B and 128B models on one v5e-256. That code counted
6 N tokens + 12 H L hd T^2 b per chip and step (attention not halved, remat not counted), so
its step time is that count over the published rate. Each case is configs/published/maxtext-v5e-*.yaml,
compiled for v5e-256 with the scripts' libtpu flags (LIBTPU_INIT_ARGS must be set before libtpu
loads: this script sets them when they are not), and its step predicted by infra/step_time.py.

    python bench/published_step_times.py                 # all four (about 6 minutes on 2 cores)
    python bench/published_step_times.py --cases 16b --json
"""

from __future__ import annotations

import argparse
import json
import os
import time

# The flags of MaxText's 16b/32b/64b/128b.sh, verbatim.
MAXTEXT_V5E_LIBTPU_FLAGS = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true "
    "--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true "
    "--xla_enable_async_all_gather=true"
)

# Published TFLOP/s per chip on 1x v5e-256, and the scripts' per-chip batch (sequences of 2048 tokens).
PUBLISHED = {"16b": (120.0, 6), "32b": (132.0, 4), "64b": (118.0, 2), "128b": (110.0, 1)}
SEQ = 2048


def maxtext_tflops_per_chip(cfg, per_chip_batch: int) -> float:
    """MaxText's count at the measuring commit: 6 N tokens + 12 heads layers head_dim T^2 b (no causal halving,
    no remat), N all parameters with the tied table once, per chip and step, in TFLOP."""
    from model.flops import param_counts

    m = cfg.model
    weights = 6 * param_counts(m).total * SEQ * per_chip_batch
    attention = 12 * m.n_heads * m.n_layers * m.dim_per_head * SEQ**2 * per_chip_batch
    return (weights + attention) / 1e12


def run_case(name: str) -> dict:
    from infra.plan import compile_for_plan, predict_step_time, target_mesh
    from infra.targets import tpu_target
    from train.recipes import load_config

    started = time.perf_counter()
    cfg = load_config(f"configs/published/maxtext-v5e-{name}.yaml")
    rate, per_chip = PUBLISHED[name]
    published = maxtext_tflops_per_chip(cfg, per_chip) / rate
    target = tpu_target("v5e-256")
    mesh = target_mesh(cfg, target)
    memory, required, compiled = compile_for_plan(cfg, mesh)
    predicted = predict_step_time(compiled, cfg, target, mesh)
    return {
        "case": name,
        "published_step_s": published,
        "predicted_step_s": None if predicted is None else predicted.total_s,
        "ratio": None if predicted is None else predicted.total_s / published,
        "roofline_compute_s": None if predicted is None else predicted.roofline_compute_s,
        "compiler_compute_s": None if predicted is None else predicted.compiler_compute_s,
        "exposed_communication_s": None if predicted is None else predicted.exposed_communication_s,
        "xla_memory_bytes": None if memory is None else memory.total,
        "compiler_asked_for_bytes": required,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("LIBTPU_INIT_ARGS", MAXTEXT_V5E_LIBTPU_FLAGS)
    rows = [run_case(name) for name in args.cases]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'case':>5} {'published':>10} {'predicted':>10} {'ratio':>6} {'roofline':>9} {'compiler':>9} {'exposed':>8}")
    for r in rows:
        if r["predicted_step_s"] is None:
            print(f"{r['case']:>5} {r['published_step_s']:9.2f}s  does not compile within HBM")
            continue
        print(f"{r['case']:>5} {r['published_step_s']:9.2f}s {r['predicted_step_s']:9.2f}s {r['ratio']:6.3f} "
              f"{r['roofline_compute_s']:8.2f}s {r['compiler_compute_s']:8.2f}s {r['exposed_communication_s']:7.2f}s")


if __name__ == "__main__":
    main()

"""The training loop against the bare compiled step: does the loop add time to a step?

    python bench/loop_overhead.py [--steps 60]

Times the d512 case of bench/train_throughput.py (d_model 512, 6 layers, seq 256, batch 16) as that
bench does (the compiled step looping on one batch already on the device), then runs the real loop on
the built-in corpus (data read and placed, metrics logged, the guard checked) and takes the median of
its logged step times, leaving out the first step and the last (evaluation and checkpoint).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import jax

from bench.train_throughput import CASES, measure
from infra.mesh import build_mesh, logical_rules
from infra.runtime import apply_platform_flags
from train.loop import train
from train.recipes import load_config


def loop_step_seconds(overrides: list[str], steps: int) -> list[float]:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, [*overrides, "mesh.data=-1", f"train.steps={steps}", "train.log_every=1",
                                 f"train.eval_every={steps}", "train.eval_batches=1", f"checkpoint.every={steps}",
                                 f"run.dir={run_dir}"])
        train(cfg, build_mesh(cfg), logical_rules(cfg))
        lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [m["step_time"] for m in lines if "step_time" in m][1:-1]


def main() -> None:
    apply_platform_flags()  # the CLI's XLA:CPU defaults, before jax starts its backend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    overrides = CASES["d512-l6-s256"]
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    bare = measure(overrides, args.steps, warmup=3)["step_seconds"]
    loop = statistics.median(loop_step_seconds(overrides, args.steps))
    print(json.dumps({"bare_step_seconds": round(bare, 4), "loop_median_step_seconds": round(loop, 4),
                      "loop_over_bare": round(loop / bare, 4)}))


if __name__ == "__main__":
    main()

"""What distillation buys on the built-in corpus: a teacher trained first, then the same small student
trained twice for the same steps on the same batches, once distilled from the teacher and once from
scratch. Reports the held-out bits per byte of all three (the same held-out rows for each).

    python bench/distill.py [--teacher-steps 400] [--student-steps 300] [--out runs/bench-distill]

Defaults: teacher 6 layers, d_model 384; student 2 layers, d_model 128; byte tokenizer, sequences
of 128, batches of 8, one CPU device; distillation with T=2, alpha=0.5, forward KL. A teacher
already trained in OUT/teacher (to at least --teacher-steps) is reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

from infra.mesh import build_mesh, logical_rules
from infra.runtime import apply_platform_flags
from train.recipes import load_config
from train.loop import train

DATA = ["data.seq_len=128", "data.batch_size=8", "mesh.data=1", "train.eval_batches=8", "optimizer.lr=2e-3",
        "optimizer.warmup_steps=30", "checkpoint.every=1000", "train.log_every=50"]
TEACHER = ["model.n_layers=6", "model.d_model=384", "model.n_heads=6", "model.d_ff=1536"]
STUDENT = ["model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.d_ff=512"]


def run(overrides: list[str], steps: int, run_dir: Path) -> dict:
    cfg = load_config(None, [*DATA, *overrides, f"train.steps={steps}", f"train.eval_every={steps}",
                             f"run.dir={run_dir}"])
    devices = jax.devices()[:1]
    start = time.perf_counter()
    result = train(cfg, build_mesh(cfg, devices), logical_rules(cfg))
    return {"bits_per_byte": result["eval_bits_per_byte"], "cross_entropy": result["eval_cross_entropy"],
            "steps": steps, "seconds": round(time.perf_counter() - start, 1), "run_dir": str(run_dir)}


def main() -> None:
    apply_platform_flags()  # the CLI's XLA:CPU defaults, before jax starts its backend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--out", default="runs/bench-distill")
    args = parser.parse_args()
    out = Path(args.out)
    teacher_dir = out / "teacher"
    results = {"teacher": run(TEACHER, args.teacher_steps, teacher_dir)}
    distill = [f"distill.teacher={teacher_dir}", f"distill.temperature={args.temperature}", f"distill.alpha={args.alpha}"]
    results["student_distilled"] = run([*STUDENT, *distill], args.student_steps, out / "student-distilled")
    results["student_scratch"] = run(STUDENT, args.student_steps, out / "student-scratch")
    print(json.dumps(results, indent=2))
    print(f"{'model':20s} {'steps':>6s} {'held-out bits/byte':>19s} {'seconds':>8s}")
    for name, r in results.items():
        print(f"{name:20s} {r['steps']:6d} {r['bits_per_byte']:19.4f} {r['seconds']:8.1f}")
    gain = results["student_scratch"]["bits_per_byte"] - results["student_distilled"]["bits_per_byte"]
    print(f"distillation: {gain:+.4f} bits/byte for the student at equal steps and tokens")


if __name__ == "__main__":
    main()

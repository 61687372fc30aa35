"""Training-step throughput and MFU against the float32 matmul peak measured in the same run.

    python bench/train_throughput.py [--steps 20] [--warmup 3]

Cases: the `tiny` preset, a d_model 512, 6-layer model at seq 256, and one MoE shape
run through both dispatch paths (dropless grouped matmul, capacity slots). MFU is model
FLOPs (6N-style over the parameters a token uses, plus causal attention, see
model/flops.py) per second over the peak: work the capacity path spends on empty slots
and one-hot dispatch is not credited. The batch is fixed and already on device, so this
measures the step, not the data.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from infra.hardware import measured_matmul_peak
from infra.mesh import build_mesh, logical_rules
from infra.runtime import apply_platform_flags
from model.flops import param_counts, train_flops_per_token
from train.recipes import load_config
from train.program import build_program

CASES = {
    "tiny": ["model=tiny"],
    "d512-l6-s256": [
        "model=tiny", "model.d_model=512", "model.n_layers=6", "model.n_heads=8", "model.n_kv_heads=8",
        "model.d_ff=2048", "data.seq_len=256", "data.batch_size=16",
    ],
}
MOE_SHAPE = [
    "model=tiny-moe", "model.d_model=256", "model.n_heads=4", "model.n_kv_heads=4", "model.d_ff=1024",
    "model.moe.d_expert=512", "model.moe.num_shared_experts=0", "model.moe.first_dense_layers=0",
    "data.seq_len=256", "data.batch_size=16",
]
CASES["moe-dropless"] = [*MOE_SHAPE, "model.moe.dispatch=dropless"]
CASES["moe-capacity"] = [*MOE_SHAPE, "model.moe.dispatch=capacity", "model.moe.capacity_factor=1.25"]


def random_batch(cfg) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    return {
        "inputs": rng.integers(0, 256, shape, dtype=np.int32),
        "targets": rng.integers(0, 256, shape, dtype=np.int32),
        "weights": np.ones(shape, np.float32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
    }


def measure(overrides: list[str], steps: int, warmup: int) -> dict[str, float]:
    cfg = load_config(None, [*overrides, "mesh.data=-1", f"train.steps={steps + warmup}"])
    program = build_program(cfg, build_mesh(cfg), logical_rules(cfg))
    state = program.init_state()
    batch = program.device_batch(random_batch(cfg))
    train_step = program.train_step.lower(state, batch).compile()
    for _ in range(warmup):
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return {
        "params": param_counts(cfg.model).total,
        "active_params": param_counts(cfg.model).active,
        "tokens_per_sec": tokens / seconds,
        "flops_per_sec": train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens / seconds,
        "step_seconds": seconds,
    }


def main() -> None:
    apply_platform_flags()  # the CLI's XLA:CPU defaults, before jax starts its backend
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: all cases")
    args = parser.parse_args()
    peak = measured_matmul_peak()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; float32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    for name in args.case or CASES:
        r = measure(CASES[name], args.steps, args.warmup)
        print(
            f"{name:>14}: {r['params'] / 1e6:6.2f}M params ({r['active_params'] / 1e6:.2f}M active) | "
            f"{r['tokens_per_sec']:9.0f} tokens/s | "
            f"{r['flops_per_sec'] / 1e9:6.1f} GFLOP/s model | MFU {r['flops_per_sec'] / peak:6.1%} | "
            f"{r['step_seconds'] * 1e3:7.1f} ms/step"
        )


if __name__ == "__main__":
    main()

"""Attention implementations against each other on this machine: forward and backward time of one causal
attention (d_model 512: 8 heads of 64, batch 1, float32, two documents per row) at each length, and the
compiled program's temporary memory, which shows dense's length^2 scores against blockwise's blocks.

    python bench/attention.py --lengths 256 512 1024 2048 4096 8192

The crossover it finds is model/attention/kernels.py's CPU_BLOCKWISE_FROM.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from infra.runtime import apply_platform_flags
from model.attention.kernels import attend
from model.attention.mask import AttentionMask


def measure(impl: str, length: int, heads: int, head_dim: int, block: int, repeats: int) -> dict:
    key = jax.random.key(0)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (1, length, heads, head_dim)) for i in range(3))
    segments = (jnp.arange(length) >= length // 3).astype(jnp.int32)[None] + 1

    def loss(q, k, v):
        mask = AttentionMask(segments, segments, causal=True)
        return jnp.sum(attend(q, k, v, mask, choice=impl, block=block) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    memory = compiled.memory_analysis()
    return {"impl": impl, "length": length, "seconds": min(times),
            "temporary_mib": round(memory.temp_size_in_bytes / 2**20, 1)}


def main() -> None:
    apply_platform_flags()  # the CLI's XLA:CPU defaults, before jax starts its backend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--impl", nargs="+", default=["dense", "blockwise"])
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"devices: {jax.devices()[0].platform} x{jax.device_count()}")
    for length in args.lengths:
        rows = [measure(impl, length, 8, 64, args.block, args.repeats) for impl in args.impl]
        for row in rows:
            print(json.dumps(row))
        if len(rows) == 2:
            print(json.dumps({"length": length, f"{rows[0]['impl']}/{rows[1]['impl']} time":
                              round(rows[0]["seconds"] / rows[1]["seconds"], 2)}))


if __name__ == "__main__":
    main()

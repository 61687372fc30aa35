"""Facts about the local accelerator that must be measured rather than looked up."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def measured_matmul_peak(dtype=jnp.float32, sizes=(512, 1024, 2048), repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul on the default device: the denominator for MFU on CPU.

    Each size is compiled and warmed up, then timed over `repeats` calls; the best
    (size, repeat) wins, as the peak is what the hardware can reach, not an average.
    """
    best = 0.0
    matmul = jax.jit(jnp.matmul)
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        b = jnp.ones((n, n), dtype)
        matmul(a, b).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best

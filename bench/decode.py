"""Prefill and decode throughput of the KV-cache decoder, and its speed-up over recomputing the
whole sequence for every new token.

    python bench/decode.py [--preset tiny] [--prompt 512] [--new 64] [--repeats 3]

For batch 1 and 8: prefill tokens/s (prompt tokens through one forward), decode tokens/s
(new tokens from the compiled while-loop, prefill time subtracted), and the time per new
token of a compiled loop that instead reruns the full forward over a fixed-length buffer
(prompt + new tokens, right-padded, greedy) at the same context. Weights are random: speed
does not depend on them. Greedy decoding, one device.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infra.runtime import apply_platform_flags
from model.generate import generate, prefill
from model.sampling import Sampling
from model.transformer import Transformer
from train.recipes import load_config


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure(preset: str, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    exp = load_config(None, [f"model={preset}", f"model.max_seq_len={prompt_len + new}"])
    graphdef, params = nnx.split(Transformer(exp.model, nnx.Rngs(0), exp.precision.policy.model))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    greedy = Sampling(jnp.zeros(batch), jnp.zeros(batch, jnp.int32), jnp.ones(batch))
    keys = jax.random.split(jax.random.key(0), batch)

    @jax.jit
    def prefill_only(params):
        return prefill(nnx.merge(graphdef, params), prompt, lengths, prompt_len + new)[0]

    @jax.jit
    def kv_generate(params):
        # No eos ids: never stops early, so exactly `new` tokens are decoded.
        return generate(nnx.merge(graphdef, params), prompt, lengths, keys, greedy, max_new_tokens=new,
                        eos_ids=(), pad_id=0).tokens

    @jax.jit
    def recompute_generate(params):
        model = nnx.merge(graphdef, params)
        buffer = jnp.zeros((batch, prompt_len + new), jnp.int32).at[:, :prompt_len].set(prompt)

        def step(i, buffer):
            logits = model(buffer)  # the whole sequence again, for one new token
            token = jnp.argmax(logits[:, prompt_len + i - 1], axis=-1).astype(jnp.int32)
            return buffer.at[:, prompt_len + i].set(token)

        return jax.lax.fori_loop(0, new, step, buffer)

    t_prefill = best_time(lambda: prefill_only(params), repeats)
    t_kv = best_time(lambda: kv_generate(params), repeats)
    t_recompute = best_time(lambda: recompute_generate(params), repeats)
    decode_s = max(t_kv - t_prefill, 1e-9)
    return {
        "preset": preset, "batch": batch, "prompt": prompt_len, "new_tokens": new,
        "prefill_tokens_per_s": batch * prompt_len / t_prefill,
        "decode_tokens_per_s": batch * new / decode_s,
        "recompute_tokens_per_s": batch * new / t_recompute,
        "kv_cache_speedup": t_recompute / decode_s,
    }


def main() -> None:
    apply_platform_flags()  # the CLI's XLA:CPU defaults, before jax starts its backend
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (the context of the comparison)")
    parser.add_argument("--new", type=int, default=64, help="tokens to decode")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"devices: {jax.devices()[0].device_kind} x1")
    for batch in (1, 8):
        print(json.dumps(measure(args.preset, batch, args.prompt, args.new, args.repeats)))


if __name__ == "__main__":
    main()

"""Rollouts for reinforcement learning: the policy samples completions of a batch of prompts with the compiled
KV-cache decode loop (model/generate.py) on the training mesh, and each (prompt, completion) becomes one row
that the scoring pass and the updates read.

The decode program takes the training state's parameters as they are, sharded by the training rules: with
FSDP the partitioner gathers each layer's weights inside the loop, as the training forward pass does, so no
second copy of the model is kept for sampling. A row is `seq_len` tokens: the prompt left-padded to
`seq_len - max_new_tokens` columns, then the completion (padding after its end token). Positions and
segment ids make the training forward see exactly what generation saw (left padding masked out, positions
counted from the prompt's first token); `weights` mark the targets that are completion tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.generate import STOPPED_EOS, generate
from model.sampling import Sampling
from train.data.prompts import Prompt
from train.generation import allowed_token_mask
from train.sharding import Rules, activation_rules, batch_shards, batch_sharding, replicated
from train.tokenizer import Tokenizer

ROLLOUT_STREAM = 7  # folded into the state's key: the rollout's randomness, apart from the updates'


def global_array(sharding: NamedSharding, value: np.ndarray) -> jax.Array:
    """A global array from a host array every process holds whole (each process places its devices' parts)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


@dataclass
class Rollout:
    """One batch of sampled completions as host arrays, rows grouped by prompt."""

    rows: dict[str, np.ndarray]  # inputs, targets, positions, segment_ids, weights: [rows, seq_len]
    sampled_logp: np.ndarray  # [rows, seq_len] the sampler's log-prob of each target (0 off the completion)
    completions: list[list[int]]  # each completion's tokens (its end token included)
    ended: np.ndarray  # [rows] bool: stopped at an end token (not cut off at max_new_tokens)
    seconds: float  # wall time of the sampling

    @property
    def generated_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def rollout_rows(prompts: list[np.ndarray], tokens: np.ndarray, lengths: np.ndarray, seq_len: int, pad_id: int):
    """Rows [n, seq_len] from the prompts' tokens and the completions [n, T] (their real lengths)."""
    n, new = tokens.shape
    width = seq_len - new
    full = np.full((n, seq_len), pad_id, np.int32)
    start = np.array([width - len(p) for p in prompts])
    for i, p in enumerate(prompts):
        full[i, start[i]:width] = p
    full[:, width:] = tokens
    column = np.arange(seq_len)[None, :]
    targets = np.concatenate([full[:, 1:], np.full((n, 1), pad_id, np.int32)], axis=1)
    return {
        "inputs": full,
        "targets": targets,
        "positions": np.maximum(column - start[:, None], 0).astype(np.int32),
        "segment_ids": ((column >= start[:, None]) & (column < width + lengths[:, None])).astype(np.int32),
        "weights": ((column >= width - 1) & (column < width - 1 + lengths[:, None])).astype(np.float32),
    }


class RolloutSampler:
    """The compiled sampling program of one policy on one mesh, for rows of `seq_len` with `max_new_tokens`."""

    def __init__(self, model_cfg: ModelConfig, graphdef: nnx.GraphDef, param_shardings, tokenizer: Tokenizer,
                 mesh: Mesh, rules: Rules, *, seq_len: int, max_new_tokens: int, temperature: float):
        self.tokenizer, self.seq_len, self.new, self.temperature = tokenizer, seq_len, max_new_tokens, temperature
        rows = batch_sharding(mesh, rules)
        self.rows, self.rows1 = rows, NamedSharding(mesh, PartitionSpec(rows.spec[0]))
        self.row_multiple = batch_shards(mesh, rules)
        self.allowed = allowed_token_mask(model_cfg, tokenizer)

        def sample(params, prompt, prompt_len, keys, active, allowed):
            with activation_rules(mesh, rules):
                n = prompt.shape[0]
                settings = Sampling(jnp.full(n, temperature, jnp.float32), jnp.zeros(n, jnp.int32),
                                    jnp.ones(n, jnp.float32))
                return generate(nnx.merge(graphdef, params), prompt, prompt_len, jax.random.wrap_key_data(keys),
                                settings, max_new_tokens=max_new_tokens, eos_ids=tokenizer.stop_ids,
                                pad_id=tokenizer.pad_id, active=active, allowed_tokens=allowed,
                                sampled_logprobs=True)

        self._sample = jax.jit(sample, in_shardings=(param_shardings, rows, self.rows1, rows, self.rows1, None),
                               out_shardings=replicated(mesh))

    def sample(self, params, prompts: list[Prompt], key_data: np.ndarray) -> Rollout:
        """Completions of `prompts` (one row each), row i drawing from key_data[i]."""
        t0 = time.perf_counter()
        n = -(-len(prompts) // self.row_multiple) * self.row_multiple  # filler rows start stopped
        width = self.seq_len - self.new
        prompt = np.full((n, width), self.tokenizer.pad_id, np.int32)
        lengths = np.ones(n, np.int32)
        for i, p in enumerate(prompts):
            prompt[i, width - len(p.tokens):] = p.tokens
            lengths[i] = len(p.tokens)
        keys = np.concatenate([key_data, np.repeat(key_data[-1:], n - len(prompts), axis=0)])
        active = np.arange(n) < len(prompts)
        out = jax.device_get(self._sample(
            params, global_array(self.rows, prompt), global_array(self.rows1, lengths), global_array(self.rows, keys),
            global_array(self.rows1, active), self.allowed))
        count = len(prompts)
        tokens, new_lengths = out.tokens[:count], out.lengths[:count]
        rows = rollout_rows([p.tokens for p in prompts], tokens, new_lengths, self.seq_len, self.tokenizer.pad_id)
        sampled = np.zeros((count, self.seq_len), np.float32)
        sampled[:, width - 1:width - 1 + self.new] = out.logprobs[:count]
        return Rollout(rows, sampled, [tokens[i, :new_lengths[i]].tolist() for i in range(count)],
                       out.stop_reason[:count] == STOPPED_EOS, time.perf_counter() - t0)

    def lower(self, params, rows: int):
        """The sampling program lowered for `rows` rows on abstract parameters (a plan compiles it for a target)."""
        width = self.seq_len - self.new
        return self._sample.lower(
            params, jax.ShapeDtypeStruct((rows, width), np.int32, sharding=self.rows),
            jax.ShapeDtypeStruct((rows,), np.int32, sharding=self.rows1),
            jax.ShapeDtypeStruct((rows, 2), np.uint32, sharding=self.rows),
            jax.ShapeDtypeStruct((rows,), bool, sharding=self.rows1), self.allowed)

    def text(self, tokens: list[int]) -> str:
        """A completion as text, without its end token."""
        return self.tokenizer.decode([t for t in tokens if t not in self.tokenizer.stop_ids])


def rollout_keys(rng: jax.Array, rows: int) -> np.ndarray:
    """Key data [rows, 2] for this step's rollout, from the training state's key (so a resume samples alike)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), ROLLOUT_STREAM)
    return np.asarray(jax.device_get(jax.random.key_data(jax.random.split(key, rows))))

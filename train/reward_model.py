"""A trained reward model as a score function: (prompt, completion) -> its scalar score, read at the end token
appended to the completion, as it was trained (train/objectives/pairwise.py). Best-of-N sampling ranks by it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from train.config import ConfigError
from train.inference import TrainedRun
from train.sharding import activation_rules, batch_shards, batch_sharding, replicated


class RewardScorer:
    def __init__(self, run: TrainedRun, mesh, rules, chat: bool = False):
        if not run.cfg.model.score_head:
            raise ConfigError(f"{run.run_dir} is not a reward model (no score head); train one with "
                              "train.objective=reward")
        self.run = run
        self.template = None
        if chat:
            from train.data.chat import ChatTemplate

            self.template = ChatTemplate(run.tokenizer, str(run.run_dir))
        self.width = run.cfg.data.seq_len
        graphdef = run.model.graphdef

        def score(params, tokens, end):
            with activation_rules(mesh, rules):
                model = nnx.merge(graphdef, params)
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                x, _, _ = model.hidden(tokens, positions, (positions <= end[:, None]).astype(jnp.int32))
                return model.scores(x, end)

        rows = batch_sharding(mesh, rules)
        self.row_multiple = batch_shards(mesh, rules)
        self._score = jax.jit(score, in_shardings=(None, rows, NamedSharding(mesh, PartitionSpec(rows.spec[0]))),
                              out_shardings=replicated(mesh))

    def tokens(self, prompt: str, completion: str) -> np.ndarray:
        """The pair's tokens as the reward model was trained on them, ending with the end token."""
        tokenizer = self.run.tokenizer
        if self.template is not None:
            return self.template.encode([{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": completion}])[0]
        return np.append(tokenizer.encode(prompt + completion), np.int32(tokenizer.eod_id)).astype(np.int32)

    def __call__(self, prompt: str, completion: str) -> float:
        return float(self.batch([prompt], [completion])[0])

    def batch(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """The scores [n] of n (prompt, completion) pairs, in one call (rows padded to the batch shards)."""
        n = len(prompts)
        rows = -(-n // self.row_multiple) * self.row_multiple
        tokens = np.full((rows, self.width), self.run.tokenizer.pad_id, np.int32)
        ends = np.zeros(rows, np.int32)
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            ids = self.tokens(prompt, completion)[-self.width:]  # the end of a long response is what the score sees
            tokens[i, : len(ids)], ends[i] = ids, len(ids) - 1
        return np.asarray(self._score(self.run.params, tokens, ends))[:n]

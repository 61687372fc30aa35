"""Masked-token prediction (encoders, BERT): each row starts with <cls>; the targets are the row's own
tokens. Every step draws a fresh selection inside the jitted step from the state's key: each ordinary
token is selected with probability `select_rate` (special tokens and padding never are); of the
selected, 80% become <mask>, 10% a random ordinary token, 10% stay. The loss covers the selected
positions only."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # of the selected tokens; the remaining 10% are kept


@dataclass(frozen=True)
class MaskedTokens:
    mask_id: int
    cls_id: int
    special_ids: tuple[int, ...]  # never selected, never drawn as a random replacement
    vocab_size: int  # the tokenizer's: random replacements are drawn below it
    select_rate: float = 0.15
    name = "masked_tokens"
    pairwise = False

    @property
    def ordinary_ids(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.vocab_size), np.array(self.special_ids, dtype=np.int64)).astype(np.int32)

    def rows(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Causal rows -> encoder rows: <cls> first, targets are the inputs, weights mark selectable tokens."""
        inputs = rows["inputs"].copy()
        inputs[:, 0] = self.cls_id
        selectable = (rows["segment_ids"] > 0) & ~np.isin(inputs, self.special_ids)
        return {**rows, "inputs": inputs, "targets": inputs.copy(), "weights": selectable.astype(np.float32)}

    def prepare(self, batch, key):
        """Draw this step's selection and corrupt the inputs; weights become the selection."""
        select_key, action_key, token_key = jax.random.split(key, 3)
        shape = batch["inputs"].shape
        selected = (batch["weights"] > 0) & (jax.random.uniform(select_key, shape) < self.select_rate)
        action = jax.random.uniform(action_key, shape)
        ordinary = jnp.asarray(self.ordinary_ids)
        random_tokens = ordinary[jax.random.randint(token_key, shape, 0, len(ordinary))]
        inputs = jnp.where(selected & (action < MASK_FRACTION), self.mask_id, batch["inputs"])
        inputs = jnp.where(
            selected & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION), random_tokens, inputs
        )
        return {**batch, "inputs": inputs, "weights": selected.astype(jnp.float32)}

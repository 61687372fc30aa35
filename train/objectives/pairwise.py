"""Objectives over preference pairs: a batch row holds the chosen and the rejected response ([2, length] per
field, train/data/reader.py's PairStream), both run through the model in one forward pass.

- reward: a reward model's score head read at each response's end token, Bradley-Terry loss;
- preference: the policy's summed log-probs of each response's tokens against a frozen reference's (DPO,
  IPO, hinge) or alone (SimPO).

`per_pair` turns the per-pair numbers into the loss and the metrics; train/pairs.py computes the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from train.config import PreferenceConfig, RewardConfig
from train.objectives.preference import bradley_terry, preference_loss


def _rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rows


def preferred(margin) -> jnp.ndarray:
    """1 where the chosen response wins, 0 where it loses, 1/2 for a tie (an untrained, zero score head)."""
    return jnp.where(margin > 0, 1.0, jnp.where(margin < 0, 0.0, 0.5))


@dataclass(frozen=True)
class RewardModel:
    cfg: RewardConfig
    name = "reward"
    pairwise = True
    needs_reference = False
    rows = staticmethod(_rows)

    def prepare(self, batch, key):
        return batch

    def per_pair(self, chosen, rejected, **_) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """(loss [pairs], metrics [pairs] each) from the two responses' scores."""
        margin = chosen - rejected
        loss = bradley_terry(chosen, rejected, self.cfg.margin, self.cfg.centering)
        return loss, {"accuracy": preferred(margin), "score_margin": margin, "score_chosen": chosen,
                      "score_rejected": rejected}


@dataclass(frozen=True)
class Preference:
    cfg: PreferenceConfig
    name = "preference"
    pairwise = True
    rows = staticmethod(_rows)

    @property
    def needs_reference(self) -> bool:
        return self.cfg.loss != "simpo"

    def prepare(self, batch, key):
        return batch

    def per_pair(self, chosen, rejected, ref_chosen=None, ref_rejected=None, chosen_tokens=None,
                 rejected_tokens=None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """(loss [pairs], metrics [pairs] each) from the responses' summed log-probs (the policy's, the
        reference's) and token counts. The implicit rewards are β·(π - ρ) (SimPO: β·π/|y|)."""
        c = self.cfg
        loss = preference_loss(c.loss, chosen, rejected, ref_chosen, ref_rejected, beta=c.beta,
                               label_smoothing=c.label_smoothing, simpo_gamma=c.simpo_gamma,
                               chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
        if c.loss == "simpo":
            reward_c, reward_r = c.beta * chosen / chosen_tokens, c.beta * rejected / rejected_tokens
        else:
            reward_c, reward_r = c.beta * (chosen - ref_chosen), c.beta * (rejected - ref_rejected)
        margin = reward_c - reward_r
        return loss, {"accuracy": preferred(margin), "reward_margin": margin, "reward_chosen": reward_c,
                      "reward_rejected": reward_r, "logp_chosen": chosen, "logp_rejected": rejected}

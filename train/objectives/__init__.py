"""Training objectives: which tokens the model predicts, from what input, and the losses.

An objective has a host half (`rows`, numpy, in the data pipeline) and a device half
(`prepare`, jax, in the step), so data layout and randomness each live in one place:
- next_token: decoders predict each next token (`next_token.py`);
- masked_tokens: encoders predict masked tokens of their own input (`masked.py`);
- reward, preference: pairs of responses, a reward model's scores or a policy's log-probs (`pairwise.py`);
- contrastive: image-text pairs of a dual encoder, every other pair of the batch a negative (`contrastive.py`).

The losses are pure functions beside them: token cross entropy (`cross_entropy.py`) and
knowledge distillation (`distillation.py`), Bradley-Terry and the DPO family (`preference.py`); the train
step assembles them.
"""

from __future__ import annotations

from train.config import ConfigError, ExperimentConfig
from train.objectives.contrastive import Contrastive
from train.objectives.masked import MaskedTokens
from train.objectives.next_token import NextToken
from train.objectives.pairwise import Preference, RewardModel
from train.tokenizer import Tokenizer, load_tokenizer

Objective = NextToken | MaskedTokens | RewardModel | Preference | Contrastive


def make_objective(cfg: ExperimentConfig, tokenizer: Tokenizer | None = None) -> Objective:
    """The experiment's objective, checked against its tokenizer (loaded if not given) before anything compiles."""
    if cfg.objective == "next_token":
        return NextToken()
    if cfg.objective == "reward":
        return RewardModel(cfg.reward)
    if cfg.objective == "preference":
        return Preference(cfg.preference)
    if cfg.objective == "contrastive":
        return Contrastive(cfg.model.clip.loss)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    missing = [t for t in ("<mask>", "<cls>") if t not in tokenizer.special]
    if missing:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer!r} has no {' or '.join(missing)} token, which masked-token training "
            "needs; use 'byte' or a tokenizer.json made by `tessera tokenizer train` (it adds <mask> <cls> <sep> <pad>)"
        )
    return MaskedTokens(
        mask_id=tokenizer.special["<mask>"],
        cls_id=tokenizer.special["<cls>"],
        special_ids=tuple(sorted(set(tokenizer.special.values()) | {tokenizer.eod_id, tokenizer.pad_id})),
        vocab_size=tokenizer.vocab_size,
        select_rate=cfg.train.mask_select_rate,
    )

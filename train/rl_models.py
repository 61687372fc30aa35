"""The models of an RL run on one mesh: the policy's program (its state, optimizer, shardings), a PPO value
model with its own optimizer inside the same state (under "value"), the frozen reference, and the compiled
scoring and update programs (train/rl_step.py). Every model shards by the same logical-axis rules.

The policy's optimizer counts updates: an RL step makes rl.epochs x rl.minibatches of them, so the
learning-rate schedule (warm-up included) runs over train.steps x that many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from model.config import ModelConfig
from model.transformer import Transformer
from train.config import ConfigError, ExperimentConfig
from train.data.prepare import tokenizer_identity
from train.generation import allowed_token_mask
from train.inference import params_of_run, run_config
from train.objectives.next_token import NextToken
from train.program import TrainProgram, build_program
from train.rl_step import RlPrograms, compile_rl, reference_kind
from train.sharding import Rules
from train.state import State
from train.tokenizer import Tokenizer

VALUE_KEYS = ("params", "opt_state", "master")  # what the value model keeps in the state


def updates_per_step(cfg: ExperimentConfig) -> int:
    return cfg.rl.epochs * cfg.rl.minibatches


def update_config(cfg: ExperimentConfig, model: ModelConfig | None = None) -> ExperimentConfig:
    """The config of one update: a minibatch of rollout rows, and the schedule counted in updates."""
    rows = cfg.data.batch_size * cfg.rl.group_size // cfg.rl.minibatches
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"batch_size": rows}),
        "train": cfg.train.model_copy(update={"steps": cfg.train.steps * updates_per_step(cfg)}),
        **({"model": model} if model is not None else {}),
    })


def fresh_params(cfg: ExperimentConfig, shardings, seed: int):
    """The parameters a fresh state of this model starts from (train/state.py's init_state draws the same)."""
    def build():
        return nnx.to_pure_dict(nnx.split(Transformer(cfg.model, nnx.Rngs(params=seed), cfg.precision.policy.model))[1])

    return jax.jit(build, out_shardings=shardings)()


def value_source(cfg: ExperimentConfig) -> str | None:
    return cfg.rl.value_from or cfg.rl.reward_model if cfg.rl.algorithm == "ppo" else None


def value_model_config(cfg: ExperimentConfig) -> ModelConfig:
    """A reward-model run's model when the value model starts from one, else the policy's with a score head."""
    source = value_source(cfg)
    if source is not None:
        source_cfg = run_config(source)
        if tokenizer_identity(source_cfg.data.tokenizer) != tokenizer_identity(cfg.data.tokenizer):
            raise ConfigError(f"rl.value_from={source} was trained with tokenizer {source_cfg.data.tokenizer!r}, the "
                              f"policy uses {cfg.data.tokenizer!r}; the value model must read the policy's tokens")
        model = source_cfg.model
        if not model.score_head:
            raise ConfigError(f"rl.value_from={source} is not a reward model (no score head); give a run trained "
                              "with train.objective=reward, or leave it out to start from the policy")
        return model
    return cfg.model.model_copy(update={"score_head": True, "lora": None})


@dataclass
class RlModels:
    cfg: ExperimentConfig
    policy: TrainProgram
    value: TrainProgram | None
    reference: Any  # frozen parameters on the mesh, or None (the LoRA base, or no KL)
    programs: RlPrograms
    shardings: State

    def abstract_state(self) -> State:
        state = self.policy.abstract_state()
        if self.value is not None:
            state["value"] = {k: v for k, v in self.value.abstract_state().items() if k in VALUE_KEYS}
        return state

    def init_state(self) -> State:
        """Step 0: the policy from train.init_from (or fresh from the seed); the value model from its source."""
        cfg = self.cfg
        start = None
        if cfg.train.init_from:
            start = params_of_run(cfg.train.init_from, cfg.model, self.policy.abstract_state()["params"])
        state = self.policy.init_state(start)
        if self.value is not None:
            source = value_source(cfg) or cfg.train.init_from
            abstract = self.value.abstract_state()["params"]
            params = params_of_run(source, self.value.cfg.model, abstract) if source else None
            state["value"] = {k: v for k, v in self.value.init_state(params).items() if k in VALUE_KEYS}
        return state


def build_rl_models(cfg: ExperimentConfig, mesh: Mesh, rules: Rules, tokenizer: Tokenizer,
                    load_reference: bool = True) -> RlModels:
    """The models and compiled programs; `load_reference=False` leaves the frozen reference unread (a plan
    compiles ahead of time and holds no arrays)."""
    policy = build_program(update_config(cfg), mesh, rules, NextToken())
    value = None
    if cfg.rl.algorithm == "ppo":
        value = build_program(update_config(cfg, value_model_config(cfg)), mesh, rules, NextToken())
    kind = reference_kind(cfg)
    reference = None
    if kind == "params" and load_reference:
        abstract = policy.abstract_state()["params"]
        reference = (params_of_run(cfg.train.init_from, cfg.model, abstract) if cfg.train.init_from
                     else fresh_params(cfg, policy.shardings["params"], cfg.run.seed))
    shardings = dict(policy.shardings)
    if value is not None:
        shardings["value"] = {k: v for k, v in value.shardings.items() if k in VALUE_KEYS}
    programs = compile_rl(
        cfg, policy.model.graphdef, value.model.graphdef if value else None, policy.tx, value.tx if value else None,
        policy.schedule, mesh=mesh, rules=rules, trainable=policy.model.trainable,
        allowed=allowed_token_mask(cfg.model, tokenizer), state_shardings=shardings,
        reference_shardings=policy.shardings["params"] if kind == "params" else None,
        value_shardings=shardings["value"]["params"] if value else None)
    return RlModels(cfg, policy, value, reference, programs, shardings)

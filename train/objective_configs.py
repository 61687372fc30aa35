"""The config sections of objectives beyond plain next-token training: distillation, the reward model and
preference finetuning (train/config.py places them in the experiment schema), and the rules of a dual
encoder's contrastive training."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A config section: every key known (a typo is refused), values fixed once loaded. The experiment schema's
    sections (train/config.py) derive from it too."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DistillConfig(Section):
    """Knowledge distillation: loss = alpha * T^2 * KL + (1 - alpha) * cross entropy with the data."""

    teacher: str = Field(description="the teacher's run directory (its config.yaml and checkpoints)")
    temperature: float = Field(2.0, gt=0, description="T: both distributions are softened by it")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term")
    kl: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(teacher || student), mass-covering; reverse: KL(student || teacher)"
    )
    teacher_topk: str | None = Field(
        None, description="a directory of the teacher's top-K log-probs (`tessera distill --dump-teacher-topk K`); "
        "null runs the teacher alongside the student"
    )


class RewardConfig(Section):
    """The reward model's Bradley-Terry loss: -log σ(r_chosen - r_rejected - margin) + centering·(r_c + r_r)²."""

    margin: float = Field(0.0, ge=0, description="how far the chosen score must lead before the loss lets go")
    centering: float = Field(0.0, ge=0, description="pulls the scores towards 0 (their scale is otherwise free)")


class PreferenceConfig(Section):
    """Preference finetuning (train/objectives/preference.py): the loss and its constants."""

    loss: Literal["dpo", "ipo", "hinge", "simpo"] = Field(
        "dpo", description="dpo (sigmoid), ipo (squared), hinge, or simpo (no reference model, length-normalised)"
    )
    beta: float = Field(0.1, gt=0, description="β: how far the policy may move from the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: the share of pairs assumed mislabelled")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin γ")


class RlConfig(Section):
    """Reinforcement learning from rewards (`tessera rl`): each step samples `group_size` completions for each of
    data.batch_size prompts with the current policy, scores them, and makes `epochs` x `minibatches` clipped
    policy-gradient updates on them (train/objectives/rl.py). data.seq_len is a rollout row: prompt and
    completion together."""

    algorithm: Literal["grpo", "ppo"] = Field("grpo", description="grpo: group-normalised rewards, no critic; "
                                              "ppo: a value model and GAE")
    prompts: str = Field("synth:upper,sort", description="a JSONL file of prompts (`prompt`: a string or chat "
                         "messages; `answer` optional), or synth:TASKS for the shipped generators")
    chat: bool = Field(True, description="wrap each prompt in the tokenizer's chat template (as SFT trained it)")
    heldout_prompts: int = Field(16, ge=0, description="prompts kept apart and sampled at each evaluation")
    group_size: int = Field(8, ge=1, description="G: completions sampled per prompt")
    max_new_tokens: int = Field(32, ge=1, description="a completion's length limit; prompts get the rest of seq_len")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the ratio and KL use the same "
                               "distribution")
    rewards: list[str] = Field(default_factory=list, description="reward functions, summed: [W*]NAME[:ARG] with "
                               "NAME one of regex, count, length, eos, answer, rm, an entry point of the "
                               "tessera.rewards group, or module:function")
    reward_model: str | None = Field(None, description="a reward-model run directory: adds rm:RUN to the rewards "
                                     "(and, for ppo, starts the value model from it)")
    max_reward_error_rate: float = Field(0.1, ge=0, le=1, description="share of groups whose reward failed above "
                                         "which the run stops (exit 3, after a checkpoint)")
    epochs: int = Field(1, ge=1, description="μ: passes over each step's rollouts")
    minibatches: int = Field(1, ge=1, description="optimizer updates per pass, each on that share of the rollouts")
    clip_low: float = Field(0.2, ge=0, lt=1, description="ε_low: the ratio's lower clip is 1 - ε_low")
    clip_high: float = Field(0.28, ge=0, description="ε_high: the ratio's upper clip is 1 + ε_high")
    kl_coef: float = Field(0.04, ge=0, description="β: weight of the KL to the reference (0: no reference pass)")
    track_kl: bool = Field(False, description="measure the KL to the reference even at kl_coef=0 (a reference pass "
                           "per step)")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="the per-token KL estimate")
    kl_in: Literal["loss", "reward"] | None = Field(None, description="grpo: the KL term in the loss (default) or "
                                                    "subtracted from the reward; ppo: always the reward")
    scale_rewards: bool = Field(True, description="grpo: divide by the group's std (false: centre only)")
    std_eps: float = Field(1e-4, gt=0, description="grpo: added to the group's std")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: GAE λ")
    value_clip: float = Field(0.2, gt=0, description="ppo: how far a value may move from the rollout's")
    value_from: str | None = Field(None, description="ppo: a reward-model run to start the value model from "
                                   "(default: rl.reward_model, else the policy with a fresh score head)")

    @model_validator(mode="after")
    def _check(self) -> "RlConfig":
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ValueError(f"rl.group_size={self.group_size}: GRPO compares the completions of one prompt with each "
                             "other; sample at least 2 per prompt (or use rl.algorithm=ppo)")
        if self.algorithm == "ppo" and self.kl_in == "loss":
            raise ValueError("rl.kl_in=loss: PPO puts the KL in the per-token reward; drop rl.kl_in")
        return self

    def check_experiment(self, cfg) -> None:
        """The rules that tie this section to the rest of the experiment (train/config.py calls it)."""
        rows = cfg.data.batch_size * self.group_size
        if cfg.objective != "next_token" or cfg.distill is not None:
            raise ValueError("an rl section trains a decoder policy: drop train.objective and the distill section")
        if rows % self.minibatches or rows // self.minibatches % cfg.train.microbatches:
            raise ValueError(f"data.batch_size x rl.group_size = {rows} rollout rows must split into rl.minibatches="
                             f"{self.minibatches} updates of whole train.microbatches={cfg.train.microbatches}")
        if self.max_new_tokens >= cfg.data.seq_len:
            raise ValueError(f"rl.max_new_tokens={self.max_new_tokens} must be below data.seq_len={cfg.data.seq_len} "
                             "(a rollout row holds the prompt and the completion)")

    @property
    def kl_placement(self) -> str:
        return "reward" if self.algorithm == "ppo" else self.kl_in or "loss"

    @property
    def all_rewards(self) -> list[str]:
        return [*self.rewards, *([f"rm:{self.reward_model}"] if self.reward_model else [])]


def check_contrastive_experiment(cfg, image_source: str) -> None:
    """A dual encoder trains contrastively on image-text pairs, and only that way."""
    if cfg.model.clip is None:
        raise ValueError("train.objective=contrastive trains a dual encoder: set model.clip (e.g. model: tiny-clip)")
    if cfg.objective != "contrastive":
        raise ValueError(f"model.clip is a dual encoder, trained with train.objective=contrastive, not "
                         f"{cfg.objective!r}")
    if cfg.data.source != image_source or cfg.data.mixture is not None:
        raise ValueError(f"a dual encoder trains on image-text pairs: set data.source={image_source} and data.paths "
                         f"(JSONL with {cfg.data.image_field!r} and {cfg.data.text_field!r} fields), not "
                         f"data.source={cfg.data.source!r}")
    if cfg.train.microbatches != 1:
        raise ValueError(f"train.microbatches={cfg.train.microbatches}: the contrastive loss compares every pair "
                         "with the whole global batch, which microbatches would split; use 1")
    if cfg.distill is not None or cfg.rl is not None:
        raise ValueError("a dual encoder is trained contrastively; drop the distill and rl sections")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.data.batch_size < 2:
        raise ValueError("data.batch_size must be at least 2: the loss needs negatives")

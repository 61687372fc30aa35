"""The config sections of objectives beyond plain next-token training: distillation, the reward model and
preference finetuning (train/config.py places them in the experiment schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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

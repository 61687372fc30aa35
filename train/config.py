"""The experiment schema: every key of a run, validated before anything compiles (train/recipes.py reads
recipes, presets and overrides into it).

A bad value raises ConfigError with one line naming the key path, the value and what is allowed.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from model.config import LOGICAL_AXES, DType, ModelConfig, Precision
from train.config_errors import describe_error, section_model  # noqa: F401 (section_model re-exported)
from train.errors import ConfigError  # defined apart so that train/storage.py raises it too
from train.objective_configs import DistillConfig, PreferenceConfig, RewardConfig, RlConfig  # noqa: F401 (re-exported)
from train.objective_configs import check_contrastive_experiment
from train.objective_configs import Section as _Section
from train.storage import check_location


def first_line(error: BaseException, limit: int = 200) -> str:
    """A library's error message cut to its first line (for a one-line report that names the cause)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class OptionError(ConfigError):
    """A bad argument of an API call (not a config key). The template names arguments as {name} and
    takes other values as keywords: str() shows the argument names, and the command line renders them
    as its flags (`render`), so train/ never needs to know how the CLI spells them."""

    def __init__(self, template: str, **values: Any):
        self.template, self.values = template, values
        super().__init__(self.render(str))

    def render(self, name: Callable[[str], str]) -> str:
        fields = {field for _, field, _, _ in string.Formatter().parse(self.template) if field}
        return self.template.format(**{f: name(f) for f in fields if f not in self.values}, **self.values)


RAW_SOURCES = ("stdlib", "text", "jsonl", "parquet", "chat", "preferences")
IMAGE_SOURCE = "images"  # JSONL of (image path, caption) pairs, read by train/data/image_text.py

class MixtureEntry(_Section):
    source: str = Field(description="a prepared data directory (`tessera data prepare`)")
    weight: float = Field(description="share of the training tokens drawn from this source (weights are normalised)")

    @model_validator(mode="after")
    def _check(self) -> "MixtureEntry":
        if not self.weight > 0:
            raise ValueError(f"weight={self.weight} must be > 0")
        check_location("source", self.source)
        return self


class DataConfig(_Section):
    source: str = Field(
        "stdlib", description="a prepared data directory, or documents prepared on first use: stdlib (the Python "
        "standard library's sources), text (one document per file), jsonl or parquet (data.paths); or examples: "
        "chat (JSONL conversations, for supervised finetuning) or preferences (JSONL prompt/chosen/rejected); or "
        "images: JSONL of image paths and captions (a dual encoder's pairs; `tessera data synth images` makes some)"
    )
    paths: list[str] = Field(default_factory=list, description="globs for the 'text', 'jsonl' and 'parquet' sources")
    text_field: str = Field("text", description="jsonl and parquet: the field (column) holding each document; "
                            "images: the caption's field")
    image_field: str = Field("image", description="images: the field holding each image's path (relative to its "
                             "JSONL file)")
    classes: str | None = Field(None, description="images: a classes.json (class names and a prompt template) for "
                                "zero-shot accuracy on held-out images that carry a 'label' field")
    mixture: list[MixtureEntry] | None = Field(None, description="prepared directories with weights, sampled by "
                                               "tokens; replaces data.source")
    tokenizer: str = Field("byte", description="'byte' or the path of a tokenizer.json")
    seq_len: int = Field(256, ge=1, description="tokens per packed row")
    batch_size: int = Field(16, ge=1, description="global batch, in sequences (rl: prompts per step)")
    heldout_fraction: float = Field(0.02, gt=0, lt=1, description="share of documents held out for evaluation "
                                    "(sources prepared on first use)")
    max_documents: int | None = Field(None, ge=1, description="use only the first N records (by path order)")
    prefetch: int = Field(2, ge=0, description="batches read ahead by background threads (0: read when needed)")

    @model_validator(mode="after")
    def _check_sources(self) -> "DataConfig":
        check_location("data.source", self.source)
        check_location("data.tokenizer", self.tokenizer)
        if self.source in RAW_SOURCES[1:] and not self.paths:
            raise ValueError(f"data.paths is empty; data.source={self.source!r} needs at least one file glob")
        if self.mixture is not None:
            if not self.mixture:
                raise ValueError("data.mixture is empty; give at least one {source, weight}")
            if self.source != "stdlib":  # the default stands for "unset": a saved config spells every key
                raise ValueError("data.source and data.mixture are both set; a mixture lists its sources itself")
        return self

    @property
    def raw(self) -> bool:
        """Whether the source is documents to prepare on first use (not a prepared directory)."""
        return self.mixture is None and self.source in RAW_SOURCES


class OptimizerConfig(_Section):
    lr: float = Field(3e-3, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr of the cosine decay, as a fraction of lr")
    warmup_steps: int = Field(100, ge=0, description="linear warmup from 0 to lr")
    b1: float = Field(0.9, ge=0, lt=1, description="Adam's first-moment decay")
    b2: float = Field(0.95, ge=0, lt=1, description="Adam's second-moment decay")
    eps: float = Field(1e-8, gt=0, description="Adam's denominator epsilon")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay, on matrices only")
    clip_norm: float | None = Field(1.0, gt=0, description="global-norm clipping; null disables")


class TrainConfig(_Section):
    steps: int = Field(1000, ge=1, description="optimizer steps of the run")
    log_every: int = Field(10, ge=1, description="steps between training metric lines")
    eval_every: int = Field(250, ge=1, description="steps between held-out evaluations")
    eval_batches: int = Field(8, ge=1, description="global batches of held-out rows per evaluation")
    microbatches: int = Field(1, ge=1, description="gradient accumulation: the global batch is split into this many")
    z_loss: float = Field(0.0, ge=0, description="coefficient of log(Z)^2, keeps logits from drifting")
    max_bad_steps: int = Field(5, ge=1, description="consecutive non-finite steps before on_bad_steps acts")
    on_bad_steps: Literal["restore", "stop"] = Field("restore", description="restore the last checkpoint with a "
                                                     "lower learning rate, or stop the run")
    bad_steps_lr_factor: float = Field(0.5, gt=0, le=1, description="learning-rate multiplier applied on each restore")
    objective: Literal["next_token", "masked_tokens", "reward", "preference", "contrastive"] | None = Field(
        None, description="None follows the model: contrastive for a dual encoder (model.clip), else next_token for "
        "a decoder (supervised finetuning too: chat data marks the tokens to learn), masked_tokens for an encoder; "
        "reward: a reward model on preference pairs (Bradley-Terry); preference: preference finetuning on pairs (DPO "
        "and its variants); contrastive: image-text pairs (model.clip.loss)"
    )
    mask_select_rate: float = Field(0.15, gt=0, lt=1, description="masked_tokens: share of tokens predicted per step")
    spike_factor: float | None = Field(None, gt=1, description="skip an update whose loss exceeds this multiple of "
                                       "the running mean; null disables")
    init_from: str | None = Field(
        None, description="a run directory (trained or imported with `tessera import-hf`) whose latest parameters "
        "start this run, with a fresh optimizer; used only while run.dir has no checkpoint of its own"
    )


MESH_AXES = ("data", "fsdp", "expert", "tensor")


class MeshConfig(_Section):
    """The mesh's shape as plain numbers (infra/mesh.py builds it on devices) and the logical-axis rules."""

    data: int = Field(-1, description="-1 fills the devices left by the other axes")
    fsdp: int = Field(1, description="splits every weight's model dimension (ZeRO-3), and the batch")
    expert: int = Field(1, description="splits MoE experts; elsewhere it acts as one more data-parallel axis")
    tensor: int = Field(1, description="splits heads, MLP width and vocabulary (Megatron)")
    rules: dict[str, str | list[str] | None] = Field(
        default_factory=dict, description="overrides of the logical-axis -> mesh-axis rules, e.g. {embed: null}"
    )
    # Of each axis above, how many ways run across slices (or hosts) over the slower data-centre
    # network; the rest stays within a slice (ICI). mesh.data=16 with dcn_data=2: 2 slices x 8.
    dcn_data: int = Field(1, ge=1, description="ways the data axis spans slices over DCN")
    dcn_fsdp: int = Field(1, ge=1, description="ways the fsdp axis spans slices over DCN")
    dcn_expert: int = Field(1, ge=1, description="ways the expert axis spans slices over DCN")
    dcn_tensor: int = Field(1, ge=1, description="ways the tensor axis spans slices over DCN")

    @model_validator(mode="after")
    def _check_axes(self) -> "MeshConfig":
        sizes = self.axis_sizes()
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{name}={size} is not allowed; use a positive size, or -1 to fill the devices")
        if list(sizes.values()).count(-1) > 1:
            filled = " and ".join(f"mesh.{n}=-1" for n, s in sizes.items() if s == -1)
            raise ValueError(f"only one mesh axis may be -1, got {filled}")
        for name, target in self.rules.items():
            if name not in LOGICAL_AXES:
                raise ValueError(f"mesh.rules.{name}: no such logical axis; the model's logical axes are "
                                 f"{', '.join(LOGICAL_AXES)}")
            axes = [target] if isinstance(target, str) else list(target or [])
            unknown = [a for a in axes if a not in MESH_AXES]
            if unknown or len(set(axes)) < len(axes):
                raise ValueError(f"mesh.rules.{name}={target!r} must name distinct mesh axes of {', '.join(MESH_AXES)} "
                                 "(or be null: not split)")
        return self

    def dcn_sizes(self) -> dict[str, int]:
        return {"data": self.dcn_data, "fsdp": self.dcn_fsdp, "expert": self.dcn_expert, "tensor": self.dcn_tensor}

    def axis_sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "expert": self.expert, "tensor": self.tensor}


# What each precision preset sets (None: each gradient in its parameter's dtype). Softmax, norm
# statistics and the loss are float32 under every one; so are the gradients the optimizer sees
# (accumulated, clipped and applied in float32 whatever dtype the backward pass produced them in).
PRECISION_PRESETS: dict[str, dict[str, Any]] = {
    "fp32": dict(params="float32", compute="float32", logits="float32", grads="float32",
                 optimizer_state="float32", master_weights=False),
    # bf16 matmuls; float32 parameters (the master copy is the parameters themselves), gradients and moments.
    "bf16": dict(params="float32", compute="bfloat16", logits="float32", grads="float32",
                 optimizer_state="float32", master_weights=False),
    # bf16 parameters and gradients; the optimizer updates a float32 master copy, its moments float32.
    "bf16-pure": dict(params="bfloat16", compute="bfloat16", logits="float32", grads="bfloat16",
                      optimizer_state="float32", master_weights=True),
}
PresetName = Literal["fp32", "bf16", "bf16-pure"]


@dataclass(frozen=True)
class PrecisionPolicy:
    """The resolved policy: every dtype concrete."""

    params: str
    compute: str
    logits: str
    grads: str
    optimizer_state: str
    master_weights: bool

    @property
    def model(self) -> Precision:
        """What the model is built with (the optimizer's half stays with the train step)."""
        return Precision(self.params, self.compute, self.logits, self.grads)

    def describe(self) -> str:
        master = ", a float32 master copy" if self.master_weights else ""
        return (f"parameters {self.params}, compute {self.compute}, logits {self.logits}, gradients {self.grads}, "
                f"optimizer moments {self.optimizer_state}{master}")


class PrecisionConfig(_Section):
    """The precision policy, in one place: a named preset (a model preset may recommend one), and any of
    its dtypes set apart from it. The model is built with it; presets carry no dtypes."""

    preset: PresetName = Field(
        "fp32", description="fp32; bf16: bf16 matmuls on float32 parameters and moments (the usual choice for "
        "large models); bf16-pure: bf16 parameters with a float32 master copy"
    )
    params: DType | None = Field(None, description="dtype the parameters are stored in; null: the preset's")
    compute: DType | None = Field(None, description="dtype the matmuls run in; null: the preset's")
    logits: DType | None = Field(None, description="dtype the LM head writes its logits in; null: the preset's")
    grads: DType | None = Field(
        None, description="dtype the backward pass produces gradients in (accumulated, clipped and applied in "
        "float32 all the same); null: the preset's"
    )
    optimizer_state: DType | None = Field(
        None, description="dtype the optimizer's moments are stored in; null: the preset's"
    )
    master_weights: bool | None = Field(
        None, description="keep a float32 copy of low-precision parameters that the optimizer updates; null: the preset's"
    )

    @property
    def policy(self) -> PrecisionPolicy:
        chosen = {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}
        return PrecisionPolicy(**{**PRECISION_PRESETS[self.preset], **chosen})

    @model_validator(mode="after")
    def _check_master(self) -> "PrecisionConfig":
        policy = self.policy
        if policy.master_weights and policy.params == "float32":
            raise ValueError(
                f"precision.master_weights keeps a float32 copy of low-precision parameters, but the parameters are "
                f"float32 (precision.preset={self.preset}); set precision.params=bfloat16 or drop master_weights"
            )
        return self


class CheckpointConfig(_Section):
    every: int = Field(200, ge=1, description="steps between checkpoints")
    keep: int = Field(3, ge=1, description="newest checkpoints kept")
    async_save: bool = Field(True, description="write checkpoints in the background while training goes on")


class RunConfig(_Section):
    dir: str = Field("runs/default", description="the run directory (a local path or gs://): config, metrics, "
                     "checkpoints")
    seed: int = Field(0, description="initialisation, data order and every random draw derive from it")

    @model_validator(mode="after")
    def _check_dir(self) -> "RunConfig":
        check_location("run.dir", self.dir)
        return self


class ExperimentConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    distill: DistillConfig | None = Field(None, description="used by `tessera distill`")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="train.objective=reward")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description="train.objective=preference")
    rl: RlConfig | None = Field(None, description="used by `tessera rl`")

    @property
    def objective(self) -> str:
        if self.train.objective:
            return self.train.objective
        if self.model.clip is not None:
            return "contrastive"
        return "next_token" if self.model.causal else "masked_tokens"

    @property
    def compares_with_a_reference_run(self) -> bool:
        """Preference finetuning against train.init_from's frozen parameters (not SimPO, which needs no reference,
        nor LoRA, whose base without adapters is the reference)."""
        return self.objective == "preference" and self.preference.loss != "simpo" and self.model.lora is None

    @model_validator(mode="after")
    def _check_cross_fields(self) -> "ExperimentConfig":
        m = self.model
        if self.objective == "contrastive" or m.clip is not None:
            check_contrastive_experiment(self, IMAGE_SOURCE)
            check_mesh_sizes(self, self.mesh.axis_sizes())
            return self
        needs = {"next_token": "decoder", "masked_tokens": "encoder", "reward": "decoder", "preference": "decoder"}[
            self.objective]
        if m.architecture != needs:
            why = "a decoder attends only to the past" if needs == "encoder" else "an encoder sees the token it predicts"
            raise ValueError(
                f"train.objective={self.objective!r} needs model.architecture={needs!r}, got {m.architecture!r} ({why})"
            )
        if self.objective == "reward" and not m.score_head:
            raise ValueError("train.objective=reward needs model.score_head=true (the score it trains)")
        if self.compares_with_a_reference_run and not self.train.init_from:
            raise ValueError(f"preference.loss={self.preference.loss} compares the policy with a reference model: set "
                             "train.init_from=RUN (the reference is that run), or model.lora (the base without its "
                             "adapters is the reference), or use preference.loss=simpo")
        if self.objective in ("reward", "preference") and self.distill is not None:
            raise ValueError(f"train.objective={self.objective} does not distill; drop the distill section")
        if self.rl is not None:
            self.rl.check_experiment(self)
        if self.data.seq_len > m.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if self.data.batch_size % self.train.microbatches:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} must be divisible by train.microbatches={self.train.microbatches}"
            )
        if self.distill is not None and self.distill.teacher_topk and self.distill.kl == "reverse":
            raise ValueError("distill.kl=reverse needs the teacher's whole distribution, but distill.teacher_topk "
                             "holds only its top K; use kl=forward, or run the teacher online")
        check_mesh_sizes(self, self.mesh.axis_sizes())  # the axes known before the devices are
        return self


def check_mesh_sizes(cfg: ExperimentConfig, sizes: dict[str, int]) -> None:
    """Every rule that ties mesh axis sizes to the rest of the config, in one place. Called at load with
    the sizes as given (a -1 axis is not known yet, and its rules wait) and again by infra.mesh.resolve_mesh
    once the devices fill it; raises ValueError naming the keys."""
    m, known = cfg.model, {name: size for name, size in sizes.items() if size > 0}
    for name, ways in cfg.mesh.dcn_sizes().items():
        if name in known and known[name] % ways:
            raise ValueError(f"mesh.dcn_{name}={ways} must divide mesh.{name}={known[name]} (the axis is split into "
                             f"{ways} slices of mesh.{name}/{ways} devices each)")
    tensor = known.get("tensor", 1)
    heads = [("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)]
    if m.clip is not None:
        heads.append(("model.clip.vision.n_heads", m.clip.vision.n_heads))
    for key, value in heads:
        if value % tensor:
            raise ValueError(f"{key}={value} must be divisible by mesh.tensor={tensor} (heads are split over it)")
    if m.moe is not None and m.moe.num_experts % known.get("expert", 1):
        raise ValueError(
            f"mesh.expert={known['expert']} must divide model.moe.num_experts={m.moe.num_experts} "
            "(each device along the expert axis holds a whole number of experts)"
        )
    if all(a in known for a in ("data", "fsdp", "expert")):
        data_parallel = known["data"] * known["fsdp"] * known["expert"]
        rows, what = cfg.data.batch_size, "data.batch_size"
        if cfg.rl is not None:  # an update's rows: a share of the rollout
            rows, what = rows * cfg.rl.group_size // cfg.rl.minibatches, "data.batch_size*rl.group_size/rl.minibatches"
        micro = rows // cfg.train.microbatches
        if micro % data_parallel:
            raise ValueError(f"{what}={rows} (per microbatch {micro}) must be divisible by the data-parallel size "
                             f"mesh.data*mesh.fsdp*mesh.expert={data_parallel}")


# ---------------------------------------------------------------- validation


def build_config(tree: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(describe_error(e.errors()[0], ExperimentConfig)) from None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

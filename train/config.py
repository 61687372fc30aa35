"""The experiment schema and its loading: YAML recipes, model presets, dotted CLI overrides.

Every key is validated before anything compiles; a bad value raises ConfigError with
one line naming the key path, the value and what is allowed.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.config import DType, ModelConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_EXPERIMENT = CONFIGS_DIR / "experiments" / "tiny.yaml"


class ConfigError(ValueError):
    """A user error in a config file or override; its message is one line meant for the user."""


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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: Literal["stdlib", "text", "jsonl"] = "stdlib"
    paths: list[str] = Field(default_factory=list, description="globs for the 'text' and 'jsonl' sources")
    text_field: str = "text"
    tokenizer: str = Field("byte", description="'byte' or the path of a tokenizer.json")
    seq_len: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1, description="global batch, in sequences")
    heldout_fraction: float = Field(0.02, gt=0, lt=1)
    max_documents: int | None = Field(None, ge=1, description="use only the first N documents (by path order)")

    @model_validator(mode="after")
    def _check_paths(self) -> "DataConfig":
        if self.source != "stdlib" and not self.paths:
            raise ValueError(f"data.paths is empty; data.source={self.source!r} needs at least one file glob")
        return self


class OptimizerConfig(_Section):
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr of the cosine decay, as a fraction of lr")
    warmup_steps: int = Field(100, ge=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    clip_norm: float | None = Field(1.0, gt=0, description="global-norm clipping; null disables")


class TrainConfig(_Section):
    steps: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(250, ge=1)
    eval_batches: int = Field(8, ge=1)
    microbatches: int = Field(1, ge=1, description="gradient accumulation: the global batch is split into this many")
    z_loss: float = Field(0.0, ge=0, description="coefficient of log(Z)^2, keeps logits from drifting")
    max_bad_steps: int = Field(5, ge=1, description="consecutive non-finite steps before on_bad_steps acts")
    on_bad_steps: Literal["restore", "stop"] = Field(
        "restore", description="restore the last checkpoint with a lower learning rate, or stop the run"
    )
    bad_steps_lr_factor: float = Field(0.5, gt=0, le=1, description="learning-rate multiplier applied on each restore")
    objective: Literal["next_token", "masked_tokens"] | None = Field(
        None, description="None follows model.architecture: next_token for a decoder, masked_tokens for an encoder"
    )
    mask_select_rate: float = Field(0.15, gt=0, lt=1, description="masked_tokens: share of tokens predicted per step")
    spike_factor: float | None = Field(
        None, gt=1, description="skip an update whose loss exceeds this multiple of the running mean; null disables"
    )


class MeshConfig(_Section):
    data: int = Field(-1, description="-1 fills the devices left by the other axes")
    fsdp: int = 1
    expert: int = Field(1, description="splits MoE experts; elsewhere it acts as one more data-parallel axis")
    tensor: int = 1
    rules: dict[str, str | list[str] | None] = Field(
        default_factory=dict, description="overrides of the logical-axis -> mesh-axis rules"
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
            raise ValueError(f"only one mesh axis may be -1, got {sizes}")
        check_dcn_divides(self, sizes)
        return self

    def dcn_sizes(self) -> dict[str, int]:
        return {"data": self.dcn_data, "fsdp": self.dcn_fsdp, "expert": self.dcn_expert, "tensor": self.dcn_tensor}

    def axis_sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "expert": self.expert, "tensor": self.tensor}


# What each precision preset sets. Softmax, norm statistics and the loss are float32 under every one.
PRECISION_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "fp32": {"model": {"param_dtype": "float32", "dtype": "float32", "grad_dtype": "float32"},
             "precision": {"optimizer_state": "float32", "master_weights": False}},
    # bf16 matmuls; float32 parameters, gradients and optimizer state.
    "bf16": {"model": {"param_dtype": "float32", "dtype": "bfloat16", "grad_dtype": "float32"},
             "precision": {"optimizer_state": "float32", "master_weights": False}},
    # bf16 parameters and gradients; the optimizer updates a float32 master copy and its state is float32.
    "bf16-pure": {"model": {"param_dtype": "bfloat16", "dtype": "bfloat16", "grad_dtype": "bfloat16"},
                  "precision": {"optimizer_state": "float32", "master_weights": True}},
}


class PrecisionConfig(_Section):
    """The training side of the precision policy; the model side is model.param_dtype, model.dtype,
    model.logits_dtype and model.grad_dtype. A preset sets both sides at once."""

    preset: Literal["fp32", "bf16", "bf16-pure"] | None = Field(
        None, description="fills the policy's dtypes; null: take them as given"
    )
    optimizer_state: DType | None = Field(
        None, description="dtype the optimizer's moments are stored in; null: that of the parameters it updates"
    )
    master_weights: bool = Field(
        False, description="keep a float32 copy of low-precision parameters that the optimizer updates"
    )


class DistillConfig(_Section):
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


class CheckpointConfig(_Section):
    every: int = Field(200, ge=1)
    keep: int = Field(3, ge=1)
    async_save: bool = True


class RunConfig(_Section):
    dir: str = "runs/default"
    seed: int = 0


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

    @property
    def objective(self) -> str:
        return self.train.objective or ("next_token" if self.model.causal else "masked_tokens")

    @model_validator(mode="before")
    @classmethod
    def _apply_precision_preset(cls, tree: Any) -> Any:
        """A preset fills the policy's dtypes; a value set otherwise that contradicts it is an error."""
        if not isinstance(tree, dict):
            return tree
        precision = tree.get("precision")
        preset = precision.get("preset") if isinstance(precision, dict) else getattr(precision, "preset", None)
        if preset not in PRECISION_PRESETS:
            return tree  # no preset, or an unknown one the field validation reports
        tree = dict(tree)
        for section, values in PRECISION_PRESETS[preset].items():
            given = tree.get(section) or {}
            given = dict(given) if isinstance(given, dict) else given.model_dump()
            for key, value in values.items():
                if key in given and given[key] is not None and given[key] != value:
                    raise ValueError(
                        f"{section}.{key}={given[key]} contradicts precision.preset={preset}, which sets "
                        f"{section}.{key}={value}; drop one of them"
                    )
                given[key] = value
            tree[section] = given
        return tree

    @model_validator(mode="after")
    def _check_cross_fields(self) -> "ExperimentConfig":
        m, tensor = self.model, self.mesh.tensor
        needs = {"next_token": "decoder", "masked_tokens": "encoder"}[self.objective]
        if m.architecture != needs:
            why = "a decoder attends only to the past" if needs == "encoder" else "an encoder sees the token it predicts"
            raise ValueError(
                f"train.objective={self.objective!r} needs model.architecture={needs!r}, got {m.architecture!r} ({why})"
            )
        if tensor > 1:
            for key, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)):
                if value % tensor:
                    raise ValueError(f"{key}={value} must be divisible by mesh.tensor={tensor} (heads are split over it)")
        if self.data.seq_len > m.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if self.data.batch_size % self.train.microbatches:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} must be divisible by train.microbatches={self.train.microbatches}"
            )
        if m.moe is not None and self.mesh.expert > 0 and m.moe.num_experts % self.mesh.expert:
            raise ValueError(
                f"mesh.expert={self.mesh.expert} must divide model.moe.num_experts={m.moe.num_experts} "
                "(each device along the expert axis holds a whole number of experts)"
            )
        if self.precision.master_weights and m.param_dtype == "float32":
            raise ValueError("precision.master_weights keeps a float32 copy of low-precision parameters, but "
                             "model.param_dtype is float32; set model.param_dtype=bfloat16 or drop master_weights")
        if self.distill is not None and self.distill.teacher_topk and self.distill.kl == "reverse":
            raise ValueError("distill.kl=reverse needs the teacher's whole distribution, but distill.teacher_topk "
                             "holds only its top K; use kl=forward, or run the teacher online")
        dp = [s for s in (self.mesh.data, self.mesh.fsdp, self.mesh.expert) if s > 0]
        if len(dp) == 3:  # with a -1 axis, checked once devices are known
            check_batch_divisible(self, dp[0] * dp[1] * dp[2])
        return self


def check_dcn_divides(mesh: MeshConfig, sizes: dict[str, int]) -> None:
    for name, ways in mesh.dcn_sizes().items():
        if sizes[name] > 0 and sizes[name] % ways:
            raise ValueError(
                f"mesh.dcn_{name}={ways} must divide mesh.{name}={sizes[name]} (the axis is split into "
                f"{ways} slices of mesh.{name}/{ways} devices each)"
            )


def check_batch_divisible(cfg: ExperimentConfig, data_parallel: int) -> None:
    micro = cfg.data.batch_size // cfg.train.microbatches
    if micro % data_parallel:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} (per microbatch {micro}) must be divisible by the "
            f"data-parallel size mesh.data*mesh.fsdp*mesh.expert={data_parallel}"
        )


def resolve_mesh(cfg: ExperimentConfig, device_count: int) -> dict[str, int]:
    """Concrete axis sizes for this many devices (filling a -1 axis); ConfigError if they cannot match."""
    sizes = cfg.mesh.axis_sizes()
    fixed = 1
    for size in sizes.values():
        fixed *= size if size > 0 else 1
    if -1 in sizes.values():
        name = next(n for n, s in sizes.items() if s == -1)
        if device_count % fixed:
            raise ConfigError(
                f"mesh.{name}=-1 cannot fill {device_count} devices: the other axes multiply to {fixed}, "
                f"which does not divide {device_count}"
            )
        sizes[name] = device_count // fixed
    elif fixed != device_count:
        raise ConfigError(
            f"mesh axes {sizes} multiply to {fixed} but there are {device_count} devices; "
            "make the product equal the device count, or set one axis to -1"
        )
    try:
        check_dcn_divides(cfg.mesh, sizes)
        check_batch_divisible(cfg, sizes["data"] * sizes["fsdp"] * sizes["expert"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return sizes


# ---------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        if (path / "config.yaml").is_file():  # a run directory: continue that run
            path = path / "config.yaml"
        else:
            raise ConfigError(f"{path} is a directory without config.yaml, so not a run directory; pass a config YAML")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def model_preset(name_or_path: str) -> dict[str, Any]:
    """A model preset by name (configs/models/NAME.yaml) or by file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS_DIR / "models" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.yaml"))
        raise ConfigError(f"model preset {name_or_path!r} not found; known presets: {', '.join(known)}")
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    return data


def _resolve_model(value: Any) -> Any:
    """`model: NAME` or `model: {preset: NAME, <overrides>}` become a plain mapping."""
    if isinstance(value, str):
        return model_preset(value)
    if isinstance(value, dict) and "preset" in value:
        rest = {k: v for k, v in value.items() if k != "preset"}
        return {**model_preset(str(value["preset"])), **rest}
    return value


def _apply_override(tree: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.path=value, e.g. train.steps=200")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if part == "model" and depth == 0:
            child = _resolve_model(child) if child is not None else {}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = _resolve_model(value) if parts == ["model"] else value


def _describe(error: dict[str, Any], root: type[BaseModel]) -> str:
    path = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        section: Any = root
        for part in error["loc"][:-1]:
            section = section.model_fields[part].annotation if isinstance(part, str) else section
        allowed = ", ".join(section.model_fields) if isinstance(section, type) else "see the docs"
        return f"unknown config key {path}; allowed keys here: {allowed}"
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":
        return msg if not path else f"{path}: {msg}"
    return f"{path}={error['input']!r} is not allowed: {msg}"


def build_config(tree: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0], ExperimentConfig)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a recipe (or the built-in default), resolve presets, apply `key=value` overrides, validate."""
    tree = _read_yaml(Path(path) if path else DEFAULT_EXPERIMENT)
    if tree and set(tree) <= set(ModelConfig.model_fields):  # a bare model preset file
        tree = {"model": model_preset(str(path))}
    if not isinstance(tree.get("model", {}), (dict, str)):
        raise ConfigError(f"model must be a preset name or a mapping of model keys, got {tree['model']!r}")
    if "model" in tree:
        tree["model"] = _resolve_model(tree["model"])
    for item in overrides:
        _apply_override(tree, item)
    return build_config(tree)


def with_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """A copy of cfg with dotted overrides applied and validated again."""
    tree = cfg.model_dump(mode="json")
    for item in overrides:
        _apply_override(tree, item)
    return build_config(tree)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

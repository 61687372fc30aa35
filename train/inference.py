"""A trained run directory loaded for inference: its config, tokenizer and parameters on a mesh."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from model.config import ModelConfig
from train import storage
from train.checkpoint import Checkpointer
from train.config import ConfigError, ExperimentConfig
from train.recipes import load_config
from train.sharding import Rules
from model import lora
from train.state import AbstractModel, abstract_model, param_shardings
from train.tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    cfg: ExperimentConfig
    tokenizer: Tokenizer
    model: AbstractModel
    params: Any  # sharded on the mesh by the rules
    step: int  # the checkpoint's training step

    @property
    def checkpoint_id(self) -> str:
        """Names these exact weights: the run directory, the step and when that checkpoint was written."""
        path = self.run_dir / "checkpoints" / str(self.step)
        if storage.is_remote(self.run_dir):  # a bucket "directory" has no time of its own: its commit marker has
            return f"{self.run_dir}@{self.step}@{(path / 'commit_success.txt').stat().mtime}"
        return f"{self.run_dir.resolve()}@{self.step}@{path.stat().st_mtime_ns}"


def run_config(run_dir: str | Path) -> ExperimentConfig:
    """The config a run directory was trained with (RUN_DIR/config.yaml)."""
    run_dir = storage.path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); train one with `tessera train run.dir=...`")
    return load_config(run_dir)


def load_trained(run_dir: str | Path, mesh: Mesh, rules: Rules, cfg: ExperimentConfig | None = None) -> TrainedRun:
    """The parameters of the latest readable checkpoint, restored alone (no optimizer state, no master copy)
    straight into this mesh's shardings and the run's parameter dtype."""
    run_dir = storage.path(run_dir)
    cfg = cfg or run_config(run_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = abstract_model(cfg.model, cfg.precision.policy.model)
    shardings = param_shardings(model, mesh, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), model.params, shardings)
    step, params = restore_latest_params(run_dir, cfg, abstract)
    return TrainedRun(run_dir, cfg, tokenizer, model, params, step)


def restore_latest_params(run_dir: Path, cfg: ExperimentConfig, abstract_params) -> tuple[int, Any]:
    """(step, parameters) of `run_dir`'s latest readable checkpoint, restored alone into the shardings and dtypes
    of `abstract_params`."""
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    try:
        found = checkpointer.latest_readable(lambda step: checkpointer.restore_params(step, abstract_params),
                                             lambda _: None)
    finally:
        checkpointer.close()
    if found is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet; train it first (`tessera train {run_dir}`)")
    return found


def params_of_run(run_dir: str | Path, model: ModelConfig, abstract_params) -> Any:
    """Another run's latest parameters for a model of config `model` (train.init_from), into `abstract_params`'
    shardings and dtypes; refuses, naming the first parameter, when the two models' parameters differ in shape.
    Parameters this model adds (LoRA adapters, a score head) are left out of the result, to start fresh."""
    run_dir = storage.path(run_dir)
    source = run_config(run_dir)
    theirs = flat_shapes(abstract_model(source.model, source.precision.policy.model).params)
    ours = flat_shapes(abstract_params)
    added = {p for p in set(ours) - set(theirs) if lora.is_adapter(tuple(p.split("/"))) or p == "score"}
    if any(lora.is_adapter(tuple(p.split("/"))) for p in set(theirs) - set(ours)):
        raise ConfigError(f"train.init_from={run_dir} holds LoRA adapters this model lacks; fold them into its "
                          f"weights first (`tessera lora merge {run_dir} --out DIR`) and start from DIR")
    for path in sorted(set(theirs) | set(ours) - added):
        if theirs.get(path) != ours.get(path):
            there = "absent" if path not in theirs else f"shape {list(theirs[path])}"
            here = "absent" if path not in ours else f"shape {list(ours[path])}"
            raise ConfigError(f"train.init_from={run_dir}: parameter {path} is {there} there but {here} in this "
                              f"model; start from a run of the same model")
    return restore_latest_params(run_dir, source, _without(abstract_params, added))[1]


def _without(tree: dict, paths: set[str], prefix: str = "") -> dict:
    """A pure dict without the leaves at `paths` ("a/b/c")."""
    out = {}
    for key, value in tree.items():
        where = f"{prefix}{key}"
        if isinstance(value, dict):
            kept = _without(value, paths, where + "/")
            if kept:
                out[key] = kept
        elif where not in paths:
            out[key] = value
    return out


def flat_shapes(params) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape by its path ("blocks/attn/wq")."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in leaves}

"""A trained run directory loaded for inference: its config, tokenizer and parameters on a mesh."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from train.checkpoint import Checkpointer
from train.config import ConfigError, ExperimentConfig, load_config
from train.program import build_program
from train.sharding import Rules, replicated
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
        return f"{self.run_dir.resolve()}@{self.step}@{path.stat().st_mtime_ns}"


def run_config(run_dir: str | Path) -> ExperimentConfig:
    """The config a run directory was trained with (RUN_DIR/config.yaml)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); train one with `tessera train run.dir=...`")
    return load_config(run_dir)


def load_trained(run_dir: str | Path, mesh: Mesh, rules: Rules, cfg: ExperimentConfig | None = None) -> TrainedRun:
    """The latest readable checkpoint's parameters, restored straight into this mesh's shardings."""
    run_dir = Path(run_dir)
    cfg = cfg or run_config(run_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.model.weight_quant is not None:  # a serving checkpoint: parameters and step only
        model = abstract_model(cfg.model)
        abstract = serving_state(model.params, param_shardings(model, mesh, rules), replicated(mesh))
    else:
        # A distilled student's state is a student's like any other: its teacher plays no part in it.
        program = build_program(cfg.model_copy(update={"distill": None}), mesh, rules)
        model, abstract = program.model, program.abstract_state()
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    try:
        restored = checkpointer.restore_latest(abstract, lambda message: None)
    finally:
        checkpointer.close()
    if restored is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet; train it first (`tessera train {run_dir}`)")
    step, state, _ = restored
    return TrainedRun(run_dir, cfg, tokenizer, model, state["params"], step)


def serving_state(params, shardings, step_sharding):
    """What a serving (weight-quantized) checkpoint holds: {"params", "step"}, as ShapeDtypeStructs."""
    shapes = {"params": params, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        {"params": shardings, "step": step_sharding})

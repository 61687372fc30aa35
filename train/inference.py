"""A trained run directory loaded for inference: its config, tokenizer and parameters on a mesh."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from train.checkpoint import Checkpointer
from train.config import ConfigError, ExperimentConfig, load_config
from train.program import build_program
from train.sharding import Rules
from train.state import AbstractModel
from train.tokenizer import Tokenizer, TokenizerError, load_tokenizer


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
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    program = build_program(cfg, mesh, rules)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    try:
        restored = checkpointer.restore_latest(program.abstract_state(), lambda message: None)
    finally:
        checkpointer.close()
    if restored is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet; train it first (`tessera train {run_dir}`)")
    step, state, _ = restored
    return TrainedRun(run_dir, cfg, tokenizer, program.model, state["params"], step)

"""`tessera lora merge`: a LoRA run's adapters folded into its weights (W + A·B·alpha/rank), written as a plain
run directory whose forward pass equals the adapted one; it serves, exports and finetunes like any run."""

from __future__ import annotations

from pathlib import Path

import jax

from model import lora
from train.checkpoint import Checkpointer
from train.config import ConfigError, ExperimentConfig
from train.inference import TrainedRun
from train.run_dir import write_config
from train.sharding import Rules
from train.state import abstract_model, param_shardings


def merged_config(cfg: ExperimentConfig, out: Path) -> ExperimentConfig:
    if cfg.model.lora is None:
        raise ConfigError(f"{cfg.run.dir} has no LoRA adapters to merge (model.lora is not set)")
    if cfg.model.weight_quant is not None:
        raise ConfigError(f"{cfg.run.dir} adapts a weight-only quantized base (QLoRA); merging would round the "
                          "adapters into its quantized weights: serve it as it is, or train LoRA on the float model")
    if (out / "config.yaml").exists() or (out / "checkpoints").exists():
        raise ConfigError(f"--out {out} already holds a run; choose a new directory")
    model = cfg.model.model_copy(update={"lora": None})
    return cfg.model_copy(update={"model": model, "run": cfg.run.model_copy(update={"dir": str(out)})})


def write_merged(run: TrainedRun, out: Path, mesh, rules: Rules) -> ExperimentConfig:
    """Fold run's adapters into its weights on the mesh and save them as the run directory `out`."""
    cfg = merged_config(run.cfg, out)
    shardings = param_shardings(abstract_model(cfg.model, cfg.precision.policy.model), mesh, rules)
    scale = run.cfg.model.lora.alpha / run.cfg.model.lora.rank
    params = jax.jit(lambda p: lora.merge(p, scale), out_shardings=shardings)(run.params)
    checkpointer = Checkpointer(out / "checkpoints", cfg.checkpoint)
    try:
        checkpointer.save(0, {"params": params}, {}, force=True)  # parameters alone: training from it starts fresh
        checkpointer.wait()
    finally:
        checkpointer.close()
    write_config(cfg, [f"LoRA adapters of {run.run_dir} (step {run.step}) merged into its weights"])
    return cfg

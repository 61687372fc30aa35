"""The run directory: where a run's config, metrics and checkpoints live, and who may continue it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from train import storage
from train.config import ConfigError, ExperimentConfig, OptionError, build_config, dump_config
from train.recipes import read_run_config

# How attention is computed is not what the model is: its checkpoints serve any implementation.
IMPLEMENTATION_KEYS = ("model.attention", "model.attention_block")
# Keys that may change when a run is continued: its length, its bookkeeping, where it lives, the mesh it
# runs on (checkpoints restore into any layout) and the attention implementation. Anything else makes it
# a different run, which needs --force (a new precision policy then casts the restored state into its
# dtypes); a different model can never reuse the checkpoints.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "checkpoint.", "mesh.", "run.dir",
    *IMPLEMENTATION_KEYS,
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def config_changes(previous: dict, current: dict) -> list[tuple[str, Any, Any]]:
    old, new = _flatten(previous), _flatten(current)
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def comparable(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as compared across a resume: the precision policy as resolved, whichever keys chose it."""
    return {**cfg.model_dump(mode="json"), "precision": asdict(cfg.precision.policy)}


def check_run_dir(cfg: ExperimentConfig, force: bool = False) -> Path:
    """Refuse to take over a different run's directory; changes nothing on disk."""
    run_dir = storage.path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={cfg.run.dir} exists and is not a directory")
    saved = run_dir / "config.yaml"
    current = comparable(cfg)
    if saved.is_file():
        try:
            previous = read_run_config(run_dir)
        except ConfigError as e:
            raise ConfigError(f"{e}; it is not a run directory Tessera wrote") from None
        try:  # keys added to the schema since that run was written take their defaults
            previous = comparable(build_config(previous))
        except ConfigError:
            pass  # compared as written: the differences name what changed
        changes = config_changes(previous, current)
        model_changes = [c for c in changes if c[0].startswith("model.") and c[0] not in IMPLEMENTATION_KEYS]
        if model_changes:
            key, old, new = model_changes[0]
            raise ConfigError(
                f"run.dir={cfg.run.dir} holds a run of a different model ({key}: {old!r} -> {new!r}); "
                "its checkpoints cannot be resumed with this model (use a new run.dir)"
            )
        other = [c for c in changes if not c[0].startswith(RESUMABLE_KEYS)]
        # A directory that has not trained yet (an import: parameters alone, no metrics) takes any config of its model.
        if other and not force and (run_dir / "metrics.jsonl").exists():
            key, old, new = other[0]
            raise OptionError(
                "run.dir={run_dir} holds a run with a different config ({key}: {old!r} -> {new!r}); "
                "pass {force} to continue it with the new config, or use a new run.dir",
                run_dir=cfg.run.dir, key=key, old=old, new=new,
            )
    return run_dir


def write_config(cfg: ExperimentConfig, notes: list[str] = ()) -> Path:
    """Create RUN_DIR (if needed) and record the resolved config in it; `notes` (facts about the run that
    are not config keys, such as dimensions the mesh leaves whole) head it as comments."""
    run_dir = storage.path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {note}\n" for note in notes)
    (run_dir / "config.yaml").write_text(header + dump_config(cfg))
    return run_dir

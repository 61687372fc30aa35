"""Checkpoints through orbax's CheckpointManager: async, atomic, keep-last-K, restore into shardings.

Each checkpoint holds the whole training state (params, optimizer, step, RNG) and the
data iterator's position, so a resumed run continues exactly where the last one saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from train.config import CheckpointConfig


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=cfg.every,
                max_to_keep=cfg.keep,
                enable_async_checkpointing=cfg.async_save,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Start saving if `step` is due (or forced); returns whether a save started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore into the shardings carried by `abstract_state` (ShapeDtypeStructs with .sharding)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

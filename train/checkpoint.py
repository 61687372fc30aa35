"""Checkpoints through orbax's CheckpointManager: async, atomic, keep-last-K, restore into shardings.

Each checkpoint holds the whole training state (params, optimizer, step, RNG) and the
data iterator's position, so a resumed run continues exactly where the last one saved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.config import CheckpointConfig


# Orbax splits the writing of a replicated array across its replicas, slicing it with one eagerly
# compiled op per slice: seconds of compiling at a run's first save for a model of small arrays.
# Only arrays whose per-replica slice is this large are split; smaller ones are written by one replica.
MIN_REPLICA_SLICE_BYTES = 4 * 2**20


def _register_array_handler() -> None:
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax logs a warning for any override of a standard handler
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
            override=True,
        )
    finally:
        absl.setLevel(level)


_register_array_handler()


class CheckpointError(RuntimeError):
    """No checkpoint in a run directory can be read."""


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

    def restore_latest(self, abstract_state: Any, report: Callable[[str], None]) -> tuple[int, Any, dict] | None:
        """The newest readable checkpoint as (step, state, data_state); None if there is none at all.

        A checkpoint damaged after it was written (files truncated or deleted) is reported,
        moved aside to `STEP.unreadable` (kept for inspection, out of orbax's step list so
        new saves can reuse its step) and the previous one is used. If no checkpoint can be
        read, nothing is moved: that points at a config that no longer matches, not at damage.
        Saves that never finished are not candidates: orbax renames a checkpoint into place
        only once it is complete.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        unreadable = []
        for step in steps:
            try:
                state, data_state = self.restore(step, abstract_state)
            except Exception as e:  # tensorstore and orbax raise many types for damaged files
                reason = (str(e).strip().splitlines() or [""])[0][:200]
                report(f"checkpoint at step {step} is unreadable ({type(e).__name__}: {reason}); trying an earlier one")
                unreadable.append(step)
                continue
            self._set_aside(unreadable, report)
            return step, state, data_state
        if steps:
            raise CheckpointError(
                f"none of the checkpoints {steps} in {self.manager.directory} can be read with this config"
            )
        return None

    def _set_aside(self, steps: list[int], report: Callable[[str], None]) -> None:
        if not steps or jax.process_index() != 0:
            return
        for step in steps:
            path = Path(self.manager.directory) / str(step)
            path.rename(path.with_name(f"{step}.unreadable-{int(time.time())}"))
            report(f"moved the unreadable checkpoint of step {step} aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

"""Checkpoints through orbax's CheckpointManager: async, atomic, keep-last-K, restore into shardings.

A training checkpoint holds the whole training state (params, optimizer state, step, RNG,
the bad-step guard, and a float32 master copy under a policy that keeps one) and the data
iterator's position, so a resumed run continues exactly where the last one saved. A
serving checkpoint (`tessera quantize`) holds only the parameters and the step. Readers
that need only the weights (inference, a teacher, fine-tuning) restore the parameters
alone (`restore_params`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from train import storage
from train.config import CheckpointConfig, first_line

COMMIT_MARKER = "commit_success.txt"  # orbax's mark of a finished checkpoint on an object store


# Orbax splits the writing of a replicated array across its replicas, slicing it with one eagerly
# compiled op per slice: seconds of compiling at a run's first save for a model of small arrays.
# Only arrays whose per-replica slice is this large are split; smaller ones are written by one replica.
MIN_REPLICA_SLICE_BYTES = 4 * 2**20


@contextlib.contextmanager
def orbax_logs_at_most(level: int) -> Iterator[None]:
    """Orbax's own log lines (through absl) below `level` are dropped while inside."""
    absl = logging.getLogger("absl")
    previous = absl.level
    absl.setLevel(level)
    try:
        yield
    finally:
        absl.setLevel(previous)


def _register_array_handler() -> None:
    with orbax_logs_at_most(logging.ERROR):  # orbax logs a warning for any override of a standard handler
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
            override=True,
        )


_register_array_handler()


def dropping_abandoned_reads(previous: Callable) -> Callable:
    """An unraisable-exception hook for after a failed restore. When a restore fails on a damaged file, orbax
    closes its event loop while tensorstore still reads the checkpoint's other arrays; each read that
    finishes later cannot call back into the closed loop, and Python would print that as an 'Exception
    ignored' traceback, long after the failure was reported in one line. Those are dropped; every other
    unraisable exception reaches `previous`."""
    if getattr(previous, "drops_abandoned_reads", False):
        return previous  # installed by an earlier failed restore: one layer is enough

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_abandoned_reads = True
    return hook


T = TypeVar("T")


class CheckpointError(RuntimeError):
    """No checkpoint in a run directory can be read."""


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        # The state goes through the PyTree handler (StandardSave/Restore wrap it and write the same files),
        # which also restores part of a tree: the parameters alone, or a state without its master copy.
        # `layout` records the state's top-level keys, so a restore knows them without reading array metadata.
        with orbax_logs_at_most(logging.CRITICAL):  # damaged checkpoint metadata is reported when it is read
            directory = storage.path(directory)
            self.manager = ocp.CheckpointManager(
                directory if storage.is_remote(directory) else directory.absolute(),
                item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                               "layout": ocp.JsonCheckpointHandler()},
                options=ocp.CheckpointManagerOptions(
                    save_interval_steps=cfg.every,
                    max_to_keep=cfg.keep,
                    enable_async_checkpointing=cfg.async_save,
                ),
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether checkpoint.every asks for a save at `step`."""
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Start saving if `step` is due (or forced); returns whether a save started.

        Waits for `state` on every local device before saving: orbax's barriers between processes are device
        collectives too, and one that runs beside the tail of a train step on another device can pair its
        messages with the step's (gloo aborts on the mismatch)."""
        if not (force or self.due(step)):
            return False
        jax.block_until_ready(state)
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
                                    layout=ocp.args.JsonSave({"state": sorted(state)})),
            force=True,
        )

    def saved_keys(self, step: int) -> set[str]:
        """The top-level keys of the state saved at `step` (e.g. whether it holds a float32 master copy), from the
        small record saved beside it; a checkpoint written before that record existed has its array metadata read."""
        if (self.manager.directory / str(step) / "layout").is_dir():
            layout = self.manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore())).layout
            return set(layout["state"])
        return set(self.manager.item_metadata(step)["state"].keys())

    def holds_parameters_only(self, step: int) -> bool:
        """Whether the checkpoint at `step` holds parameters alone (an import), not a training state. A record
        that cannot be read says no: restoring it then reports the damage."""
        try:
            return self.saved_keys(step) == {"params"}
        except Exception:  # damaged files raise whatever their reader raises
            return False

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore into the shardings and dtypes carried by `abstract_state` (ShapeDtypeStructs with .sharding):
        arrays are cast to the target's dtypes, so a run continues under another precision policy. When the
        policies differ in keeping a float32 master copy, the float32 truth (the saved master copy, or else
        the saved parameters) becomes the new master copy, or the new parameters."""
        saved_master, wants_master = "master" in self.saved_keys(step), "master" in abstract_state
        if saved_master == wants_master:
            return self._restore_tree(step, abstract_state, with_data=True)
        truth = abstract_state["master" if wants_master else "params"]
        target = {k: v for k, v in abstract_state.items() if k not in ("params", "master")}
        target["master" if saved_master else "params"] = truth
        state, data = self._restore_tree(step, target, with_data=True, partial=True)
        truth = state.pop("master" if saved_master else "params")
        state["params"] = jax.tree.map(lambda t, a: t.astype(a.dtype), truth, abstract_state["params"])
        if wants_master:
            state["master"] = truth
        return state, data

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of the state saved at `step` (no optimizer moments, no master copy), restored
        into the shardings and dtypes of `abstract_params`: what inference and fine-tuning need."""
        return self._restore_tree(step, {"params": abstract_params}, partial=True)[0]["params"]

    def _restore_tree(self, step: int, target: Any, with_data: bool = False, partial: bool = False):
        """(state, data state or None): `target` (its subtrees only, if `partial`) in its shardings and dtypes."""
        args = {"state": ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=partial
        )}
        if with_data:
            args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored.state, restored.data if with_data else None

    def restore_latest(self, abstract_state: Any, report: Callable[[str], None]) -> tuple[int, Any, dict] | None:
        """The newest readable checkpoint as (step, state, data_state); None if there is none at all."""
        found = self.latest_readable(lambda step: self.restore(step, abstract_state), report)
        return None if found is None else (found[0], *found[1])

    def latest_readable(self, read: Callable[[int], T], report: Callable[[str], None]) -> tuple[int, T] | None:
        """(step, read(step)) for the newest checkpoint `read` succeeds on; None if there is no checkpoint at all.

        A checkpoint damaged after it was written (files truncated or deleted) is reported,
        moved aside to `STEP.unreadable-TIME` (kept for inspection, out of orbax's step list so
        new saves can reuse its step) and the previous one is used. If no checkpoint can be
        read, nothing is moved: that points at a config that no longer matches, not at damage.
        Saves that never finished are not candidates: orbax renames a checkpoint into place
        only once it is complete.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        unreadable = []
        hook = sys.unraisablehook
        sys.unraisablehook = dropping_abandoned_reads(hook)  # kept for the rest of the process once a read fails
        try:
            for step in steps:
                try:
                    # A damaged checkpoint is reported here in one line; orbax's error log of it would repeat that.
                    with orbax_logs_at_most(logging.CRITICAL):
                        value = read(step)
                except Exception as e:  # tensorstore and orbax raise many types for damaged files
                    report(f"checkpoint at step {step} is unreadable ({type(e).__name__}: {first_line(e)}); "
                           "trying an earlier one")
                    unreadable.append(step)
                    continue
                self._set_aside(unreadable, report)
                return step, value
        finally:
            if not unreadable:
                sys.unraisablehook = hook
        if steps:
            raise CheckpointError(
                f"none of the checkpoints {steps} in {self.manager.directory} can be read with this config"
            )
        return None

    def _set_aside(self, steps: list[int], report: Callable[[str], None]) -> None:
        if not steps or jax.process_index() != 0:
            return
        for step in steps:
            path = self.manager.directory / str(step)
            # On an object store a checkpoint is complete while it holds orbax's commit marker (there is no
            # rename to make it appear at once): deleting the marker takes the step out of orbax's list in
            # one request, before its files are moved aside object by object.
            if storage.is_remote(path):
                (path / COMMIT_MARKER).unlink(missing_ok=True)
            storage.move_tree(path, path.with_name(f"{step}.unreadable-{int(time.time())}"))
            report(f"moved the unreadable checkpoint of step {step} aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

"""Where metrics go: metrics.jsonl (one object per logged step), TensorBoard events, the console."""

from __future__ import annotations

import json
import math
import shutil
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from train import storage

LN2 = math.log(2.0)


def _step_of(line: bytes) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line from a killed run (even cut inside a character): dropped


class MetricsWriter:
    """Appends to RUN_DIR/metrics.jsonl and writes TensorBoard scalars. Only the main process writes.

    An object in a bucket cannot be appended to: for a gs:// run directory both are written in a local
    staging directory and uploaded whole by `sync` (at every checkpoint, at the end, and at a log line when
    SYNC_SECONDS have passed), so the bucket holds every line up to the last checkpoint at least."""

    SYNC_SECONDS = 30.0

    def __init__(self, run_dir, keep_through_step: int = 0, enabled: bool = True):
        """`keep_through_step`: on resume, lines after the restored step are dropped (they will be redone)."""
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.remote, local = None, run_dir
        if storage.is_remote(run_dir):
            self.remote, local = run_dir, storage.staging_dir(run_dir, "outputs")
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True)
            if (run_dir / "metrics.jsonl").is_file():
                (local / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
        self.local, self.synced = local, time.monotonic()
        path = local / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_bytes().splitlines() if _step_of(line) <= keep_through_step]
            path.write_bytes(b"".join(line + b"\n" for line in kept))
        self.jsonl = open(path, "a", buffering=1)
        self.tensorboard = SummaryWriter(logdir=str(local / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, list):  # one series per element, e.g. each expert's load
                for i, v in enumerate(value):
                    self.tensorboard.add_scalar(f"{key}/{i}", v, step)
            else:
                self.tensorboard.add_scalar(key, value, step)
        if self.remote is not None and time.monotonic() - self.synced > self.SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        """Upload metrics.jsonl and the TensorBoard events to a gs:// run directory (nothing to do locally)."""
        if not self.enabled or self.remote is None:
            return
        self.jsonl.flush()
        self.tensorboard.flush()
        self._upload()

    def _upload(self) -> None:
        for file in storage.files_under(self.local):
            target = self.remote / str(file.relative_to(self.local))
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.upload(file, target)
        self.synced = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
            if self.remote is not None:
                self._upload()


def format_line(step: int, values: dict[str, float]) -> str:
    parts = [f"step {step}"]
    for key, value in values.items():
        if isinstance(value, list):
            parts.append(f"{key} max {max(value):.3g} min {min(value):.3g}")
        else:
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


class ConsoleReporter:
    """A rich progress bar with ETA on a terminal; plain log lines otherwise (files, CI)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True, console: Console | None = None):
        self.console = console or Console()
        self.enabled = enabled
        self.progress = None
        if enabled and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)

    def step(self, step: int, values: dict[str, float] | None = None) -> None:
        if self.progress is not None:
            status = f"loss {values['loss']:.3f}" if values and "loss" in values else None
            self.progress.update(self.task, completed=step, **({"status": status} if status else {}))
        if values is not None:
            self.log(format_line(step, values))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

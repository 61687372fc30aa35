"""The job a launcher runs on every process, and the checks that it fits the processes and devices."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from infra.mesh import resolve_mesh
from train import storage
from train.config import ConfigError, ExperimentConfig

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_env(items: list[str]) -> dict[str, str]:
    """`--env NAME=VALUE` options as a mapping; the names must be shell variable names."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--env {item!r} must be NAME=VALUE")
        pairs[key] = value
    check_env(pairs)
    return pairs


def check_env(env: dict[str, str]) -> None:
    for key in env:
        if not ENV_NAME.fullmatch(key):
            raise ConfigError(f"--env {key}=...: {key!r} is not a shell variable name (letters, digits, _)")


@dataclass(frozen=True)
class Job:
    argv: tuple[str, ...]  # the tessera command line without `tessera`: ("train", "recipe.yaml", "train.steps=9")
    cfg: ExperimentConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)

    @property
    def launch_dir(self) -> Path:
        """Where the launcher writes its own files (logs, scripts, manifests): the run directory, or for a gs://
        run directory a local one standing in for it (schedulers write logs to a filesystem)."""
        return storage.local_stand_in(self.cfg.run.dir, "launch")

    def check_shared_run_dir(self, hosts: int, where: str) -> None:
        """A job on several hosts checkpoints where all of them write: a bucket, not a host's own disk."""
        if hosts > 1 and not storage.is_remote(self.cfg.run.dir):
            raise ConfigError(
                f"{where} runs on {hosts} hosts, which share no filesystem: run.dir={self.cfg.run.dir} would be "
                f"{hosts} different directories; use a bucket, e.g. run.dir=gs://BUCKET/runs/{self.run_dir.name}"
            )

    def shell_words(self) -> str:
        """The job as one shell command line, every word quoted: a config value is data, never code."""
        return " ".join(shlex.quote(word) for word in ("tessera", *self.argv))


def check_fits(job: Job, processes: int, devices_per_process: int, where: str) -> None:
    """The job's mesh and batch must match `processes` x `devices_per_process` devices; says how if not.
    Run before any process exists; inside the job, TrainProgram.check_process_rows checks the placement itself."""
    if processes < 1 or devices_per_process < 1:
        raise ConfigError(f"{where}: process and device counts must be positive, got {processes} x {devices_per_process}")
    total = processes * devices_per_process
    try:
        tensor = resolve_mesh(job.cfg, total)["tensor"]
    except ConfigError as e:
        raise ConfigError(
            f"{where} gives {processes} processes x {devices_per_process} devices = {total} devices, "
            f"which does not fit the job's mesh: {e}"
        ) from None
    if processes > 1 and (devices_per_process % tensor or job.cfg.mesh.dcn_tensor > 1):
        raise ConfigError(
            f"mesh.tensor={tensor} (mesh.dcn_tensor={job.cfg.mesh.dcn_tensor}) would span processes of "
            f"{devices_per_process} devices; keep the tensor axis within one process (a divisor of "
            f"{devices_per_process}, dcn_tensor=1): each process feeds only its own rows of the batch"
        )
    # The batch then splits evenly over the processes: they divide the data-parallel axes, which divide it.

"""`tessera launch slurm`: an sbatch script that runs the job as one task per GPU (or per node).

Every task runs the same `tessera` command under `srun`; jax's SLURM detection reads the
job step's variables (task id, task count, first node as coordinator), and
`infra.distributed` joins the job. The script lives in RUN_DIR/slurm/, the job id beside it,
and each task logs to RUN_DIR/logs/slurm-JOBID-task-K.log.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra import distributed
from infra.launch.job import Job, check_env, check_fits
from train.config import ConfigError

# #SBATCH lines are read by sbatch, not a shell: values are kept to characters that need no quoting.
DIRECTIVE_VALUE = re.compile(r"[A-Za-z0-9_.:,@+=/-]+")


@dataclass(frozen=True)
class SlurmRequest:
    nodes: int
    gpus_per_node: int = 0  # 0: CPU tasks
    tasks_per_node: int = 1  # CPU only; with GPUs there is one task per GPU
    cpu_devices: int = 1  # CPU only: emulated devices per task
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    container: str | None = None  # an image for pyxis/enroot (`srun --container-image`)
    env: tuple[tuple[str, str], ...] = ()

    @property
    def tasks(self) -> int:
        return self.nodes * (self.gpus_per_node or self.tasks_per_node)

    @property
    def devices_per_task(self) -> int:
        return 1 if self.gpus_per_node else self.cpu_devices


def _directive(option: str, value: str | int | None) -> list[str]:
    if value is None:
        return []
    if not DIRECTIVE_VALUE.fullmatch(str(value)):
        raise ConfigError(f"--{option}={value!r} has characters an #SBATCH line cannot hold; use letters, digits and _.:,@+=/-")
    return [f"#SBATCH --{option}={value}"]


def script_dir(run_dir: Path) -> Path:
    return run_dir / "slurm"


def render_script(job: Job, request: SlurmRequest) -> str:
    check_fits(job, request.tasks, request.devices_per_task, f"--nodes {request.nodes} x "
               + (f"--gpus-per-node {request.gpus_per_node}" if request.gpus_per_node
                  else f"{request.tasks_per_node} tasks x {request.cpu_devices} CPU devices"))
    per_node = request.gpus_per_node or request.tasks_per_node
    lines = [
        "#!/bin/bash",
        *_directive("job-name", "tessera-" + re.sub(r"[^A-Za-z0-9_.-]", "-", job.run_dir.name or "run")),
        *_directive("nodes", request.nodes),
        *_directive("ntasks-per-node", per_node),
        *_directive("gpus-per-node", request.gpus_per_node or None),
        *_directive("partition", request.partition),
        *_directive("time", request.time),
        *_directive("account", request.account),
        # SIGTERM two minutes before the time limit: every task finishes its step and checkpoints.
        "#SBATCH --signal=TERM@120",
        "# Rendered by `tessera launch slurm`; every task runs the command below as one jax job.",
        "set -euo pipefail",
    ]
    env = dict(request.env)
    if request.gpus_per_node:
        # One process per GPU: jax picks the GPU by SLURM_LOCALID; NCCL carries the collectives.
        env.setdefault("NCCL_DEBUG", "WARN")
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    else:
        env.update({distributed.CPU_DEVICES: str(request.cpu_devices), "JAX_PLATFORMS": "cpu"})
    check_env(env)
    for key, value in env.items():
        lines.append(f"export {key}={shlex.quote(value)}")
    logs = shlex.quote(str(job.launch_dir / "logs" / "slurm-%j-task-%t.log"))
    srun = ["srun", "--kill-on-bad-exit=1", f"--output={logs}"]
    if request.container:
        here = shlex.quote(str(Path.cwd()))
        srun += [f"--container-image={shlex.quote(request.container)}", f"--container-mounts={here}:{here}",
                 f"--container-workdir={here}"]
    lines.append(" ".join(srun) + " " + job.shell_words())
    return "\n".join(lines) + "\n"


def submit_command(job: Job, script: Path) -> list[str]:
    batch_log = job.launch_dir / "logs" / "slurm-%j.log"
    return ["sbatch", "--parsable", f"--chdir={Path.cwd()}", f"--output={batch_log}", str(script)]


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ConfigError(f"{tool} is not on PATH: run this on a SLURM login node, or use --dry-run to print the script")
    return path


def launch_slurm(job: Job, request: SlurmRequest, dry_run: bool) -> int:
    script = render_script(job, request)
    path = script_dir(job.launch_dir) / "job.sbatch"
    command = submit_command(job, path)
    if dry_run:
        print(script, end="")
        print(f"# submit with:\n{shlex.join(command)}")
        return 0
    _need("sbatch")
    path.parent.mkdir(parents=True, exist_ok=True)
    (job.launch_dir / "logs").mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise ConfigError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    (path.parent / "job_id").write_text(job_id + "\n")
    print(f"submitted SLURM job {job_id}: script {path}, task logs {job.run_dir / 'logs'}/slurm-{job_id}-task-K.log")
    return 0


def job_id_of(run_dir: Path) -> str:
    path = script_dir(run_dir) / "job_id"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no submitted SLURM job ({path} is missing); launch one with tessera launch slurm")
    return path.read_text().strip()


def job_state(job_id: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(state, exit code) of a job, from the controller: PENDING, RUNNING, COMPLETED, FAILED, ...
    `env`: the client environment (SLURM_CONF) when it is not this process's own."""
    _need("scontrol")
    done = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env)
    if done.returncode:
        raise ConfigError(f"SLURM does not know job {job_id} (any more): {done.stderr.strip()}")
    fields = dict(re.findall(r"(\w+)=(\S+)", done.stdout))
    return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "?")


def status(run_dir: Path) -> int:
    """squeue's line while the job is queued or running; the controller's final state after."""
    job_id = job_id_of(run_dir)
    _need("squeue")
    queued = subprocess.run(["squeue", f"--jobs={job_id}", "--noheader", "--format=%i %T %M %D %R"],
                            capture_output=True, text=True).stdout.strip()
    if queued:
        print(f"SLURM job {queued} (id, state, time, nodes, nodes or reason)")
        return 0
    state, code = job_state(job_id)
    print(f"SLURM job {job_id}: {state} (exit code {code})")
    return 0


def cancel(run_dir: Path) -> int:
    job_id = job_id_of(run_dir)
    _need("scancel")
    done = subprocess.run(["scancel", job_id], capture_output=True, text=True)
    if done.returncode:
        raise ConfigError(f"scancel {job_id} failed: {done.stderr.strip()}")
    print(f"cancelled SLURM job {job_id}")
    return 0

"""`tessera launch tpu-vm`: Cloud TPU slices from a queued resource, the job on every worker.

One queued resource holds the slice (or, for `v5e-256x2`, K slices named NAME-0 .. NAME-{K-1},
which Cloud TPU joins over DCN). The project is copied to ~/tessera on every worker and
installed there; then `gcloud ... ssh --worker=all` runs the same `tessera` command on every
host with TESSERA_DISTRIBUTED=auto, and jax finds its peers (and the other slices) itself.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from infra import distributed
from infra.launch.job import Job, check_env, check_fits
from infra.launch.local import exit_code
from infra.targets import TpuSlice
from train.config import ConfigError

RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "~/tessera"  # left unquoted in remote commands so the worker's shell expands ~
# Tessera needs Python 3.11; the stock TPU VM images (Ubuntu 22.04) have 3.10, and 3.11 from Ubuntu's archive.
VENV = "~/tessera-venv"
INSTALL = (f"sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv && "
           f"python3.11 -m venv {VENV} && {VENV}/bin/pip install -q -e '.[tpu]'")
REMOTE_PATH = 'export PATH="$HOME/tessera-venv/bin:$PATH"'
NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
FAILED_STATES = ("FAILED", "SUSPENDING", "SUSPENDED")


def check_name(name: str, what: str = "--name") -> None:
    """Cloud TPU node ids and Kubernetes names (pod hostnames add suffixes to it) both accept this."""
    if len(name) > 40 or not NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} is not a valid name: use a DNS-1123 label of at most 40 characters, lowercase "
            "letters, digits and '-', starting with a letter and not ending with '-' (e.g. tessera-run1)"
        )


def check_slices(job: Job, tpu: TpuSlice) -> None:
    """The job fits the slice(s), and with several slices it says which mesh axes span the DCN between them."""
    check_fits(job, tpu.hosts * tpu.slices, tpu.chips_per_host, f"--tpu {tpu.name}")
    dcn = job.cfg.mesh.dcn_sizes()
    product = math.prod(dcn.values())
    given = " ".join(f"mesh.dcn_{axis}={size}" for axis, size in dcn.items() if size != 1) or "none"
    if tpu.slices > 1 and product != tpu.slices:
        raise ConfigError(
            f"--tpu {tpu.name} is {tpu.slices} slices joined over DCN: the mesh.dcn_* sizes must multiply to "
            f"{tpu.slices} (given: {given}); add mesh.dcn_data={tpu.slices} to split data parallelism across them"
        )
    if tpu.slices == 1 and product != 1:
        raise ConfigError(
            f"--tpu {tpu.name} is one slice but the mesh splits axes across slices ({given}); "
            f"remove them, or ask for several slices such as --tpu {tpu.generation}-{tpu.count}x{product}"
        )
    job.check_shared_run_dir(tpu.hosts * tpu.slices, f"--tpu {tpu.name}")


def config_path(job: Job) -> str | None:
    """The CONFIG (file or run directory) the job names: its first positional word that is not an override."""
    word = next((w for w in job.argv[1:] if not w.startswith("-")), None)
    return None if word is None or "=" in word else word


def _check_config_in(job: Job, project_root: Path) -> None:
    path = config_path(job)
    if path is None:
        return
    root = project_root.resolve()
    remote = (root / path).resolve()
    if Path(path).is_absolute() or not remote.is_relative_to(root) or not remote.exists():
        raise ConfigError(
            f"the job's config {path!r} must be a relative path to a file inside the project ({root}): only the "
            "project is copied to the TPU VMs; move it there and name it like configs/experiments/tiny.yaml"
        )
    if Path(path).resolve() != remote:
        raise ConfigError(
            f"run tessera launch tpu-vm from the project root ({root}): the job's config {path!r} is read there "
            "on the TPU VMs, but here it names a different file"
        )


@dataclass(frozen=True)
class TpuVmPlan:
    create: list[str]
    wait: list[str]  # prints the queued resource's state; poll until ACTIVE
    copy: list[list[str]]  # one per slice node
    install: list[list[str]]
    run: list[list[str]]
    delete: list[str]

    def shell(self) -> str:
        """Every command as one shell line, each step under a comment; what --dry-run prints."""
        steps = [
            ("create the TPU slice(s) as a queued resource", [self.create]),
            ("wait until this prints ACTIVE (it may queue for capacity)", [self.wait]),
            ("copy this project to ~/tessera on every worker", self.copy),
            ("install it on every worker", self.install),
            ("run the job on every worker"
             + ("; start these together, every slice must join" if len(self.run) > 1 else ""), self.run),
            ("delete the slice(s) when done (they are billed until then)", [self.delete]),
        ]
        return "\n".join(f"# {comment}\n" + "\n".join(shlex.join(argv) for argv in argvs) for comment, argvs in steps)


def remote_command(job: Job, env: dict[str, str]) -> str:
    """The shell line each worker runs: every user-given word quoted, so it stays data."""
    assignments = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    return f"cd {REMOTE_DIR} && {REMOTE_PATH} && {assignments} {job.shell_words()}"


def plan_tpu_vm(job: Job, tpu: TpuSlice, *, name: str, zone: str, project: str, spot: bool = False,
                runtime_version: str | None = None, env: dict[str, str] | None = None,
                project_root: Path) -> TpuVmPlan:
    check_name(name)
    check_env(env or {})
    check_slices(job, tpu)
    _check_config_in(job, project_root)
    where = ["--zone", zone, "--project", project]
    queued = ["gcloud", "compute", "tpus", "queued-resources"]
    create = [*queued, "create", name, "--accelerator-type", tpu.accelerator_type,
              "--runtime-version", runtime_version or RUNTIME_VERSIONS[tpu.generation]]
    if tpu.slices > 1:
        create += ["--node-count", str(tpu.slices), "--node-prefix", name]
        nodes = [f"{name}-{i}" for i in range(tpu.slices)]
    else:
        create += ["--node-id", name]
        nodes = [name]
    create += ["--spot"] if spot else []
    command = remote_command(job, {distributed.MODE: "auto", **(env or {})})
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    return TpuVmPlan(
        create=create + where,
        wait=[*queued, "describe", name, *where, "--format=value(state.state)"],
        copy=[["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "--worker=all", str(project_root),
               f"{node}:{REMOTE_DIR}", *where] for node in nodes],
        install=[[*ssh, node, "--worker=all", f"--command=cd {REMOTE_DIR} && {INSTALL}", *where] for node in nodes],
        # -tt: a pseudo-terminal, so that ending the local ssh hangs up (ends) the remote job too.
        run=[[*ssh, node, "--worker=all", f"--command={command}", *where, "--", "-tt"] for node in nodes],
        delete=[*queued, "delete", name, "--force", "--quiet", *where],
    )


def _say(what: str, argv: list[str]) -> None:
    print(f"tessera: {what}: {shlex.join(argv)}", flush=True)


def _wait_active(plan: TpuVmPlan, poll_seconds: float) -> int:
    last = None
    while True:
        done = subprocess.run(plan.wait, capture_output=True, text=True)
        if done.returncode:
            print(f"tessera: describing the queued resource failed: {done.stderr.strip()}", file=sys.stderr)
            return done.returncode
        state = done.stdout.strip()
        if state == "ACTIVE":
            return 0
        if state in FAILED_STATES:
            print(f"tessera: the queued resource is {state}, so the slices will not start; see why with: "
                  f"{shlex.join(plan.wait[:-1])}", file=sys.stderr)
            return 1
        if state != last:
            print(f"tessera: queued resource is {state or 'not reported yet'}; checking every {poll_seconds:g}s",
                  flush=True)
            last = state
        time.sleep(poll_seconds)


def _run_all(commands: list[list[str]], poll_seconds: float = 1.0) -> int:
    """Every slice's workers at once (multislice needs them all to join). One failing ends the others, which
    would otherwise wait in a collective for it; returns its exit code."""
    # Each in its own process group: stopping one stops gcloud and the ssh clients it started.
    procs = [subprocess.Popen(argv, start_new_session=True) for argv in commands]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((i for i, code in enumerate(codes) if code), None)
            if failed is not None or all(code == 0 for code in codes):
                break
            time.sleep(poll_seconds)
    finally:
        for p in procs:  # ending the ssh session (a pseudo-terminal) hangs up its remote command
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait()
    if failed is None:
        return 0
    code = exit_code(procs[failed].returncode)
    # commands[i][5] is the node `gcloud compute tpus tpu-vm ssh` reaches.
    print(f"tessera: the job on {commands[failed][5]} exited with code {code}; stopped the others", file=sys.stderr)
    return code


def _steps(plan: TpuVmPlan, poll_seconds: float) -> int:
    if code := _wait_active(plan, poll_seconds):
        return code
    for what, argv in [("copying", a) for a in plan.copy] + [("installing", a) for a in plan.install]:
        _say(what, argv)
        if code := subprocess.run(argv).returncode:
            return code
    for argv in plan.run:
        _say("running", argv)
    return _run_all(plan.run, min(poll_seconds, 1.0))


def run_tpu_vm(plan: TpuVmPlan, *, delete_after: bool, poll_seconds: float = 30.0) -> int:
    """Create, wait, copy, install, run; with delete_after the slices are deleted however the run ends."""
    if shutil.which("gcloud") is None:
        raise ConfigError("gcloud is not on PATH: tessera launch tpu-vm drives the Google Cloud CLI "
                          "(install the Google Cloud CLI, or use --dry-run to print the commands)")
    _say("creating", plan.create)
    code = subprocess.run(plan.create).returncode
    if code:  # nothing of ours exists (it may be someone's resource of that name): nothing to delete
        return code
    deleted = 0
    try:
        code = _steps(plan, poll_seconds)
    finally:
        if delete_after:
            _say("deleting", plan.delete)
            deleted = subprocess.run(plan.delete).returncode
            if deleted:
                print(f"tessera: deleting failed, and the slices are billed until deleted: {shlex.join(plan.delete)}",
                      file=sys.stderr)
    if not delete_after:
        print(f"tessera: the slices are still up (billed); delete them with: {shlex.join(plan.delete)}", flush=True)
    return code or deleted

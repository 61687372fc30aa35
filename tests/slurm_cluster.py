"""A real one-node SLURM cluster on loopback for the tests: munged, slurmctld and slurmd, configured in a
temporary directory. Needs Debian's `slurm-wlm` and `munge` (`.ci/run` installs them)."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo")


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, host: str, user: str) -> str:
    cpus = max(2, os.cpu_count() or 2)
    return f"""\
ClusterName=tessera-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` is what a client (sbatch, squeue) needs."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        for d in ("munge", "state", "spool"):
            (self.root / d).mkdir(mode=0o700, parents=True, exist_ok=True)
        munge = self.root / "munge"
        subprocess.run([_tool("mungekey"), "--create", f"--keyfile={munge}/munge.key"], check=True)
        self._daemon([_tool("munged"), "--foreground", "--force", f"--key-file={munge}/munge.key",
                      f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
                      f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"])
        self._wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged")
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(slurm_conf(self.root, host, getpass.getuser()))
        self._daemon([_tool("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._daemon([_tool("slurmd"), "-D", "-f", str(self.conf), "-N", host])
        self._wait_for(self._node_idle, timeout, "the SLURM node")
        return self

    def _daemon(self, command: list[str]) -> None:
        log = open(self.root / f"{Path(command[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))
        log.close()

    def _node_idle(self) -> bool:
        done = subprocess.run([_tool("sinfo"), "--noheader", "--format=%t"], env=self.env, capture_output=True, text=True)
        return done.stdout.strip() == "idle"

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.2)
        logs = "\n".join(f"{p.name}: {p.read_text()[-800:]}" for p in sorted(self.root.glob("*.out")))
        self.stop()
        raise RuntimeError(f"{what} did not come up within {timeout:.0f}s:\n{logs}")

    def job_state(self, job_id: str) -> tuple[str, str]:
        """(state, exit code) as scontrol reports them, through the launcher's own query."""
        from infra.launch.slurm import job_state

        return job_state(job_id, self.env)

    def wait_for_job(self, job_id: str, timeout: float) -> tuple[str, str]:
        """Block until the job ends; its final (state, exit code)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state, code = self.job_state(job_id)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return state, code
            time.sleep(0.5)
        raise TimeoutError(f"SLURM job {job_id} still running after {timeout:.0f}s")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

"""`tessera launch local`: N processes on this machine forming one real multi-host JAX job.

Each process emulates D CPU devices and joins the others through jax.distributed (gloo
collectives), exactly as hosts of a cluster would: this is the rehearsal before a cluster.
Process 0's output streams here; the others write RUN_DIR/logs/process-K.log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from infra import distributed
from infra.launch.job import Job

POLL_SECONDS = 0.05
GRACE_SECONDS = 10.0  # after one process fails, how long the others get to exit before they are killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, processes: int, devices_per_process: int, port: int) -> dict[str, str]:
    return {
        **os.environ,
        distributed.COORDINATOR: f"127.0.0.1:{port}",
        distributed.NUM_PROCESSES: str(processes),
        distributed.PROCESS_ID: str(index),
        distributed.CPU_DEVICES: str(devices_per_process),
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",  # process 0's lines stream as they come, even through a pipe
    }


def exit_code(returncode: int) -> int:
    """A process killed by signal N reads as 128 + N, as a shell reports it."""
    return 128 - returncode if returncode < 0 else returncode


def run_local(job: Job, processes: int, devices_per_process: int, grace_seconds: float = GRACE_SECONDS) -> int:
    logs = job.launch_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "infra.cli", *job.argv]
    print(f"launching {processes} processes x {devices_per_process} CPU devices: {job.shell_words()}; "
          f"process 0 below, the others in {logs}/process-K.log", flush=True)
    files, procs = [], []
    try:
        for index in range(processes):
            out = None
            if index:
                out = open(logs / f"process-{index}.log", "w")
                files.append(out)
            # Own session: a terminal's Ctrl-C reaches the launcher only, which forwards it once to each.
            procs.append(subprocess.Popen(
                command, env=process_env(index, processes, devices_per_process, port), stdout=out,
                stderr=subprocess.STDOUT if out else None, start_new_session=True,
            ))
        return _supervise(procs, grace_seconds)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()


def _supervise(procs: list[subprocess.Popen], grace_seconds: float) -> int:
    def forward(signum, frame):
        # A closed terminal (SIGHUP) stops the job cleanly too: the processes checkpoint on SIGTERM.
        sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        for p in procs:
            if p.poll() is None:
                p.send_signal(sent)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            # Of processes found failed together, one killed by a signal is the likelier cause.
            failed = sorted(((c >= 0, i, c) for i, c in enumerate(codes) if c not in (None, 0)))
            if failed:
                _, index, code = failed[0]
                print(f"tessera: process {index} exited with code {exit_code(code)}; stopping the others",
                      file=sys.stderr, flush=True)
                _stop(procs, grace_seconds)
                return exit_code(code)
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_SECONDS)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(procs: list[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM (a process that can still checkpoint does), then SIGKILL for any left after the grace time:
    a peer waiting in a collective for the dead process would otherwise wait for the heartbeat timeout."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_SECONDS)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()

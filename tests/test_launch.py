"""Multi-process jobs: distributed start-up, `tessera launch local`, and SLURM on a real local cluster."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from infra.distributed import DistributedSettings, settings_from_env
from infra.commands.launch import parse_job
from infra.launch.slurm import SlurmRequest, render_script
from tests.conftest import PLANTED_SECRET, TINY_DATA, TINY_MODEL, mesh_for, refused, secret_leaks
from tests.slurm_cluster import SlurmCluster, missing_tools
from train.checkpoint import Checkpointer
from train.config import ConfigError
from train.recipes import load_config
from train.program import build_program

JOB = [*TINY_MODEL, *TINY_DATA, "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1",
       "train.steps=6", "checkpoint.every=3", "mesh.data=-1"]
# Runs stopped by the tests rather than by their length; local and SLURM share it, so the
# two-process program compiles once (the compilation cache) for both.
LONG = [*JOB, "train.steps=100000", "checkpoint.every=2"]


def tessera(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "infra.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {m["step"]: m for m in lines if "loss" in m}


# ---------------------------------------------------------------- start-up settings


def test_distributed_settings_from_the_environment():
    explicit = {"TESSERA_COORDINATOR_ADDRESS": "10.0.0.1:1234", "TESSERA_NUM_PROCESSES": "4", "TESSERA_PROCESS_ID": "3",
                "TESSERA_LOCAL_DEVICE_IDS": "0,1", "TESSERA_CPU_DEVICES": "2"}
    assert settings_from_env(explicit) == DistributedSettings("explicit", "10.0.0.1:1234", 4, 3, (0, 1), 2)
    assert settings_from_env({}) == DistributedSettings("single")
    assert settings_from_env({"TESSERA_DISTRIBUTED": "auto"}).mode == "auto"
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert settings_from_env({**step, "SLURM_NTASKS": "2"}).mode == "auto"  # a job step of several tasks
    assert settings_from_env({**step, "SLURM_NTASKS": "1"}).mode == "single"
    assert settings_from_env({**step, "SLURM_NTASKS": "2", "TESSERA_DISTRIBUTED": "off"}).mode == "single"
    for env, message in [
        ({**explicit, "TESSERA_PROCESS_ID": "4"}, "TESSERA_PROCESS_ID=4 must be below TESSERA_NUM_PROCESSES=4"),
        ({"TESSERA_NUM_PROCESSES": "2"}, "TESSERA_COORDINATOR_ADDRESS, TESSERA_PROCESS_ID is not"),
        ({**explicit, "TESSERA_NUM_PROCESSES": "two"}, "TESSERA_NUM_PROCESSES='two' must be an integer >= 1"),
        ({"TESSERA_DISTRIBUTED": "yes"}, "use 'auto'"),
        ({"TESSERA_CPU_DEVICES": "0"}, "TESSERA_CPU_DEVICES='0' must be an integer >= 1"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            settings_from_env(env)


# ---------------------------------------------------------------- local multi-process


def _process_with(*variables: str, parent: int | None = None) -> int:
    """The pid of the `tessera train` process whose environment holds every NAME=VALUE given."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if (parent in (None, ppid) and b"train" in command
                and all(v.encode() in environ for v in variables)):
            return int(stat.parent.name)
    raise LookupError(f"no process with {variables}")


def wait_for_step(run: Path, step: int, alive, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "metrics.jsonl").is_file() or max(metrics(run), default=0) < step:
        assert alive(), "the run ended early"
        assert time.monotonic() < deadline, f"the run did not reach step {step}"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_local_processes_train_like_one_and_a_killed_process_fails_the_job(tmp_path, rules):
    """One long launch: its first steps are compared with one process, then process 1 is killed."""
    from train.loop import train

    run, ref = tmp_path / "run", tmp_path / "ref"
    # A token in the launcher's environment reaches every process (and their logs' writers), never the run's files.
    launcher = tessera("launch", "local", *LONG, f"run.dir={run}", "--processes", "2", "--devices-per-process", "4",
                       env={**os.environ, "HF_TOKEN": PLANTED_SECRET, "WANDB_API_KEY": PLANTED_SECRET})
    # Meanwhile, the same job in this process on 8 devices (same seed, same global batch), stopped after 6 steps.
    cfg = load_config(None, [*LONG, f"run.dir={ref}"])
    calls = iter(range(1, 100))
    assert train(cfg, mesh_for(cfg), rules, stop_requested=lambda: next(calls) >= 5)["stopped_at"] == 6

    wait_for_step(run, 9, alive=lambda: launcher.poll() is None)
    two, one = metrics(run), metrics(ref)
    steps = list(range(1, 7))
    # Only the order of float32 sums differs (gloo across processes vs one process); measured <= 1e-7.
    np.testing.assert_allclose([two[s]["loss"] for s in steps], [one[s]["loss"] for s in steps], rtol=1e-5)
    np.testing.assert_allclose([two[s]["grad_norm"] for s in steps], [one[s]["grad_norm"] for s in steps], rtol=1e-5)
    assert two[9]["loss"] < two[1]["loss"]

    # SIGKILL process 1 mid-run: the launcher must fail fast, not hang.
    os.kill(_process_with("TESSERA_PROCESS_ID=1", parent=launcher.pid), signal.SIGKILL)
    killed = time.monotonic()
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and "process 1 exited with code 137" in out, out[-3000:]
    assert time.monotonic() - killed < 60
    assert "on 8 devices in 2 processes" in out and (run / "logs" / "process-1.log").is_file()
    assert secret_leaks(run, out) == []
    # The newest checkpoint that completed restores (the save in flight may have been cut off).
    program = build_program(cfg, mesh_for(cfg), rules)
    step, _, _ = Checkpointer(run / "checkpoints", cfg.checkpoint).restore_latest(program.abstract_state(), print)
    assert step >= 6


def test_the_local_launcher_stops_every_process_when_one_fails():
    from infra.launch.local import _supervise, exit_code, process_env

    env = process_env(1, 2, 4, 12345)
    assert (env["TESSERA_PROCESS_ID"], env["TESSERA_NUM_PROCESSES"], env["TESSERA_CPU_DEVICES"]) == ("1", "2", "4")
    assert env["TESSERA_COORDINATOR_ADDRESS"] == "127.0.0.1:12345" and exit_code(-9) == 137 and exit_code(3) == 3
    sleeper = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, lambda *a: exit(143)); time.sleep(60)"]
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]
    failing = [sys.executable, "-c", "import time; time.sleep(0.5); exit(3)"]
    procs = [subprocess.Popen(c) for c in (sleeper, stubborn, failing)]
    start = time.monotonic()
    assert _supervise(procs, grace_seconds=1.0) == 3  # the failed process's code
    assert time.monotonic() - start < 10
    assert [p.returncode for p in procs] == [143, -signal.SIGKILL, 3]  # SIGTERM, then SIGKILL after the grace time


# ---------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    missing = missing_tools()
    if missing:
        why = f"a local SLURM cluster needs Debian's slurm-wlm and munge; missing {missing}"
        if os.environ.get("TESSERA_REQUIRE_SLURM"):
            pytest.fail(why)
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_slurm_job_on_a_real_cluster_trains_as_one_job_and_resumes(slurm_cluster, tmp_path, rules):
    """2 tasks x 4 CPU devices under srun; SIGTERM to task 1 alone stops both at one step with a checkpoint."""
    from train.loop import train

    run = tmp_path / "run"
    # sbatch passes its environment, this token included, to every task; none of the run's files may hold it.
    submit = tessera("launch", "slurm", *LONG, f"run.dir={run}", "--nodes", "1", "--tasks-per-node", "2",
                     "--cpu-devices", "4", env={**slurm_cluster.env, "HF_TOKEN": PLANTED_SECRET})
    out, _ = submit.communicate(timeout=60)
    assert submit.returncode == 0, out
    job_id = re.search(r"submitted SLURM job (\d+)", out).group(1)
    assert (run / "slurm" / "job_id").read_text().strip() == job_id
    task0 = run / "logs" / f"slurm-{job_id}-task-0.log"
    wait_for_step(run, 5, alive=lambda: slurm_cluster.job_state(job_id)[0] in ("PENDING", "RUNNING"))
    os.kill(_process_with(f"SLURM_JOB_ID={job_id}", "SLURM_PROCID=1"), signal.SIGTERM)
    state, code = slurm_cluster.wait_for_job(job_id, timeout=120)
    assert (state, code) == ("COMPLETED", "0:0"), task0.read_text()[-3000:]
    log = task0.read_text()
    assert "on 8 devices in 2 processes" in log
    stopped = int(re.search(r"stopped by a signal to another process at step (\d+)", log).group(1))
    assert (run / "checkpoints" / str(stopped)).is_dir()
    losses = {s: m["loss"] for s, m in metrics(run).items()}
    assert sorted(losses) == list(range(1, stopped + 1)) and losses[stopped] < losses[1]
    status = tessera("launch", "slurm", "--status", str(run), env=slurm_cluster.env).communicate(timeout=30)[0]
    assert f"SLURM job {job_id}: COMPLETED" in status
    assert secret_leaks(run, out, status) == []

    # `tessera train`'s loop continues the SLURM run from its checkpoint (here in one process, 8 devices).
    cfg = load_config(None, [*LONG, f"run.dir={run}"])
    assert train(cfg, mesh_for(cfg), rules, stop_requested=lambda: True)["stopped_at"] == stopped + 2
    resumed = metrics(run)
    assert sorted(resumed) == list(range(1, stopped + 3))
    assert all(resumed[s]["loss"] == losses[s] for s in losses)


# ---------------------------------------------------------------- sbatch rendering and refusals


def test_sbatch_script_quotes_config_values_as_data(tmp_path):
    hostile = "run.dir=" + str(tmp_path / "a b; touch PWNED $(touch PWNED2) `touch PWNED3` 'q\"s")
    job = parse_job(None, [*JOB, hostile], [])
    script = tmp_path / "job.sbatch"
    script.write_text(render_script(job, SlurmRequest(nodes=2, tasks_per_node=2, cpu_devices=2)))
    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text(f'#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(tmp_path / "argv.json")!r}, "w"))\n')
    stub.chmod(0o755)
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[argv.index("tessera") + 1:] == list(job.argv)
    assert argv[0] == "--kill-on-bad-exit=1"
    assert not list(tmp_path.rglob("PWNED*"))
    assert "#SBATCH --nodes=2" in script.read_text() and "#SBATCH --ntasks-per-node=2" in script.read_text()


def test_gpu_sbatch_has_one_task_per_gpu_and_nccl_settings():
    script = render_script(parse_job(None, [*JOB, "run.dir=runs/x"], []),
                           SlurmRequest(nodes=2, gpus_per_node=4, partition="gpu", time="01:00:00", account="ml"))
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "#SBATCH --account=ml", "export NCCL_DEBUG=WARN"):
        assert line in script.splitlines()
    assert "TESSERA_CPU_DEVICES" not in script


@pytest.mark.parametrize("argv, expected", [
    (["launch", "slurm", *JOB, "--nodes", "3", "--tasks-per-node", "1", "--dry-run"],
     ["3 processes x 1 devices = 3 devices", "does not fit the job's mesh"]),
    (["launch", "slurm", *JOB, "mesh.data=4", "--nodes", "1", "--gpus-per-node", "8", "--dry-run"],
     ["8 devices", "multiply to 4"]),
    (["launch", "slurm", *JOB, "--nodes", "1", "--partition", "a b", "--dry-run"], ["--partition='a b'"]),
    (["launch", "slurm", *JOB, "--nodes", "1", "--env", "1X=2", "--dry-run"], ["shell variable name"]),
    (["launch", "slurm", *JOB], ["needs --nodes"]),
    (["launch", "local", *JOB, "--processes", "3", "--devices-per-process", "1"], ["3 processes"]),
    (["launch", "local", "--processes", "2", "--", "eval", "runs/x"], ["`tessera eval` cannot be launched"]),
    (["launch", "local", "configs/experiments/tiny.yaml", "--processes", "2", "--", "train"], ["either before `--`"]),
    (["launch", "tpu-vm", *JOB, "--tpu", "v7x-8", "--zone", "z", "--project", "p", "--dry-run"], ["unknown TPU type 'v7x-8'"]),
])
def test_launch_refusals(capsys, argv, expected):
    refused(capsys, argv, *expected)


def test_no_sbatch_on_path_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    refused(capsys, ["launch", "slurm", *JOB, f"run.dir={tmp_path / 'run'}", "--nodes", "1", "--cpu-devices", "8"],
            "sbatch is not on PATH", "--dry-run")
    refused(capsys, ["launch", "slurm", "--status", str(tmp_path)], "has no submitted SLURM job")


def test_multislice_mesh_trains_on_cpu(rules):
    """`mesh.dcn_data=2` on 8 CPU devices: two emulated slices of 4, the data axis split across them."""
    from infra.mesh import build_mesh

    cfg = load_config(None, [*JOB, "mesh.dcn_data=2", "mesh.tensor=2"])
    program = build_program(cfg, build_mesh(cfg), rules)
    tokens = np.random.default_rng(0).integers(4, 200, (cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
    rows = np.ones(tokens[:, 1:].shape, np.int32)
    batch = program.device_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": rows,
                                  "positions": np.cumsum(rows, axis=1, dtype=np.int32) - 1,
                                  "weights": rows.astype(np.float32)})
    state, losses = program.init_state(), []
    for _ in range(4):  # the same batch again and again: its loss must fall
        state, step_metrics = program.train_step(state, batch)
        losses.append(float(step_metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    # Which devices: splitting tensor across the slices puts tensor index t on slice t (devices 4t..4t+3),
    # where a plain mesh would put neighbours 2i, 2i+1 together.
    across = build_mesh(load_config(None, [*JOB, "mesh.dcn_tensor=2", "mesh.tensor=2"]))
    assert np.vectorize(lambda d: d.id)(across.devices)[:, 0, 0, :].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]

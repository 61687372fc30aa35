"""Runs survive kills, preemption, damaged checkpoints, bad steps and mesh changes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import TINY_DATA, TINY_MODEL, mesh_for, tiny_config
from train.checkpoint import CheckpointError, Checkpointer
from train.loop import Trainer, TrainingDiverged, train
from train.program import build_program

CLI_RUN = [*TINY_MODEL, *TINY_DATA, "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1",
           "optimizer.warmup_steps=5"]


def cli(run_dir, *args, devices=8):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "infra.cli", "train", *CLI_RUN, "mesh.data=-1", f"run.dir={run_dir}", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def losses(run_dir) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def wait_for_step(proc, run_dir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[1][-2000:]}"
        try:
            if max(losses(run_dir), default=0) >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def two_sources(root) -> list[str]:
    """A mixture of two prepared sources: the built-in corpus's first files and generated text."""
    from train.data.prepare import prepare
    from train.data.sources import FileSource, InMemorySource

    prepare(FileSource("stdlib", max_documents=60), "byte", root / "code")
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    prose = tuple((f"p{i}", " ".join(words[(i * j) % 5] for j in range(40 + i))) for i in range(80))
    prepare(InMemorySource(prose), "byte", root / "prose", heldout_fraction=0.1)
    return [f"data.mixture=[{{source: {root / 'code'}, weight: 0.7}}, {{source: {root / 'prose'}, weight: 0.3}}]"]


@pytest.mark.parametrize("devices, mixture", [(1, True), (8, False)])
@pytest.mark.slow
def test_sigkill_then_same_command_resumes_bit_exact(tmp_path, devices, mixture):
    """Batches are read ahead by threads (data.prefetch); the checkpoint holds the position after the last
    trained one. With one device, the data is a mixture of two prepared sources."""
    args = ["train.steps=40", "checkpoint.every=5", *(two_sources(tmp_path) if mixture else [])]
    reference = cli(tmp_path / "ref", *args, devices=devices)
    assert finish(reference)[0] == 0

    victim = cli(tmp_path / "run", *args, devices=devices)
    wait_for_step(victim, tmp_path / "run", 12)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rc, out, err = finish(cli(tmp_path / "run", *args, devices=devices))
    assert rc == 0, err[-2000:]
    resumed_at = int(re.search(r"resumed from .* at step (\d+)", out).group(1))
    assert 5 <= resumed_at < 40
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 41))
    assert all(got[s] == ref[s] for s in range(resumed_at + 1, 41)), "loss after resume differs from the uninterrupted run"
    if mixture:
        last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
        assert last["tokens_seen_code"] + last["tokens_seen_prose"] == last["tokens_seen"]
        assert abs(last["tokens_seen_code"] / last["tokens_seen"] - 0.7) < 0.05


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero_then_resumes(tmp_path):
    proc = cli(tmp_path, "train.steps=100000", "checkpoint.every=1000")
    wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc)
    assert rc == 0, err[-2000:]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", out).group(1))
    assert Checkpointer(tmp_path / "checkpoints", tiny_config().checkpoint).latest_step() == stopped
    # `tessera train RUN_DIR` continues the same run.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    again = subprocess.run([sys.executable, "-m", "infra.cli", "train", str(tmp_path), f"train.steps={stopped + 2}"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {stopped}" in again.stdout
    assert max(losses(tmp_path)) == stopped + 2


@pytest.mark.slow
def test_second_sigint_aborts_without_damaging_checkpoints(tmp_path, rules):
    # A wider model makes each step long enough for the second signal to land mid-run.
    proc = cli(tmp_path, "train.steps=100000", "checkpoint.every=2", "model.d_model=256", "model.d_ff=1024")
    wait_for_step(proc, tmp_path, 5)
    proc.send_signal(signal.SIGINT)
    seen = []
    while not any("SIGINT received" in line for line in seen):  # the handler has run: a new signal is not merged
        seen.append(proc.stderr.readline())
        assert seen[-1], "process ended before handling SIGINT"
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    assert rc == 130 and "interrupted" in err and "Traceback" not in "".join(seen) + err
    reports = []
    cfg = tiny_config("model.d_model=256", "model.d_ff=1024", tmp_path=tmp_path)
    program = build_program(cfg, mesh_for(cfg, 1), rules)
    step, _, _ = Checkpointer(tmp_path / "checkpoints", cfg.checkpoint).restore_latest(program.abstract_state(), reports.append)
    assert step >= 2 and reports == []  # the newest checkpoint is complete


# ------------------------------------------------------------ checkpoints on disk


@pytest.fixture
def two_checkpoints(tmp_path, rules):
    cfg = tiny_config("checkpoint.every=1", "checkpoint.async_save=false", tmp_path=tmp_path)
    program = build_program(cfg, mesh_for(cfg, 1), rules)
    state = program.init_state()
    ckpt = Checkpointer(tmp_path / "ckpt", cfg.checkpoint)
    ckpt.save(1, state, {"next_index": 1})
    state["step"] = state["step"] + 1
    ckpt.save(2, state, {"next_index": 2})
    ckpt.close()
    return cfg, program, tmp_path / "ckpt"


def test_unfinished_save_is_never_the_latest(two_checkpoints):
    cfg, program, directory = two_checkpoints
    # What a save killed half way leaves behind: a temporary directory, never renamed.
    partial = directory / "3.orbax-checkpoint-tmp-1234567"
    shutil.copytree(directory / "2", partial)
    ckpt = Checkpointer(directory, cfg.checkpoint)
    assert ckpt.latest_step() == 2
    step, state, data = ckpt.restore_latest(program.abstract_state(), print)
    assert step == 2 and int(state["step"]) == 1 and data == {"next_index": 2}


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_checkpoint_is_reported_and_the_previous_one_used(two_checkpoints, damage):
    cfg, program, directory = two_checkpoints
    data_files = [p for p in (directory / "2").rglob("*") if p.is_file() and p.stat().st_size > 0 and "_METADATA" not in p.name
                  and p.suffix != ".json"]
    assert data_files
    for p in data_files:
        if damage == "truncate":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
        else:
            p.unlink()
    reports = []
    ckpt = Checkpointer(directory, cfg.checkpoint)
    step, state, data = ckpt.restore_latest(program.abstract_state(), reports.append)
    assert step == 1 and data == {"next_index": 1} and int(state["step"]) == 0
    assert "step 2 is unreadable" in reports[0] and "moved the unreadable checkpoint of step 2 aside" in reports[1]
    # The damaged files are kept for inspection, out of the way: the run can save step 2 again.
    assert ckpt.latest_step() == 1 and any(p.name.startswith("2.unreadable-") for p in directory.iterdir())
    assert ckpt.save(2, state, {"next_index": 2}, force=True)
    ckpt.wait()
    assert ckpt.restore_latest(program.abstract_state(), reports.append)[0] == 2
    ckpt.close()


def test_config_that_no_longer_matches_moves_nothing(two_checkpoints, rules):
    cfg, _, directory = two_checkpoints
    other = build_program(tiny_config("optimizer.clip_norm=null", "checkpoint.every=1"), mesh_for(cfg, 1), rules)
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(CheckpointError, match="none of the checkpoints \\[2, 1\\].*can be read with this config"):
        Checkpointer(directory, cfg.checkpoint).restore_latest(other.abstract_state(), lambda _: None)
    assert sorted(p.name for p in directory.iterdir()) == before


# ------------------------------------------------------------ resharding restore


RESHARD_RUN = [*CLI_RUN[len(TINY_MODEL) + len(TINY_DATA):], "checkpoint.every=4"]


def continue_on(source, run_dir, layout, rules) -> dict[int, float]:
    """Copy a run stopped at step 4 and train step 5 on another mesh layout."""
    data, fsdp, tensor, n = layout
    shutil.copytree(source, run_dir)
    cfg = tiny_config(*RESHARD_RUN, "train.steps=5", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
                      f"run.dir={run_dir}")
    train(cfg, mesh_for(cfg, n), rules)
    return losses(run_dir)


@pytest.fixture(scope="module")
def run_on_2x2x2(tmp_path_factory):
    """A run checkpointed at step 4 on (data=2, fsdp=2, tensor=2), and its step-5 loss on that same mesh."""
    from infra.mesh import DEFAULT_RULES

    root = tmp_path_factory.mktemp("reshard")
    cfg = tiny_config(*RESHARD_RUN, "train.steps=4", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                      f"run.dir={root / 'run'}")
    train(cfg, mesh_for(cfg), dict(DEFAULT_RULES))
    same_mesh = continue_on(root / "run", root / "same", (2, 2, 2, 8), dict(DEFAULT_RULES))
    return root / "run", same_mesh[5]


@pytest.mark.parametrize("layout", [(1, 8, 1, 8), (4, 1, 1, 4)], ids=["fsdp8", "data4-on-4-devices"])
def test_checkpoint_restores_onto_other_meshes_and_training_continues(run_on_2x2x2, tmp_path, rules, layout):
    source, step5_on_same_mesh = run_on_2x2x2
    got = continue_on(source, tmp_path / "run", layout, rules)
    assert sorted(got) == [1, 2, 3, 4, 5]
    # float32 tolerance: a different layout sums the same numbers in a different order.
    np.testing.assert_allclose(got[5], step5_on_same_mesh, rtol=1e-5)


# ------------------------------------------------------------ bad steps


def poison_steps(trainer: Trainer, bad: set[int]):
    """Make the batches of the given steps produce NaN loss (NaN loss weights)."""
    original = trainer.next_batch
    counter = {"step": trainer.start}

    def next_batch(stop=False):
        counter["step"] += 1
        batch, position = original(stop)
        if counter["step"] in bad:
            batch = {**batch, "weights": batch["weights"] * np.nan}
        return batch, position

    trainer.next_batch = next_batch


def bad_step_trainer(tmp_path, rules, *overrides):
    cfg = tiny_config(*CLI_RUN[len(TINY_MODEL) + len(TINY_DATA):], "train.steps=10", "checkpoint.every=4",
                      "checkpoint.async_save=false", "train.max_bad_steps=2", *overrides, tmp_path=tmp_path)
    return Trainer(cfg, mesh_for(cfg, 1), rules)


def test_nonfinite_step_is_skipped_and_counted(tmp_path, rules):
    trainer = bad_step_trainer(tmp_path, rules)
    poison_steps(trainer, {3})
    result = trainer.run()
    assert result["skipped_nonfinite"] == 1 and result["steps"] == 10
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step3 = next(m for m in lines if m["step"] == 3 and "loss" in m)
    assert np.isnan(step3["loss"]) and step3["skipped_nonfinite_total"] == 1
    assert np.isfinite(losses(tmp_path)[10])


def test_bad_streak_restores_last_checkpoint_with_lower_lr(tmp_path, rules):
    trainer = bad_step_trainer(tmp_path, rules)
    poison_steps(trainer, {6, 7})
    result = trainer.run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    restore = next(m for m in lines if "restored_to_step" in m)
    assert restore == {"step": 7, "restored_to_step": 4, "lr_scale": 0.5}
    assert result["steps"] == 10 and float(trainer.state["guard"]["lr_scale"]) == 0.5
    assert int(trainer.state["guard"]["bad_streak"]) == 0 and result["skipped_nonfinite"] == 2
    after = [m for m in lines if m.get("step") == 5 and "loss" in m]
    assert len(after) == 2  # step 5 was trained, then redone after the restore
    assert after[1]["learning_rate"] == pytest.approx(after[0]["learning_rate"] * 0.5)


def test_bad_streak_can_stop_the_run(tmp_path, rules):
    trainer = bad_step_trainer(tmp_path, rules, "train.on_bad_steps=stop")
    poison_steps(trainer, {2, 3})
    with pytest.raises(TrainingDiverged, match="2 consecutive steps with non-finite"):
        trainer.run()

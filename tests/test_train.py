"""End to end: the CLI trains on the built-in corpus, writes its outputs, and resumes."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import mesh_for, tiny_config
from model.flops import train_flops_per_token
from train.config import ConfigError
from train.loop import train

SHORT_RUN = ["train.log_every=5", "train.eval_every=15", "train.eval_batches=2", "optimizer.warmup_steps=5", "optimizer.lr=1e-2"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    from tests.conftest import TINY_DATA, TINY_MODEL

    cmd = [sys.executable, "-m", "infra.cli", "train", *TINY_MODEL, *TINY_DATA, *SHORT_RUN,
           "train.steps=30", "checkpoint.every=10", "mesh.data=-1", f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout + proc.stderr


@pytest.mark.slow
def test_thirty_steps_lower_the_loss(cli_run):
    run_dir, _ = cli_run
    lines = read_metrics(run_dir)
    train_losses = [m["loss"] for m in lines if "loss" in m]
    evals = [m for m in lines if "eval_cross_entropy" in m]
    assert len(train_losses) == 6
    assert sum(train_losses[-2:]) / 2 < train_losses[0] - 1.0
    # An untrained model scores about ln(vocab) = 5.58 nats; held-out text must already do better.
    assert evals[-1]["eval_cross_entropy"] < 5.0


@pytest.mark.slow
def test_outputs_of_a_run(cli_run):
    run_dir, stdout = cli_run
    lines = read_metrics(run_dir)
    assert lines[0]["step"] == 0 and lines[0]["data_train_tokens"] > 0
    first = next(m for m in lines if "loss" in m)
    assert {"step", "loss", "tokens_per_sec", "grad_norm", "learning_rate", "step_time", "tokens_seen"} <= set(first)
    # MFU against this machine's measured matmul peak: model FLOPs / step time / (peak x devices).
    for m in (m for m in lines if "loss" in m):
        assert 0 < m["mfu"] < 1 and m["tflops_per_device"] > 0
        flops_per_step = m["tflops_per_device"] * 1e12 * 8 * m["step_time"]
        assert flops_per_step == pytest.approx(train_flops_per_token(tiny_config().model, 32) * 8 * 32, rel=1e-6)
    ev = [m for m in lines if "eval_cross_entropy" in m][-1]
    # The eval line carries `tessera eval`'s metrics under the same names, prefixed.
    assert set(ev) == {"step", *(f"eval_{k}" for k in ("cross_entropy", "perplexity", "bits_per_token", "bits_per_char",
                                                        "bits_per_byte", "accuracy", "tokens"))}
    assert ev["eval_perplexity"] == pytest.approx(math.exp(ev["eval_cross_entropy"]))
    assert ev["step"] == 30
    assert (run_dir / "config.yaml").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "30"]
    assert "bits per byte" in stdout and "unigram baseline" in stdout


@pytest.mark.slow
def test_resume_continues_with_the_numbers_of_an_uninterrupted_run(tmp_path, rules):
    """Stopped at step 6 and resumed, a run logs exactly the losses, gradient norms and evaluation of one that
    never stopped: model, optimizer, step, RNG and data position all come back from the checkpoint."""
    run = [*SHORT_RUN, "train.log_every=1", "train.eval_every=12", "train.steps=12", "checkpoint.every=4",
           "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    cfg = tiny_config(*run, tmp_path=tmp_path / "run")
    mesh = mesh_for(cfg)
    calls = iter(range(1, 100))
    # The 5th request rides in step 5's batch; every process learns of it from step 5's metrics and stops after 6.
    assert train(cfg, mesh, rules, stop_requested=lambda: next(calls) >= 5)["stopped_at"] == 6
    resumed = train(cfg, mesh, rules)
    reference = train(tiny_config(*run, tmp_path=tmp_path / "ref"), mesh, rules)
    got, want = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "ref")
    assert [m["step"] for m in got if "loss" in m] == list(range(1, 13))  # steps 1-6 kept, 7-12 done once
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [m[key] for m in got if key in m] == [m[key] for m in want if key in m], key
    assert resumed["eval_cross_entropy"] == reference["eval_cross_entropy"]


def test_resume_accepts_another_attention_implementation(tmp_path):
    """model.attention and model.attention_block change how attention is computed, not the model: a run
    continues under either."""
    from train.run_dir import check_run_dir, write_config

    write_config(tiny_config("model.attention=blockwise", "model.attention_block=64", tmp_path=tmp_path), [])
    assert check_run_dir(tiny_config("model.attention=dense", tmp_path=tmp_path), force=False) == tmp_path
    with pytest.raises(ConfigError, match="different model"):
        check_run_dir(tiny_config("model.sliding_window=8", tmp_path=tmp_path), force=False)


def test_resume_refuses_a_different_model(tmp_path, rules):
    cfg = tiny_config("train.steps=1", tmp_path=tmp_path)
    (tmp_path / "config.yaml").write_text("model: {d_model: 64}\n")
    with pytest.raises(ConfigError, match="different model"):
        train(cfg, mesh_for(cfg, 1), rules)

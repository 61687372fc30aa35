"""Post-training end to end on the shipped synthetic data, from one shared base run: a reward model and DPO
learn their held-out pairs, the reference never moves, and LoRA SFT and DPO resume bit for bit after SIGKILL."""

import re
import signal

import jax
import numpy as np
import pytest

from tests.conftest import mesh_for, tiny_config
from tests.test_recovery import cli, finish, losses, wait_for_step
from train.data import synth
from train.inference import params_of_run
from train.loop import Trainer, train

pytestmark = pytest.mark.slow
TASKS = ("upper", "add")  # short examples: they fit the tiny model's rows
# Pairs the tiny model can tell apart by a rule it learns in a hundred steps: the answer in upper case. (Telling a
# right sum from one off by a few is beyond it at this size: about half of those stay wrong.)
PAIR_TASKS = ("upper",)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("post")
    return {"chat": synth.write_jsonl(synth.chats(300, 0, TASKS), root / "chats.jsonl"),
            "preferences": synth.write_jsonl(synth.preferences(600, 1, PAIR_TASKS), root / "prefs.jsonl")}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, rules):
    """The shared starting point: the tiny model pre-trained briefly on the built-in corpus."""
    run_dir = tmp_path_factory.mktemp("base")
    cfg = tiny_config("train.steps=30", "train.eval_every=30", "train.eval_batches=1", tmp_path=run_dir)
    train(cfg, mesh_for(cfg, 1), rules)
    return run_dir


def pairs_config(data, base_run, run_dir, *overrides):
    return tiny_config("data.source=preferences", f"data.paths=[{data['preferences']}]", "data.heldout_fraction=0.1",
                       "data.batch_size=16", "train.eval_batches=4", "optimizer.warmup_steps=10",
                       "optimizer.weight_decay=0", f"train.init_from={base_run}", *overrides, tmp_path=run_dir)


def test_a_reward_model_learns_its_held_out_pairs(data, base_run, tmp_path, rules):
    cfg = pairs_config(data, base_run, tmp_path, "train.objective=reward", "model.score_head=true", "train.steps=150",
                       "train.eval_every=150", "optimizer.lr=3e-3")
    trainer = Trainer(cfg, mesh_for(cfg, 1), rules)
    untrained = trainer.evaluate()
    assert untrained["eval_accuracy"] == 0.5  # a zero score head ties every pair
    result = trainer.run()
    assert result["eval_accuracy"] >= 0.9, result


def test_dpo_moves_the_margin_and_never_the_reference(data, base_run, tmp_path, rules):
    cfg = pairs_config(data, base_run, tmp_path, "train.objective=preference", "preference.beta=0.1",
                       "train.steps=100", "train.eval_every=100", "optimizer.lr=1e-3")
    trainer = Trainer(cfg, mesh_for(cfg, 1), rules)
    reference = jax.device_get(trainer.step_args[0])
    before = trainer.evaluate()
    assert before["eval_reward_margin"] == 0 and before["eval_loss"] == pytest.approx(np.log(2), abs=1e-6)
    result = trainer.run()
    assert result["eval_reward_margin"] > 1 and result["eval_accuracy"] >= 0.9, result
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(jax.device_get(trainer.step_args[0]))):
        np.testing.assert_array_equal(a, b)
    loaded = params_of_run(base_run, cfg.model, trainer.program.abstract_state()["params"])
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(jax.device_get(loaded))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["sft-lora", "dpo"])
def test_sigkill_then_resume_is_bit_exact(data, base_run, tmp_path, kind):
    args = {"sft-lora": ["data.source=chat", f"data.paths=[{data['chat']}]", "model.lora.rank=4", "data.seq_len=64"],
            "dpo": ["data.source=preferences", f"data.paths=[{data['preferences']}]", "train.objective=preference"]}
    args = [*args[kind], f"train.init_from={base_run}", "data.heldout_fraction=0.1", "train.steps=30",
            "checkpoint.every=5"]
    assert finish(cli(tmp_path / "ref", *args, devices=1))[0] == 0
    victim = cli(tmp_path / "run", *args, devices=1)
    wait_for_step(victim, tmp_path / "run", 14)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rc, out, err = finish(cli(tmp_path / "run", *args, devices=1))
    assert rc == 0, err[-2000:]
    resumed_at = int(re.search(r"resumed from .* at step (\d+)", out).group(1))
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert 1 <= resumed_at < 30 and sorted(got) == list(range(1, 31))
    assert all(got[s] == ref[s] for s in range(resumed_at + 1, 31)), "loss after resume differs"

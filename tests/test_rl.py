"""Reinforcement learning's pieces: the losses and advantages against hand values and finite differences, the
reward functions, the scoring pass's parity with the sampler, one update on a sharded mesh against one device,
and bad input refused in one line."""

import importlib.metadata
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tests.conftest import TINY_DATA, TINY_MODEL, mesh_for, refused, tiny_config
from train.config import ConfigError
from train.objectives import rl
from train.rewards import Rollouts, check_rewards, parse_reward, parse_rewards, score
from train.rl_loop import RLTrainer

RL_ARGS = ["rl.prompts=synth:upper", "rl.rewards=[count:a]", "rl.max_new_tokens=8", "data.batch_size=2",
           "rl.group_size=4", "rl.heldout_prompts=4", "optimizer.lr=1e-3", "optimizer.warmup_steps=0"]


def rl_config(tmp_path, *overrides):
    return tiny_config(*RL_ARGS, *overrides, tmp_path=tmp_path)


# ------------------------------------------------------------------ hand values


def test_group_advantages_hand_values():
    # Sample std (ddof 1) of [1, 0, 0, 1] is sqrt(1/3); eps 1e-4 is added to it.
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    got = rl.group_advantages(jnp.array([1.0, 0, 0, 1, 3, 3, 3, 3]), 4, 1e-4)
    np.testing.assert_allclose(got[:4], [expected, -expected, -expected, expected], rtol=1e-6)
    assert abs(expected - 0.865875) < 1e-6
    assert np.all(got[4:] == 0)  # a group without variance teaches nothing
    np.testing.assert_allclose(rl.group_advantages(jnp.array([1.0, 0, 0, 1]), 4, 1e-4, scale=False),
                               [0.5, -0.5, -0.5, 0.5])


def test_kl_estimators_hand_values():
    lp, ref = jnp.array([-1.0]), jnp.array([-1.5])
    np.testing.assert_allclose(rl.kl_estimate(lp, ref, "k3"), [math.exp(-0.5) + 0.5 - 1], rtol=1e-6)
    np.testing.assert_allclose(rl.kl_estimate(lp, ref, "k3"), [0.106531], atol=1e-6)
    np.testing.assert_allclose(rl.kl_estimate(lp, ref, "k1"), [0.5])
    assert rl.kl_estimate(lp, lp, "k3")[0] == 0 and rl.kl_estimate(lp, lp, "k1")[0] == 0


def test_gae_hand_values():
    rewards, values = jnp.array([[0.0, 0, 1, 0]]), jnp.array([[0.5, 0.6, 0.7, 9.0]])
    mask = jnp.array([[1.0, 1, 1, 0]])  # the last column is past the completion: ignored
    advantages, returns = rl.gae(rewards, values, mask, 1.0, 0.95)
    np.testing.assert_allclose(advantages[0, :3], [0.46575, 0.385, 0.3], rtol=1e-5)
    np.testing.assert_allclose(returns[0, :3], [0.96575, 0.985, 1.0], rtol=1e-5)
    assert advantages[0, 3] == 0 and returns[0, 3] == 0
    advantages, returns = rl.gae(rewards, values, mask, 1.0, 1.0)  # λ = 1: Monte-Carlo returns minus values
    np.testing.assert_allclose(returns[0, :3], [1.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(advantages[0, :3], returns[0, :3] - values[0, :3], rtol=1e-6)


@pytest.mark.parametrize("ratio, advantage, clipped", [(1.5, 1.0, True), (0.5, -1.0, True), (0.5, 1.0, False)])
def test_ppo_clipping_cases(ratio, advantage, clipped):
    def loss(logp):
        return rl.clipped_policy_loss(logp, jnp.zeros(()), jnp.asarray(advantage), 0.2, 0.2)[0]

    logp = jnp.log(jnp.asarray(ratio))
    _, (_, was_clipped) = rl.clipped_policy_loss(logp, jnp.zeros(()), jnp.asarray(advantage), 0.2, 0.2)
    grad = jax.grad(loss)(logp)
    assert bool(was_clipped) == clipped
    # Clipped: the loss is flat in the policy. Unclipped: d(-ρA)/dlogπ = -ρA.
    np.testing.assert_allclose(grad, 0.0 if clipped else -ratio * advantage, rtol=1e-6)


def test_loss_gradients_match_finite_differences():
    with jax.enable_x64(True):
        key = jax.random.key(0)
        logp, old, ref, adv = (jax.random.normal(k, (6,), jnp.float64) * 0.3 - 1 for k in jax.random.split(key, 4))
        check_grads(lambda x: jnp.sum(rl.clipped_policy_loss(x, old, adv, 0.2, 0.28)[0]), (logp,), order=1,
                    modes=["rev"], eps=1e-6)
        check_grads(lambda x: jnp.sum(rl.kl_estimate(x, ref, "k3")), (logp,), order=1, modes=["rev"], eps=1e-6)
        values, returns = jax.random.normal(key, (6,), jnp.float64), jnp.linspace(-1, 1, 6)
        check_grads(lambda v: jnp.sum(rl.clipped_value_loss(v, values + 0.05, returns, 0.2)), (values,), order=1,
                    modes=["rev"], eps=1e-6)


def test_whiten_uses_only_the_masked_in_tokens():
    x, mask = jnp.array([[1.0, 2, 3, 100]]), jnp.array([[1.0, 1, 1, 0]])
    out = rl.whiten(x, mask)
    np.testing.assert_allclose(out[0, :3], np.array([-1, 0, 1]) / np.sqrt(2 / 3), rtol=1e-5)
    assert out[0, 3] == 0


# ------------------------------------------------------------------ rewards


def rollouts(completions, prompts=None, ended=None, answers=None):
    n = len(completions)
    return Rollouts(prompts or ["p"] * n, completions, np.array(ended or [True] * n),
                    np.array([len(c) for c in completions]), answers or [None] * n)


def no_model(run_dir):
    raise AssertionError("no reward model here")


def test_built_in_rewards():
    r = rollouts(["aaaa", "abab", "xyz", "42"], ended=[True, False, True, True], answers=["aaaa", "x", None, " 42 "])
    assert parse_reward("count:a", no_model).fn(r) == [1.0, 0.5, 0.0, 0.0]
    assert parse_reward("count:ab", no_model).fn(r) == [0.0, 1.0, 0.0, 0.0]
    assert parse_reward("regex:^[0-9]+$", no_model).fn(r) == [0, 0, 0, 1]
    assert parse_reward("length:2", no_model).fn(r) == [-1.0, -1.0, -0.5, 0.0]
    assert parse_reward("eos", no_model).fn(r) == [0.0, -1.0, 0.0, 0.0]
    assert parse_reward("answer", no_model).fn(r) == [1.0, 0.0, 0.0, 1.0]
    assert parse_reward("similarity", no_model).fn(r) == [1.0, 0.0, 0.0, 1.0]  # 'abab' vs 'x': nothing shared
    assert parse_reward("similarity", no_model).fn(rollouts(["abcd"], answers=["abce"])) == [0.75]
    weighted = parse_reward("0.5*count:a", no_model)
    assert weighted.weight == 0.5 and weighted.label == "count"


def fake_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def picky_reward(prompts, completions):
    if any("bad" in p for p in prompts):
        raise ValueError("cannot score this one")
    return [float("nan") if "nan" in p else 1.0 for p in prompts]


def test_user_rewards_by_module_and_entry_point(monkeypatch):
    assert parse_reward("tests.test_rl:fake_reward", no_model).fn(rollouts(["ab", "c"])) == [2.0, 1.0]
    point = importlib.metadata.EntryPoint("lengthy", "tests.test_rl:fake_reward", "tessera.rewards")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [point] if group == "tessera.rewards" else [])
    reward = parse_reward("2*lengthy", no_model)
    assert reward.weight == 2 and reward.fn(rollouts(["abc"])) == [3.0]
    with pytest.raises(ConfigError, match="unknown reward 'nosuch'"):
        parse_reward("nosuch", no_model)
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        parse_reward("no_such_module:f", no_model)
    labels = [r.label for r in parse_rewards(["count:a", "count:b"], no_model)]
    assert labels == ["count", "count_2"]


def test_a_failing_reward_fails_only_its_groups():
    rewards = parse_rewards(["tests.test_rl:picky_reward", "count:a"], no_model)
    prompts = ["ok"] * 2 + ["bad"] * 2 + ["nan"] * 2 + ["fine"] * 2
    scored = score(rewards, rollouts(["a", "b"] * 4, prompts=prompts), 2)
    assert scored.failed.tolist() == [False, False, True, True, True, True, False, False]
    assert scored.total.tolist() == [2.0, 1.0, 0, 0, 0, 0, 2.0, 1.0]
    assert len(scored.errors) == 2
    assert "raised ValueError: cannot score this one on prompt 'bad'" in scored.errors[0]
    assert "non-finite value on prompt 'nan'" in scored.errors[1]
    with pytest.raises(ConfigError, match="failed on a probe completion: ValueError"):
        check_rewards(rewards, rollouts(["a"], prompts=["bad"]))


# ------------------------------------------------------------------ the programs


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, rules):  # its tests are slow: two compiled programs and a decode loop
    cfg = rl_config(tmp_path_factory.mktemp("rl1"), "rl.algorithm=ppo", "rl.track_kl=true", "rl.kl_coef=0",
                    "rl.group_size=4")
    return RLTrainer(cfg, mesh_for(cfg, 1), rules)


@pytest.mark.slow
def test_first_update_is_on_policy(one_device):
    """The reference is the policy at step 0 (both fresh from the seed): the KL is exactly 0. The scoring pass
    and the update are two compiled programs of different shapes, so their log-probs agree to float32 rounding,
    not bit for bit: the first update's ratio is 1 within 1e-5 and nothing is clipped."""
    prompts, rollout, scored = one_device.rollout(0)
    batch, stats = one_device.score(rollout, scored)
    assert stats["kl"] == 0.0
    assert stats["logprob_gap_max"] < 1e-4  # the sampler's log-probs are the training forward's
    metrics = one_device.update(0, batch)
    assert abs(metrics["ratio_max"] - 1) < 1e-5 and abs(metrics["ratio_min"] - 1) < 1e-5
    assert metrics["clip_fraction"] == 0
    assert np.isfinite(metrics["value_loss"])
    assert len(prompts) == 8 and all(p is prompts[4 * (i // 4)] for i, p in enumerate(prompts))


@pytest.mark.slow
def test_rows_show_the_update_what_generation_saw(one_device):
    _, rollout, _ = one_device.rollout(1)
    rows, width = rollout.rows, one_device.cfg.data.seq_len - one_device.cfg.rl.max_new_tokens
    for i, completion in enumerate(rollout.completions):
        marked = np.flatnonzero(rows["weights"][i])
        assert marked.tolist() == list(range(width - 1, width - 1 + len(completion)))
        assert rows["targets"][i, marked].tolist() == completion
        first = np.flatnonzero(rows["segment_ids"][i])[0]
        assert rows["positions"][i, first] == 0 and rows["positions"][i, width] == width - first


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_one_update_on_a_sharded_mesh_equals_one_device(tmp_path, rules, algorithm):
    """GRPO here trains LoRA adapters (its reference: the base inside the same program); PPO the whole policy
    and a value model."""
    lora = ["model.lora.rank=4"] if algorithm == "grpo" else []
    args = [f"rl.algorithm={algorithm}", "rl.kl_coef=0.1", "rl.minibatches=2", "data.batch_size=4", *lora]
    single_cfg = rl_config(tmp_path / "one", *args)
    single = RLTrainer(single_cfg, mesh_for(single_cfg, 1), rules)
    sharded_cfg = rl_config(tmp_path / "eight", *args, "mesh.fsdp=4", "mesh.tensor=2")
    sharded = RLTrainer(sharded_cfg, mesh_for(sharded_cfg, 8), rules)
    _, rollout, scored = single.rollout(0)  # the same fixed rollouts for both
    scored.total[:] = np.arange(len(scored.total)) % 3  # rewards with variance in every group
    batch_one, stats_one = single.score(rollout, scored)
    batch_eight, stats_eight = sharded.score(rollout, scored)
    for k in batch_one:
        np.testing.assert_allclose(batch_eight[k], batch_one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    single.update(0, batch_one)
    sharded.update(0, batch_one)
    flat_one = jax.tree_util.tree_leaves_with_path(jax.device_get(single.state["params"]))
    flat_eight = jax.tree.leaves(jax.device_get(sharded.state["params"]))
    for (path, a), b in zip(flat_one, flat_eight, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    start = jax.device_get(single.models.init_state()["params"])
    moved = sum(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start), [x for _, x in flat_one]))
    assert moved > 0
    if algorithm == "ppo":
        for a, b in zip(jax.tree.leaves(jax.device_get(single.state["value"]["params"])),
                        jax.tree.leaves(jax.device_get(sharded.state["value"]["params"])), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ bad input


def cli_args(tmp_path, *overrides):
    return ["rl", *TINY_MODEL, *TINY_DATA, "mesh.data=-1", *RL_ARGS, f"run.dir={tmp_path / 'run'}", *overrides]


def test_bad_rl_input_is_refused_in_one_line(capsys, tmp_path, monkeypatch):
    (tmp_path / "broken_reward.py").write_text("def score(prompts, completions):\n    raise ValueError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    refused(capsys, cli_args(tmp_path, "rl.rewards=[nosuch]"), "unknown reward 'nosuch'")
    refused(capsys, cli_args(tmp_path, "rl.rewards=[broken_reward:score]"), "failed on a probe completion",
            "ValueError: boom")
    refused(capsys, cli_args(tmp_path, "rl.group_size=1"), "rl.group_size=1", "at least 2")
    refused(capsys, cli_args(tmp_path, "rl.rewards=[regex:(]"), "not a valid regular expression")
    refused(capsys, ["train", "rl.rewards=[count:a]"], "run it with `tessera rl`")
    assert not (tmp_path / "run").exists()


def test_a_reward_model_must_read_the_policys_tokens(capsys, tmp_path, monkeypatch):
    from train.run_dir import write_config
    from train.tokenizer import train_bpe

    tokenizer = train_bpe(["some text to learn merges from"] * 20, 300, tmp_path / "tok" / "tokenizer.json")
    rm_cfg = tiny_config(f"data.tokenizer={tmp_path / 'tok' / 'tokenizer.json'}", "model.vocab_size=320",
                         "train.objective=reward", "model.score_head=true", tmp_path=tmp_path / "rm")
    write_config(rm_cfg)
    assert tokenizer.vocab_size <= 320
    refused(capsys, cli_args(tmp_path, "rl.rewards=[]", f"rl.reward_model={tmp_path / 'rm'}"),
            "was trained with tokenizer", "a reward model must read the policy's tokens")


@pytest.mark.slow
def test_failing_rewards_above_the_allowed_rate_checkpoint_and_exit_3(capsys, tmp_path, monkeypatch):
    """The reward passes its start-up probe, then raises on every call: each group is reported and skipped, and
    once more than rl.max_reward_error_rate of the groups have failed the run checkpoints and exits 3."""
    from infra.cli import main

    (tmp_path / "flaky_reward.py").write_text(
        "calls = 0\n\ndef score(prompts, completions):\n    global calls\n    calls += 1\n"
        "    if calls > 1:\n        raise RuntimeError('grader offline')\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(cli_args(tmp_path, "rl.rewards=[flaky_reward:score]", "rl.max_reward_error_rate=0.5",
                         "train.steps=5"))
    out, err = capsys.readouterr()
    assert code == 3, err
    assert "rewards failed: 2 of 2 groups failed their rewards" in err and "checkpoint saved at step 1" in err
    assert "step 1: reward 'flaky_reward:score' raised RuntimeError: grader offline on prompt 'Shout:" in out
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()

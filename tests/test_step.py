import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import mesh_for, tiny_config
from model.config import Precision
from train.config import OptimizerConfig
from train.optimizer import decay_mask, learning_rate_schedule
from train.program import build_program
from train.state import abstract_model
from train.objectives.cross_entropy import cross_entropy_sums


def test_cross_entropy_matches_float64_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)) * 4
    targets = rng.integers(0, 11, (2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    nll, z = cross_entropy_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(weights))
    log_z = np.log(np.exp(logits).sum(-1))
    ref_nll = ((log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]) * weights).sum()
    np.testing.assert_allclose(float(nll), ref_nll, rtol=1e-6)
    np.testing.assert_allclose(float(z), (log_z**2 * weights).sum(), rtol=1e-6)


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg, 110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine
    assert float(lr(110)) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = abstract_model(tiny_config().model, Precision())
    mask = decay_mask(model.logical_specs)
    assert mask["blocks"]["attn"]["wq"] and mask["blocks"]["mlp"]["wo"] and mask["embed"]["table"]
    assert not mask["blocks"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]


def poisoned(batch):
    return {**batch, "weights": np.full_like(batch["weights"], np.nan)}


def random_batch(rows, seed=1):
    rng = np.random.default_rng(seed)
    return {
        "inputs": rng.integers(0, 256, (rows, 32), dtype=np.int32),
        "targets": rng.integers(0, 256, (rows, 32), dtype=np.int32),
        "weights": (rng.random((rows, 32)) > 0.2).astype(np.float32),  # uneven weights across microbatches
        "segment_ids": np.ones((rows, 32), np.int32),
        "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (rows, 32)).copy(),
    }


def _program(rules, *overrides, sharded=False):
    layout = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2") if sharded else ("mesh.data=1",)
    cfg = tiny_config(*layout, "data.batch_size=16", "optimizer.eps=1e-4", "train.steps=10", *overrides)
    return build_program(cfg, mesh_for(cfg, 8 if sharded else 1), rules)


def _one_step(microbatches, rules):
    program = _program(rules, f"train.microbatches={microbatches}", sharded=True)
    state, metrics = program.train_step(program.init_state(), program.device_batch(random_batch(16)))
    return jax.device_get(state["params"]), jax.device_get(metrics)


def test_gradient_accumulation_equals_one_big_batch(rules):
    params1, m1 = _one_step(1, rules)
    params4, m4 = _one_step(4, rules)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_step_leaves_parameters_and_optimizer_untouched(rules):
    program = _program(rules)
    state = program.init_state()
    before = jax.device_get(state)
    state, metrics = program.train_step(state, program.device_batch(poisoned(random_batch(16))))
    after = jax.device_get(state)
    _assert_trees_equal(before["params"], after["params"])
    _assert_trees_equal(before["opt_state"], after["opt_state"])
    assert int(metrics["skipped_nonfinite_total"]) == 1 and int(after["guard"]["bad_streak"]) == 1
    assert int(after["step"]) == 1  # the batch is consumed all the same
    state, metrics = program.train_step(state, program.device_batch(random_batch(16)))
    assert int(metrics["skipped_nonfinite_total"]) == 1 and int(jax.device_get(state)["guard"]["bad_streak"]) == 0


def test_loss_spike_is_skipped_when_enabled(rules):
    program = _program(rules, "train.spike_factor=2.0")
    state = program.init_state()
    # Pretend 20 accepted steps averaged a loss of 1.0; a fresh model scores ~5.5 on random tokens.
    accepted = 20
    state["guard"] = {**state["guard"], "accepted": jax.numpy.int32(accepted),
                      "loss_ema": jax.numpy.float32(1 - 0.99**accepted)}
    state = jax.device_put(state, program.shardings)
    before = jax.device_get(state["params"])
    state, metrics = program.train_step(state, program.device_batch(random_batch(16)))
    assert int(metrics["skipped_spike_total"]) == 1 and float(metrics["loss"]) > 2.0
    _assert_trees_equal(before, jax.device_get(state["params"]))
    # With no history yet the same loss is accepted: a spike needs a trusted mean.
    fresh = _program(rules, "train.spike_factor=2.0")
    _, metrics = fresh.train_step(fresh.init_state(), fresh.device_batch(random_batch(16)))
    assert int(metrics["skipped_spike_total"]) == 0


def _all_reduces(compiled) -> int:
    return len(re.findall(r"= \S+ all-reduce(?:-start)?\(", compiled.as_text()))


def test_stop_requests_come_back_counted_without_a_collective_of_their_own(rules):
    """The rows' stop flags are summed in the token-weight reduction: a collective of their own would depend on
    nothing else in the step, and XLA:CPU may order independent collectives differently on different devices
    (a two-process job then aborts in gloo)."""
    program = _program(rules, sharded=True)
    batch = random_batch(16)
    stop = np.zeros((16, 1), np.int32)
    stop[[3, 11]] = 1  # rows of two different data shards
    runs = {}
    for name, rows in (("plain", batch), ("stop", {**batch, "stop": stop})):
        state, device_batch = program.init_state(), program.device_batch(rows)
        compiled = program.train_step.lower(state, device_batch).compile()
        runs[name] = (_all_reduces(compiled), jax.device_get(compiled(state, device_batch)[1]))
    assert runs["stop"][0] == runs["plain"][0] > 0
    assert float(runs["stop"][1]["stop"]) == 2 and "stop" not in runs["plain"][1]
    np.testing.assert_allclose(runs["stop"][1]["loss"], runs["plain"][1]["loss"], rtol=1e-6)

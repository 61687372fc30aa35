import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import mesh_for, tiny_config
from train.config import OptimizerConfig
from train.loop import to_device
from train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from train.sharding import batch_sharding
from train.state import abstract_model, init_state, state_shardings
from train.step import cross_entropy_sums, jit_train_step, make_train_step


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
    model = abstract_model(tiny_config().model)
    mask = decay_mask(model.logical_specs)
    assert mask["blocks"]["attn"]["wq"] and mask["blocks"]["mlp"]["wo"] and mask["embed"]["table"]
    assert not mask["blocks"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]


def _one_step(microbatches, rules, z_loss=0.0):
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"train.microbatches={microbatches}",
                      "data.batch_size=16", "optimizer.eps=1e-4")
    mesh = mesh_for(cfg)
    model = abstract_model(cfg.model)
    tx = make_optimizer(cfg.optimizer, 10, decay_mask(model.logical_specs))
    shardings = state_shardings(model, tx, mesh, rules)
    state = init_state(cfg.model, model, tx, shardings, seed=0)
    bs = batch_sharding(mesh, rules)
    step = make_train_step(model.graphdef, tx, learning_rate_schedule(cfg.optimizer, 10),
                           microbatches=microbatches, z_loss=z_loss, mesh=mesh, batch_axes=bs.spec[0])
    rng = np.random.default_rng(1)
    batch = {
        "inputs": rng.integers(0, 256, (16, 32), dtype=np.int32),
        "targets": rng.integers(0, 256, (16, 32), dtype=np.int32),
        "weights": (rng.random((16, 32)) > 0.2).astype(np.float32),  # uneven weights across microbatches
        "segment_ids": np.ones((16, 32), np.int32),
        "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (16, 32)).copy(),
    }
    state, metrics = jit_train_step(step, shardings, bs, mesh)(state, to_device(batch, bs))
    return jax.device_get(state["params"]), jax.device_get(metrics)


def test_gradient_accumulation_equals_one_big_batch(rules):
    params1, m1 = _one_step(1, rules)
    params4, m4 = _one_step(4, rules)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)

import shutil

import jax
import numpy as np
import pytest

from tests.conftest import mesh_for, tiny_config
from train.checkpoint import Checkpointer
from train.program import build_program


@pytest.mark.parametrize("restore_layout", ["same", "resharded"])
def test_restored_state_equals_saved_exactly(tmp_path, rules, restore_layout):
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", tmp_path=tmp_path)
    state = build_program(cfg, mesh_for(cfg), rules).init_state()
    # Make the optimizer state non-trivial so a restore of zeros would be caught.
    state["opt_state"] = jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x, state["opt_state"])
    ckpt = Checkpointer(tmp_path / "ckpt", cfg.checkpoint)
    assert ckpt.save(3, state, {"next_index": 3}, force=True)
    ckpt.wait()

    if restore_layout == "resharded":  # restore into another mesh layout
        cfg = tiny_config("mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", tmp_path=tmp_path)
    program = build_program(cfg, mesh_for(cfg), rules)
    reader = Checkpointer(tmp_path / "ckpt", cfg.checkpoint)
    assert reader.latest_step() == 3
    restored, data_state = reader.restore(3, program.abstract_state())
    assert data_state == {"next_index": 3}
    saved_leaves, restored_leaves = jax.tree.leaves(state), jax.tree.leaves(restored)
    assert jax.tree.structure(state) == jax.tree.structure(restored)
    for a, b in zip(saved_leaves, restored_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(program.shardings)):
        assert got.sharding == want
    ckpt.close()
    reader.close()


def test_keep_last_k(tmp_path, rules):
    cfg = tiny_config("checkpoint.every=1", "checkpoint.keep=2", "checkpoint.async_save=false", tmp_path=tmp_path)
    state = build_program(cfg, mesh_for(cfg, 1), rules).init_state()
    ckpt = Checkpointer(tmp_path / "ckpt", cfg.checkpoint)
    for step in range(1, 5):
        ckpt.save(step, state, {"next_index": step})
    ckpt.wait()
    assert sorted(ckpt.manager.all_steps()) == [3, 4]
    ckpt.close()


@pytest.mark.parametrize("saved, resumed, layout", [("fp32", "bf16-pure", True), ("bf16-pure", "bf16", True),
                                                    ("bf16", "fp32", True), ("bf16-pure", "fp32", False)])
def test_a_run_continues_under_another_precision_policy(tmp_path, rules, saved, resumed, layout):
    """The state is cast into the new policy's dtypes; the float32 truth (a master copy if the run kept
    one, else the parameters) becomes the new master copy, or the new parameters. A checkpoint written
    before the layout record (`layout=False`) has its keys read from the array metadata instead."""
    cfg = tiny_config(f"precision.preset={saved}", tmp_path=tmp_path)
    state = build_program(cfg, mesh_for(cfg, 1), rules).init_state()
    state["opt_state"] = jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x, state["opt_state"])
    if "master" in state:  # a master copy that is not just the parameters widened
        state["master"] = jax.tree.map(lambda m: m + 1e-4, state["master"])
    ckpt = Checkpointer(tmp_path / "ckpt", cfg.checkpoint)
    ckpt.save(2, state, {"next_index": 2}, force=True)
    ckpt.wait()
    if not layout:
        shutil.rmtree(tmp_path / "ckpt" / "2" / "layout")
    truth = jax.device_get(state.get("master", state["params"]))

    new = build_program(tiny_config(f"precision.preset={resumed}", tmp_path=tmp_path), mesh_for(cfg, 1), rules)
    restored, data_state = Checkpointer(tmp_path / "ckpt", cfg.checkpoint).restore(2, new.abstract_state())
    assert data_state == {"next_index": 2}
    want = new.abstract_state()
    assert jax.tree.structure(restored) == jax.tree.structure(want)
    for got, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
        assert got.dtype == spec.dtype and got.shape == spec.shape
    for t, p in zip(jax.tree.leaves(truth), jax.tree.leaves(restored["params"])):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(t).astype(p.dtype))
    if "master" in restored:
        for t, m in zip(jax.tree.leaves(truth), jax.tree.leaves(restored["master"])):
            np.testing.assert_array_equal(np.asarray(m), np.asarray(t, np.float32))
    for a, b in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(restored["opt_state"])):
        np.testing.assert_array_equal(np.asarray(a).astype(b.dtype), np.asarray(b))
    ckpt.close()


def test_params_alone_restore_without_the_optimizer_state(tmp_path, rules):
    cfg = tiny_config("precision.preset=bf16-pure", tmp_path=tmp_path)
    program = build_program(cfg, mesh_for(cfg, 1), rules)
    state = program.init_state()
    ckpt = Checkpointer(tmp_path / "ckpt", cfg.checkpoint)
    ckpt.save(1, state, {}, force=True)
    ckpt.wait()
    params = Checkpointer(tmp_path / "ckpt", cfg.checkpoint).restore_params(1, program.abstract_state()["params"])
    assert jax.tree.structure(params) == jax.tree.structure(state["params"])
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
        assert b.dtype == a.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()

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

"""One model, any mesh: the same numbers on one device and on three 8-device layouts (data, fsdp, data x fsdp x tensor)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import mesh_for, prepared_stream, tiny_config
from train.data import corpus as data_lib
from train.program import build_program
from train.sharding import batch_sharding
from train.tokenizer import ByteTokenizer

MESHES = {
    "one-device": dict(data=1, fsdp=1, tensor=1, n=1),
    "data8": dict(data=8, fsdp=1, tensor=1, n=8),
    "fsdp8": dict(data=1, fsdp=8, tensor=1, n=8),
    "data2-fsdp2-tensor2": dict(data=2, fsdp=2, tensor=2, n=8),
}


def config_for(layout):
    # Large Adam epsilon: the first Adam step is lr*g/(|g|+eps), which amplifies float32
    # reduction-order noise in near-zero gradients; a larger eps keeps the comparison about sharding.
    return tiny_config(
        f"mesh.data={layout['data']}", f"mesh.fsdp={layout['fsdp']}", f"mesh.tensor={layout['tensor']}",
        "optimizer.eps=1e-4", "optimizer.warmup_steps=0", "train.steps=10",
    )


@pytest.fixture(scope="module")
def batch_np(tmp_path_factory):
    docs = [(str(i), "def f(x):\n    return x * %d\n" % i * (i % 3 + 1)) for i in range(40)]
    stream = prepared_stream(docs, tmp_path_factory.mktemp("docs"), 32, seed=0)
    return data_lib.train_batches(stream, 8)[0]


def run_one_step(layout, batch_np, rules):
    cfg = config_for(layout)
    program = build_program(cfg, mesh_for(cfg, layout["n"]), rules)
    state = program.init_state()
    before = jax.device_get(state["params"])
    state, metrics = program.train_step(state, program.device_batch(batch_np))
    return before, jax.device_get(state["params"]), jax.device_get(metrics), state, program.shardings


@pytest.fixture(scope="module")
def results(batch_np, rules):
    return {name: run_one_step(layout, batch_np, rules) for name, layout in MESHES.items()}


@pytest.mark.parametrize("name", [n for n in MESHES if n != "one-device"])
def test_mesh_matches_one_device(results, name):
    # float32 tolerance: the meshes sum the same numbers in a different order (sharded
    # reductions, all-reduces), which moves the last few bits; 1e-5 relative is ~80 ulps.
    ref_init, ref_params, ref_metrics, *_ = results["one-device"]
    init, params, metrics, *_ = results[name]
    for a, b in zip(jax.tree.leaves(ref_init), jax.tree.leaves(init)):
        np.testing.assert_array_equal(a, b)  # same initial parameters, whatever the layout
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    changed = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref_init), jax.tree.leaves(ref_params)))
    assert changed > 1e-4  # the step really moved the parameters


def test_parameter_shardings_follow_the_rules(results):
    *_, state, shardings = results["data2-fsdp2-tensor2"]
    p = shardings["params"]
    assert p["blocks"]["attn"]["wq"].spec == P(None, "fsdp", "tensor", None)
    assert p["blocks"]["attn"]["wo"].spec == P(None, "tensor", None, "fsdp")
    assert p["blocks"]["mlp"]["wi"].spec == P(None, "fsdp", "tensor")
    assert p["blocks"]["mlp"]["wo"].spec == P(None, "tensor", "fsdp")
    assert p["embed"]["table"].spec == P("tensor", "fsdp")
    assert p["final_norm"]["scale"].spec == P("fsdp")
    # The live arrays carry those shardings, and Adam's moments mirror the parameters.
    wq = state["params"]["blocks"]["attn"]["wq"]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
    mu = state["opt_state"][1][0].mu["blocks"]["attn"]["wq"]
    assert mu.sharding.spec == wq.sharding.spec


def test_batch_sharded_over_data_fsdp_and_expert(rules):
    cfg = config_for(MESHES["data2-fsdp2-tensor2"])
    assert batch_sharding(mesh_for(cfg), rules).spec == P(("data", "fsdp", "expert"))  # any rank: rows split


def test_rule_override_from_config(rules):
    from infra.mesh import logical_rules

    cfg = tiny_config("mesh.rules={embed: null, mlp: [fsdp, tensor]}")
    r = logical_rules(cfg)
    assert r["embed"] is None and r["mlp"] == ("fsdp", "tensor")


def test_axis_that_does_not_divide_a_dimension_replicates_it_and_says_so(tmp_path, rules):
    from train.loop import Trainer
    from train.sharding import mesh_spec, unsplit_dimensions

    mesh = mesh_for(config_for(MESHES["data2-fsdp2-tensor2"]))
    assert mesh_spec(P("vocab", "embed"), (50257, 768), mesh, rules) == P(None, "fsdp")
    assert unsplit_dimensions({"w": P("vocab", "embed")}, {"w": jax.ShapeDtypeStruct((50257, 768), np.float32)},
                              mesh, rules) == ["vocab (50257) is not split over tensor: tensor (2 devices) do not divide it"]
    # A layout the rules did not ask for is reported where the run is described: its start-up and config.yaml.
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.vocab_size=265", tmp_path=tmp_path)
    trainer = Trainer(cfg, mesh_for(cfg), rules)
    trainer.checkpointer.close()
    trainer.writer.close()
    header = (tmp_path / "config.yaml").read_text().splitlines()[0]
    assert header == "# vocab (265) is not split over tensor: tensor (2 devices) do not divide it"
    assert trainer.layout_notes == [header[2:]]


def test_emulated_devices_get_threads_to_spare_for_collectives():
    """XLA:CPU sizes the pool that runs every emulated device's program at max(cores, devices): branches that
    reach collectives at once (a dual encoder's towers) then block every thread and the step aborts. The
    platform flags size it by NPROC, which this jaxlib must honour."""
    import os
    from pathlib import Path

    from infra.runtime import CPU_THREADS_PER_EMULATED_DEVICE, apply_platform_flags

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    apply_platform_flags(env)
    assert int(env["NPROC"]) == max(os.cpu_count(), 8 * CPU_THREADS_PER_EMULATED_DEVICE)
    assert "--xla_force_host_platform_device_count=8" in env["XLA_FLAGS"]
    given = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "NPROC": "64"}
    apply_platform_flags(given)
    assert given["NPROC"] == "64"  # a user's choice stands, but not against the tests' fixed options:
    apply_platform_flags(given, override=True)
    assert int(given["NPROC"]) == max(os.cpu_count(), 8 * CPU_THREADS_PER_EMULATED_DEVICE)
    rehearsal = {"TESSERA_CPU_DEVICES": "4"}  # launch local's processes ask through the environment
    apply_platform_flags(rehearsal)
    assert int(rehearsal["NPROC"]) == max(os.cpu_count(), 4 * CPU_THREADS_PER_EMULATED_DEVICE)
    one = {}
    apply_platform_flags(one)
    assert "NPROC" not in one  # one device has no collectives to wait in
    jax.devices()
    tasks = Path("/proc/self/task")
    if tasks.exists():
        names = [(t / "comm").read_text().strip() for t in tasks.iterdir()]
        assert names.count("tf_XLAEigen") >= 8 * CPU_THREADS_PER_EMULATED_DEVICE, names

"""The step-time model: collective costs and rooflines on hand-checkable programs compiled for a TPU slice."""

import importlib.util

import numpy as np
import pytest

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")

V5E_LINK, V5E_HBM, V5E_PEAK = 45e9, 8.1e11, 197e12


# ------------------------------------------------------------------ formulas and replica groups


def test_replica_groups_in_each_spelling():
    from infra.interconnect import replica_groups, replica_groups_text

    assert replica_groups("{{0,1},{2,3}}", 4).tolist() == [[0, 1], [2, 3]]
    assert replica_groups("{}", 4).tolist() == [[0, 1, 2, 3]]
    # [2,4]<=[4,2]T(1,0): ids 0..7 as 4x2, transposed to 2x4, read as 2 groups of 4.
    assert replica_groups("[2,4]<=[4,2]T(1,0)", 8).tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert replica_groups("[4,2]<=[8]", 8).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert replica_groups("mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", 8).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", 8).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # The mesh's devices as the iota [2,4] transposed: ids 0 4 1 5 2 6 3 7 laid out as 4 x 1 x 2.
    spelled = "mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}"
    assert replica_groups_text(f"channel_id=3, replica_groups={spelled}, dimensions={{0}}") == spelled
    assert replica_groups(spelled, 8).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_ring_costs_by_hand():
    from infra.interconnect import Span, collective_seconds

    line = Span(chips=4, ici_bytes_per_s=45e9, slices=1, link_bytes_per_s=45e9, dcn_bytes_per_s=6.25e9)
    mib = 2**20
    assert collective_seconds("all-gather", 64 * mib, line) == pytest.approx(64 * mib * 3 / 4 / 45e9)
    assert collective_seconds("reduce-scatter", 64 * mib, line) == pytest.approx(64 * mib * 3 / 4 / 45e9)
    assert collective_seconds("all-reduce", 64 * mib, line) == pytest.approx(2 * 64 * mib * 3 / 4 / 45e9)
    torus = Span(chips=16, ici_bytes_per_s=2 * 45e9, slices=1, link_bytes_per_s=45e9, dcn_bytes_per_s=6.25e9)
    assert collective_seconds("all-to-all", 64 * mib, torus) == pytest.approx(64 * mib * 15 / 16 * 4 / 90e9)
    # Two slices of 4 chips: the ring inside each slice, then each chip's quarter crosses DCN.
    two = Span(chips=8, ici_bytes_per_s=45e9, slices=2, link_bytes_per_s=45e9, dcn_bytes_per_s=6.25e9)
    expected = 2 * 64 * mib * 3 / 4 / 45e9 + 2 * 1 / 2 * 64 * mib / 4 / 6.25e9
    assert collective_seconds("all-reduce", 64 * mib, two) == pytest.approx(expected)


@needs_libtpu
def test_a_group_spans_the_axes_its_chips_differ_on_and_wraps_only_full_v5e_axes():
    from infra.interconnect import LINKS, Topology
    from infra.targets import tpu_target

    devices = tpu_target("v5e-256").devices
    topology = Topology(devices, LINKS["TPU v5e"])
    coords = np.array([d.coords for d in devices])
    row = np.flatnonzero(coords[:, 1] == 0)  # 16 chips along x: a full axis, which wraps
    assert len(row) == 16 and topology.span(row).ici_bytes_per_s == 2 * V5E_LINK
    quarter = row[coords[row, 0] < 4]  # 4 chips of that row: a line
    assert topology.span(quarter).ici_bytes_per_s == V5E_LINK
    assert topology.span(np.arange(256)).ici_bytes_per_s == 4 * V5E_LINK  # both axes, both wrapping
    small = Topology(tpu_target("v5e-8").devices, LINKS["TPU v5e"])  # 2x4: no axis wraps
    assert small.span(np.arange(8)).ici_bytes_per_s == 2 * V5E_LINK


# ------------------------------------------------------------------ compiled programs


def _predict(fn, in_specs, out_spec, shapes, mesh_shape=(8,), axes=("x",), target="v5e-8", compiler_cycles=False):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from infra.hlo import parse_module
    from infra.interconnect import LINKS, Topology
    from infra.step_time import StepTimeModel
    from infra.targets import tpu_target

    t = tpu_target(target)
    # v5e-8 is 2 x 4 chips: ordered by (x, y), a mesh row of 4 runs along the physical y axis (a line, no wrap).
    devices = sorted(t.devices, key=lambda d: tuple(d.coords))
    mesh = Mesh(np.array(devices).reshape(mesh_shape), axes)
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(*p)))
            for s, p in zip(shapes, in_specs, strict=True)]
    compiled = jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec(*out_spec))).lower(*args).compile()
    text = compiled.as_text()
    model = StepTimeModel(parse_module(text), Topology(list(mesh.devices.flat), LINKS["TPU v5e"]), V5E_PEAK,
                          compiler_cycles=compiler_cycles)
    return model.estimate(top=50), text


@needs_libtpu
def test_an_all_gather_costs_the_ring_formula():
    """A [4096, 1024] bf16 array sharded over 4 chips along one v5e axis (no wraparound), gathered whole."""
    estimate, _ = _predict(lambda x: x, [("x", None)], (None, None), [(4096, 1024)], (2, 4), ("y", "x"))
    gathered = 4096 * 1024 * 2
    (op,) = [o for o in estimate.top_ops if o.kind == "collective"]
    assert op.bytes == gathered
    assert op.seconds == pytest.approx(gathered * 3 / 4 / V5E_LINK)
    assert estimate.communication_s == pytest.approx(op.seconds)
    assert estimate.exposed_communication_s == pytest.approx(op.seconds)  # nothing to hide it behind


@needs_libtpu
def test_a_batch_sharded_matmul_needs_no_collective_and_is_compute_bound():
    n = 4096
    estimate, text = _predict(lambda x, w: x @ w, [("x", None), (None, None)], ("x", None),
                              [(8 * n, n), (n, n)])
    assert "all-gather" not in text and "all-reduce" not in text
    assert estimate.communication_s == 0 and estimate.exposed_communication_s == 0
    flops = 2 * n * n * n  # each chip multiplies its [4096, 4096] rows by the whole [4096, 4096] weight
    assert estimate.flops == pytest.approx(flops)
    matmul = max(estimate.top_ops, key=lambda o: o.flops)
    assert matmul.kind == "compute" and matmul.seconds == pytest.approx(flops / V5E_PEAK)
    # With the compiler's own cycle estimate for its tiling, the op takes no less than its roofline.
    scheduled, _ = _predict(lambda x, w: x @ w, [("x", None), (None, None)], ("x", None), [(8 * n, n), (n, n)],
                            compiler_cycles=True)
    assert scheduled.roofline_compute_s == pytest.approx(estimate.compute_s)
    assert scheduled.compute_s == pytest.approx(max(scheduled.roofline_compute_s, scheduled.compiler_compute_s))
    assert scheduled.compiler_compute_s > 0


@needs_libtpu
def test_an_elementwise_op_is_memory_bound_at_hbm_bandwidth():
    n = 4096
    estimate, _ = _predict(lambda x: x * 3 + 1, [("x", None)], ("x", None), [(8 * n, n)])
    (op,) = [o for o in estimate.top_ops if o.seconds > 0]
    moved = 2 * n * n * 2  # read and write one chip's bf16 [4096, 4096]
    assert op.kind == "memory" and op.bytes == moved and op.seconds == pytest.approx(moved / V5E_HBM)


@needs_libtpu
def test_a_tensor_parallel_mlp_all_reduces_its_output_once():
    """Megatron's MLP: the first matmul split by columns, the second by rows; one all-reduce of [B, d]."""
    import jax

    b, d, f = 1024, 1024, 4096

    def mlp(x, w1, w2):
        return jax.nn.gelu(x @ w1) @ w2

    estimate, text = _predict(mlp, [(None, None), (None, "x"), ("x", None)], (None, None),
                              [(b, d), (d, f), (f, d)], (2, 4), ("y", "x"))
    collectives = [o for o in estimate.top_ops if o.kind == "collective"]
    assert len(collectives) == 1 and text.count("all-reduce(") + text.count("all-reduce-start(") == 1
    assert collectives[0].bytes == b * d * 2
    assert collectives[0].seconds == pytest.approx(2 * b * d * 2 * 3 / 4 / V5E_LINK)
    assert estimate.flops == pytest.approx(2 * b * d * f / 4 * 2)


@needs_libtpu
def test_a_whole_train_step_counts_every_loop_trip():
    """The layer scan, the microbatch loop and the compiler's collective-matmul loops each run their trip count:
    the FLOPs read from the program equal the analytic hardware FLOPs (splash's kernels included), and the
    predicted step is no faster than its matmuls at peak."""
    from infra.mesh import logical_rules
    from infra.plan import compile_for_plan, hardware_flops_per_step, predict_step_time, target_mesh
    from infra.targets import tpu_target
    from train.program import build_program
    from train.recipes import load_config
    from tests.conftest import TINY_MODEL

    cfg = load_config(None, [*TINY_MODEL, "model.d_model=256", "model.n_heads=2", "model.n_kv_heads=1",
                             "model.n_layers=3", "model.max_seq_len=512", "data.seq_len=512", "data.batch_size=8",
                             "mesh.data=1", "mesh.fsdp=4", "train.microbatches=2", "model.remat=full"])
    target = tpu_target("v5e-4")
    mesh = target_mesh(cfg, target)
    _, _, compiled = compile_for_plan(cfg, mesh)
    predicted = predict_step_time(compiled, cfg, target, mesh)
    parameters = sum(int(np.prod(p.shape)) for p in __import__("jax").tree.leaves(
        build_program(cfg, mesh, logical_rules(cfg)).model.params))
    analytic = hardware_flops_per_step(cfg, "splash", parameters) / 4
    assert predicted.flops == pytest.approx(analytic, rel=0.05)
    assert predicted.total_s >= predicted.compute_s >= predicted.roofline_compute_s >= predicted.flops / V5E_PEAK
    assert predicted.total_s == pytest.approx(predicted.compute_s + predicted.exposed_communication_s)
    assert predicted.communication_s > 0  # FSDP gathers the weights and reduce-scatters the gradients


# ------------------------------------------------------------------ the sweep ranks by predicted step time

SMALL = ["model.n_layers=2", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=8", "model.d_ff=512",
         "model.vocab_size=512", "model.max_seq_len=256", "data.seq_len=256", "data.batch_size=8"]


@pytest.mark.slow
@needs_libtpu
def test_the_sweep_puts_data_parallel_first_for_a_tiny_model_and_caches_what_it_compiled(tmp_path, monkeypatch):
    """A tiny model on 8 chips: splitting its small matmuls 8 ways (tensor) only adds all-reduces of the
    activations; every chip running its own batch (data) needs one small gradient all-reduce. A second run of
    the same sweep compiles nothing: the results come from the cache."""
    from infra.sweep import run_sweep
    from infra.targets import tpu_target
    from train.recipes import load_config
    from tests.conftest import TINY_MODEL

    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    cfg = load_config(None, [*TINY_MODEL, *SMALL, "mesh.data=8"])
    data = ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1", "model.remat=none", "train.microbatches=1"]
    tensor = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8", "model.remat=none", "train.microbatches=1"]
    ranked = run_sweep(cfg, tpu_target("v5e-8"), [tensor, data], jobs=2, timeout_s=300)
    assert [c.overrides for c in ranked] == [data, tensor] and all(c.fits for c in ranked)
    assert ranked[0].exposed_communication_s < ranked[1].exposed_communication_s
    assert len(list((tmp_path / "sweep").glob("*.json"))) == 2
    seen = []
    again = run_sweep(cfg, tpu_target("v5e-8"), [tensor, data], jobs=1, timeout_s=0.01, progress=seen.append)
    assert again == ranked and len(seen) == 2  # a 10 ms timeout would have killed any compile


@pytest.mark.slow
@needs_libtpu
def test_the_sweep_puts_fsdp_first_when_replicated_state_does_not_fit(tmp_path, monkeypatch):
    """1.5 billion parameters with float32 weights and Adam moments (25 GB) do not fit a 16 GiB v5e chip
    replicated; sharded over 8 chips (FSDP) they do."""
    from infra.sweep import run_sweep
    from infra.targets import tpu_target
    from train.recipes import load_config

    monkeypatch.setenv("TESSERA_CACHE_DIR", str(tmp_path))
    cfg = load_config(None, ["model=llama3-8b", "model.n_layers=2", "data.seq_len=1024", "data.batch_size=8",
                             "mesh.data=8"])
    data = ["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1", "model.remat=full", "train.microbatches=1"]
    fsdp = ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "model.remat=full", "train.microbatches=1"]
    ranked = run_sweep(cfg, tpu_target("v5e-8"), [data, fsdp], jobs=1, timeout_s=600)
    assert [c.overrides for c in ranked] == [fsdp, data]
    assert ranked[0].fits and not ranked[1].fits


@pytest.mark.slow
@needs_libtpu
def test_a_step_that_does_not_fit_is_told_what_would():
    """llama3-8b without remat at 2048 tokens per v5e chip needs about twice the chip's 16 GiB by the analytic
    model; the changes offered fit by the same model, the cheapest per token first."""
    from infra.sweep import analytic_memory, fitting_changes
    from infra.targets import tpu_target
    from train.recipes import load_config, with_overrides

    target = tpu_target("v5e-16")
    cfg = load_config(None, ["model=llama3-8b", "data.seq_len=2048", "data.batch_size=16", "mesh.data=1",
                             "mesh.fsdp=16", "model.remat=none"])
    assert analytic_memory(cfg, target) > target.memory_bytes
    changes = fitting_changes(cfg, target)
    assert changes and all(c["analytic_memory_bytes"] <= target.memory_bytes / 1.1 for c in changes)
    costs = [c["seconds_per_million_tokens"] for c in changes]
    assert costs == sorted(costs)
    for change in changes:  # each is a valid config that the analytic model really places under the limit
        assert analytic_memory(with_overrides(cfg, change["overrides"]), target) == change["analytic_memory_bytes"]
        assert any(o.startswith(("model.remat=", "mesh.tensor=", "data.batch_size=")) and o not in
                   ("model.remat=none", "mesh.tensor=1") for o in change["overrides"])


@pytest.mark.slow
@needs_libtpu
def test_maxtexts_published_16b_step_on_v5e_256_is_predicted_within_15_percent():
    """MaxText's 16B run: 120 TFLOP/s per chip by its code's count, a 10.66 s step; compiled here for v5e-256 with
    the run's libtpu flags, the predicted step is within 15% (the other three cases are in the README)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "bench/published_step_times.py", "--cases", "16b", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)
    assert row["published_step_s"] == pytest.approx(10.66, abs=0.01)
    assert 0.85 <= row["ratio"] <= 1.15, row
    assert row["roofline_compute_s"] < row["predicted_step_s"]  # the matmuls do not run at peak

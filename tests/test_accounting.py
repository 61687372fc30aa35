"""FLOP, memory and device accounting, checked by hand and against the XLA compiler."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from infra.devices import DEVICES, UnknownDevice, device_spec
from infra.plan import compute_optimal, xla_total_flops
from model.config import ModelConfig
from model.flops import (
    decode_flops_per_token,
    forward_flops_breakdown,
    hardware_flops_per_token,
    kernel_keys,
    mean_keys,
    optimizer_flops_per_param,
    param_counts,
    prefill_flops,
    train_flops_per_token,
)
from model.memory import kv_cache_bytes, kv_cache_bytes_per_token, layer_activation_bytes_per_token
from train.recipes import load_config

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


# ------------------------------------------------------------------ analytic, by hand


def test_forward_flops_terms_by_hand():
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=100, mlp="swiglu")
    terms = forward_flops_breakdown(cfg, seq_len=9)
    hd = 16
    assert terms["qkv_projection"] == 2 * 2 * 64 * (4 * hd + 2 * 2 * hd)  # GQA: k and v have 2 heads
    assert terms["attention_output"] == 2 * 2 * (4 * hd) * 64
    assert terms["mlp"] == 2 * 2 * 64 * 96 * 3  # SwiGLU: three matrices
    assert terms["lm_head"] == 2 * 64 * 100
    # Causal: query t sees t+1 keys, (9+1)/2 = 5 on average; the dense matrix has 9.
    assert terms["attention_scores"] == 2 * 2 * (4 * hd) * 5
    assert forward_flops_breakdown(cfg, 9, causal=False)["attention_values"] == 2 * 2 * (4 * hd) * 9
    gelu = forward_flops_breakdown(cfg.model_copy(update={"mlp": "gelu"}), 9)
    assert gelu["mlp"] == 2 * 2 * 64 * 96 * 2


def test_training_hardware_and_inference_flops():
    cfg = ModelConfig(n_layers=3, d_model=64, n_heads=4, d_ff=128, vocab_size=50)
    L = 16
    fwd_full = sum(forward_flops_breakdown(cfg, L, causal=False).values())
    assert train_flops_per_token(cfg, L) == 3 * sum(forward_flops_breakdown(cfg, L).values())
    assert hardware_flops_per_token(cfg, L) == 3 * fwd_full  # remat none: no recompute
    full = cfg.model_copy(update={"remat": "full"})
    layers = fwd_full - 2 * 64 * 50
    assert hardware_flops_per_token(full, L) == 3 * fwd_full + layers - 3 * 2 * 128 * 64
    dots = cfg.model_copy(update={"remat": "save_dots"})
    terms = forward_flops_breakdown(cfg, L, causal=False)
    assert hardware_flops_per_token(dots, L) == 3 * fwd_full + terms["attention_scores"] + terms["attention_values"]
    assert prefill_flops(cfg, L) == L * sum(forward_flops_breakdown(cfg, L).values())
    # One decoded token: every weight once, attention over the cached context.
    matmuls = 3 * 2 * (64 * 64 * 4 + 3 * 64 * 128) + 2 * 64 * 50  # SwiGLU (the default): three MLP matrices
    assert decode_flops_per_token(cfg, context=100) == matmuls + 3 * 4 * 64 * 100


def test_keys_each_attention_implementation_computes_by_hand():
    """1024 tokens in 256-key blocks (blockwise) or 512 (splash at that length): the causal diagonal skips 6 of
    16 block pairs; a 300-token window 7; a length that is not a block multiple computes its padding."""
    cfg = ModelConfig(n_layers=1, d_model=64, n_heads=4, attention_block=256)
    assert mean_keys(1024, causal=True) == 1025 / 2
    assert mean_keys(1024, causal=True, window=300) == (300 * 301 / 2 + 724 * 300) / 1024
    assert mean_keys(1024, causal=False) == 1024
    assert kernel_keys(cfg, 1024, "dense") == 1024
    assert kernel_keys(cfg, 1024, "blockwise") == 10 / 16 * 1024
    assert kernel_keys(cfg, 1024, "splash") == 3 / 4 * 1024  # 2 x 2 blocks of 512, 3 computed
    assert kernel_keys(cfg, 1024, "cudnn") == 1025 / 2
    windowed = cfg.model_copy(update={"sliding_window": 300})
    assert kernel_keys(windowed, 1024, "blockwise") == 9 / 16 * 1024  # block rows see 1, 2, 3, 3 key blocks
    assert kernel_keys(cfg, 1000, "blockwise") == 10 / 16 * 1024 ** 2 / 1000  # 4 padded blocks of 256


def test_hardware_flops_count_each_implementations_backward():
    """Per token: every other matmul 3x (forward and backward); the score and value products in units of the
    forward product: dense (3, 3), a flash backward (4, 3) recomputes the scores, splash's two backward kernels
    (5, 4) recompute them and dP twice; a remat policy reruns them once more."""
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=50, attention_block=256)
    L = 1024
    for kernel, (su, vu) in {"dense": (3, 3), "blockwise": (4, 3), "splash": (5, 4), "cudnn": (4, 3)}.items():
        keys = kernel_keys(cfg, L, kernel)
        product = 2 * 2 * 64 * keys  # 2 layers x 2 FLOPs x (4 heads x 16 dims) x keys: scores and values alike
        rest = sum(v for k, v in forward_flops_breakdown(cfg, L).items() if not k.startswith("attention_s")
                   and k != "attention_values")
        assert hardware_flops_per_token(cfg, L, kernel) == pytest.approx(3 * rest + (su + vu) * product), kernel
        dots = cfg.model_copy(update={"remat": "save_dots"})
        assert hardware_flops_per_token(dots, L, kernel) == pytest.approx(3 * rest + (su + vu + 2) * product), kernel


def test_attention_keeps_for_the_backward_by_implementation():
    cfg = ModelConfig(n_layers=1, d_model=64, n_heads=4)
    saved = {k: layer_activation_bytes_per_token(cfg, 2048, "bfloat16", "none", k)["attention_scores"]
             for k in ("dense", "blockwise", "splash", "cudnn")}
    # dense: f32 scores + bf16 probabilities per key; flash: one f32 log-sum-exp; cuDNN: one f32 per document slot
    assert saved == {"dense": 4 * 2048 * 6, "blockwise": 4 * 4, "splash": 4 * 4, "cudnn": 4 * 2048 * 4}


def test_kv_cache_bytes_match_published_llama3_8b_figure():
    cfg = load_config(None, ["model=llama3-8b", "data.seq_len=128"]).model
    # 32 layers x 8 kv heads x 128 dims x (k and v) x 2 bytes = 128 KiB per token.
    assert kv_cache_bytes_per_token(cfg, "bfloat16") == 128 * 1024
    assert kv_cache_bytes(cfg, batch=4, context=8192, dtype="bfloat16") == 4 * 8192 * 128 * 1024
    assert kv_cache_bytes_per_token(cfg, "float32") == 256 * 1024


def test_compute_optimal_reproduces_chinchilla():
    plan = compute_optimal(5.76e23)  # Chinchilla's budget: 70B parameters, 1.4T tokens
    assert plan.parameters == pytest.approx(6.93e10, rel=0.01)
    assert plan.tokens == pytest.approx(1.39e12, rel=0.01)
    assert 6 * plan.parameters * plan.tokens == pytest.approx(5.76e23)


# ------------------------------------------------------------------ device table


@pytest.mark.parametrize(
    "kind, name",
    [
        ("TPU v4", "TPU v4"),
        ("TPU v5 lite", "TPU v5e"),
        ("TPU v5e", "TPU v5e"),
        ("TPU v5", "TPU v5p"),
        ("TPU v5p", "TPU v5p"),
        ("TPU v6 lite", "TPU v6e"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB"),
        ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB"),
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
        ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
        ("NVIDIA H200", "NVIDIA H200"),
        ("NVIDIA H200 NVL", "NVIDIA H200 NVL"),
        ("NVIDIA GH200 480GB", "NVIDIA GH200"),
        ("NVIDIA B200", "NVIDIA B200"),
    ],
)
def test_every_device_kind_jax_reports_is_found(kind, name):
    assert device_spec(kind).name == name


def test_unknown_device_is_an_error_not_a_guess():
    with pytest.raises(UnknownDevice, match="NVIDIA T4"):
        device_spec("NVIDIA T4")
    assert all(d.peak_bf16 >= d.peak_f32 > 0 and d.hbm_bytes > 0 for d in DEVICES)


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
@pytest.mark.parametrize("target, kind", [("v4-8", "TPU v4"), ("v5e-4", "TPU v5 lite"), ("v5p-8", "TPU v5"),
                                          ("v6e-4", "TPU v6 lite")])
def test_tpu_topologies_report_the_kinds_the_table_knows(target, kind):
    from infra.targets import tpu_target

    t = tpu_target(target)
    assert t.devices[0].device_kind == kind
    assert device_spec(kind).name.lower().startswith(f"tpu {target.split('-')[0][:2]}")


# ------------------------------------------------------------------ against XLA


# Realistic steps (thousands of tokens); compiled on CPU without allocating anything.
# DeepSeek-V2-Lite's structure (latent attention, a dense first layer, routed and shared
# experts) at d 512, through the capacity path: XLA counts dropless ragged_dot as dense.
SMALL_DEEPSEEK = ["model.n_layers=3", "model.d_model=512", "model.n_heads=8", "model.d_ff=1024", "model.vocab_size=2048",
                  "model.moe.d_expert=256", "model.moe.num_experts=16", "model.moe.top_k=4", "model.moe.dispatch=capacity"]
FLOP_CASES = [
    pytest.param("gpt2-small", 512, 8, "none", [], id="gpt2-small"),
    pytest.param("llama3-1b", 1024, 4, "save_dots", [], id="llama3-1b"),
    pytest.param("llama3-8b", 2048, 2, "full", [], id="llama3-8b", marks=pytest.mark.slow),
    pytest.param("deepseek-v2-lite", 512, 4, "none", SMALL_DEEPSEEK, id="deepseek-v2-lite", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("preset, seq_len, batch, remat, extra", FLOP_CASES)
def test_analytic_flops_within_3_percent_of_xla(preset, seq_len, batch, remat, extra):
    """Hardware FLOPs of the dense-attention step (the whole score matrix, remat recompute, capacity slots,
    optimizer) vs XLA's cost analysis."""
    cfg = load_config(None, [f"model={preset}", f"data.seq_len={seq_len}", f"data.batch_size={batch}",
                             f"model.remat={remat}", "mesh.data=1", *extra])
    xla_flops = xla_total_flops(cfg)
    tokens = seq_len * batch
    analytic = hardware_flops_per_token(cfg.model, seq_len) * tokens
    analytic += optimizer_flops_per_param() * param_counts(cfg.model).total
    assert analytic == pytest.approx(xla_flops, rel=0.03)


# llama3-1b at its training shape (2048-token sequences, one per v5e chip) under its preset's bf16 policy.
# Left out for the suite's time, measured when the model was fitted (README): fsdp=16 with full remat and
# with save_dots.
MEMORY_CASES = {  # dense attention without remat: a step the compiler refuses (splash fits it: see the 8k test)
    "fsdp-none": ["mesh.fsdp=16", "model.remat=none", "model.attention=dense"],
    "fsdp8-tensor2-full": ["mesh.fsdp=8", "mesh.tensor=2", "model.remat=full"],
    "fsdp-none-splash": ["mesh.fsdp=16", "model.remat=none"],  # auto: splash on TPU
    # 512 tokens per chip: the tied table's gradient held whole in float32 (train/memory.py)
    "fsdp-full-512-tokens": ["mesh.fsdp=16", "model.remat=full", "data.seq_len=512"],
}


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
@pytest.mark.parametrize("case", [pytest.param("fsdp-none"),
                                  pytest.param("fsdp8-tensor2-full", marks=pytest.mark.slow),
                                  pytest.param("fsdp-none-splash", marks=pytest.mark.slow),
                                  pytest.param("fsdp-full-512-tokens", marks=pytest.mark.slow)])
def test_analytic_memory_within_10_percent_of_xla_on_v5e_16(case):
    from infra.mesh import logical_rules
    from infra.plan import compiled_memory, target_mesh
    from infra.targets import tpu_target
    from train.memory import estimate_memory
    from train.program import build_program

    cfg = load_config(None, ["model=llama3-1b", "data.seq_len=2048", "data.batch_size=16", "mesh.data=1",
                             *MEMORY_CASES[case]])  # a case's own data.seq_len comes after, and wins
    target = tpu_target("v5e-16")
    mesh = target_mesh(cfg, target)
    estimate = estimate_memory(build_program(cfg, mesh, logical_rules(cfg)))
    state = estimate.parameters + estimate.optimizer
    xla, required = compiled_memory(cfg, mesh)
    if xla is None:
        # Without remat, dense attention's scores need more than a v5e's 16 GiB: the compiler refuses the step
        # and says how much its temporaries need; the state beside them is exact.
        assert case == "fsdp-none" and required is not None
        assert estimate.total == pytest.approx(state + required, rel=0.10)
        return
    assert estimate.total == pytest.approx(xla.total, rel=0.10)
    # The state is exact, not modelled: the rest of the arguments are the batch and a few scalars.
    assert 0 <= xla.arguments - state < 256 * 1024


# ------------------------------------------------------------------ the command


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    import contextlib
    import io

    from infra.cli import main
    from tests.conftest import TINY_DATA, TINY_MODEL

    out, printed = tmp_path_factory.mktemp("plan"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["plan", *TINY_MODEL, *TINY_DATA, "mesh.data=-1", "--target", "cpu", "--json", "--out", str(out)]) == 0
    return json.loads(printed.getvalue())[0], out


def test_plan_on_the_local_mesh(tiny_plan):
    plan, out = tiny_plan
    assert plan["target"] == "cpu" and plan["devices"] == 8 and plan["mesh"] == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    assert plan["fits"] is True
    # d_model 32: norms, softmax and rotary are a tenth of the work; the presets are held to 3% above.
    assert abs(plan["flops_error"]) < 0.15
    assert plan["xla_memory"]["total"] > 0 and plan["analytic_memory"]["total"] > 0
    assert plan["tokens_per_second"] == pytest.approx(plan["tokens_per_step"] / plan["step_time_at_mfu_s"])
    assert plan["days_for_budget"] == pytest.approx(
        plan["token_budget"] / plan["tokens_per_second"] / 86400
    )
    report = (out / "report.md").read_text()
    assert "| fits | yes |" in report and "memory.png" in report
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "plan.json").read_text())[0]["target"] == "cpu"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "v7x-8"], "unknown target 'v7x-8'"),
        (["--target", "v5e-12"], "'v5e-12' is not a v5e slice"),
        (["data.batch_size=48", "mesh.tensor=2", "mesh.fsdp=3", "--target", "v5e-16"], "multiply to 6 but there are 16 devices"),
        (["--target", "v5e-16x2"], "mesh.data=1 is not divisible by 2"),
        (["--target", "cpu", "--mfu", "1.5"], "--mfu 1.5 must be in (0, 1]"),
        ([], "name at least one --target"),
    ],
)
def test_plan_bad_input_is_one_line_and_exit_2(args, message, capsys):
    from tests.conftest import refused

    refused(capsys, ["plan", "configs/models/tiny.yaml", *args], message)


def test_plan_refusal_in_a_fresh_process_is_one_clean_line():
    # A new process loads libtpu, whose start-up logging must not reach the user either.
    proc = run_cli("plan", "configs/models/tiny.yaml", "--target", "v5e-16x2", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "mesh.data=1 is not divisible by 2" in lines[0], proc.stderr


def test_tpu_target_without_libtpu_names_the_fix(monkeypatch):
    import infra.targets as targets
    from train.config import ConfigError

    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tpu\]'"):
        targets.tpu_target("v5e-16")


def test_preset_planning_defaults_shard_fully():
    from infra.commands.plan import PlanRequest, config_for

    cfg = config_for(PlanRequest("configs/models/llama3-8b.yaml", ["data.seq_len=1024"], ["v5p-64"]), 32)
    assert (cfg.data.seq_len, cfg.data.batch_size, cfg.mesh.data, cfg.mesh.fsdp) == (1024, 32, 1, -1)
    assert math.isclose(param_counts(cfg.model).total, 8_030_261_248)


def test_sweep_candidates_split_the_devices_and_the_batch_evenly():
    from infra.sweep import Candidate, rank, sweep_candidates
    from tests.conftest import tiny_config

    candidates = sweep_candidates(tiny_config(), 8)
    assert ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=2", "model.remat=full", "train.microbatches=1"] not in candidates
    assert ["mesh.data=4", "mesh.fsdp=1", "mesh.tensor=2", "model.remat=full", "train.microbatches=1"] in candidates
    chosen = [c for c in candidates if c[0] == "mesh.data=8" and c[-1] == "train.microbatches=1"]
    assert [c[3] for c in chosen] == ["model.remat=none", "model.remat=save_dots", "model.remat=full"]
    for c in candidates:  # every candidate's mesh fills 8 devices and splits each microbatch over its batch axes
        sizes = dict(o.split("=") for o in c)
        data, fsdp, tensor, micro = (int(sizes[k]) for k in ("mesh.data", "mesh.fsdp", "mesh.tensor", "train.microbatches"))
        assert data * fsdp * tensor == 8 and (8 // micro) % (data * fsdp) == 0
    a, b, c = (Candidate([n], fits, mem, t) for n, fits, mem, t in (("a", True, 5, 2.0), ("b", True, 3, 2.0),
                                                                      ("c", False, 1, 1.0)))
    assert [x.overrides for x in rank([c, a, b])] == [["b"], ["a"], ["c"]]  # fitting, fastest, most memory to spare


@pytest.mark.slow
def test_sweep_ranks_fitting_plans_and_kills_slow_compiles():
    from infra.sweep import run_sweep, sweep_candidates
    from infra.targets import local_target
    from tests.conftest import tiny_config

    cfg = tiny_config()
    target = local_target()
    chosen = [c for c in sweep_candidates(cfg, 8) if c[0] == "mesh.data=8" and c[-1] == "train.microbatches=1"]
    ranked = run_sweep(cfg, target, [chosen[2], chosen[0]], jobs=1, timeout_s=300)
    assert [c.overrides for c in ranked] == [chosen[0], chosen[2]], ranked  # no recompute beats full remat
    assert all(c.fits and c.memory_bytes > 0 for c in ranked)
    assert ranked[0].step_time_s < ranked[1].step_time_s

    (slow,) = run_sweep(cfg, target, [chosen[1]], jobs=1, timeout_s=0.5)
    assert not slow.fits and "over 0.5 s" in slow.error


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_budget_suggests_chinchilla_sizes_and_days_on_the_target():
    proc = run_cli("plan", "--budget-flops", "5.76e23", "--target", "v5p-128", "--mfu", "0.5", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(proc.stdout)
    assert row["parameters"] == pytest.approx(6.93e10, rel=0.01) and row["tokens"] == pytest.approx(1.39e12, rel=0.01)
    # 64 v5p chips at 459 TFLOP/s and 50% MFU.
    assert row["days_on_target"] == pytest.approx(5.76e23 / (64 * 459e12 * 0.5) / 86400)


# ------------------------------------------------------------------ attention kernels on TPU


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_the_tpu_step_runs_the_splash_kernel():
    """Compiled ahead of time for a v5e topology, the train step holds splash's Pallas kernels (forward, dq,
    dk/dv) as TPU custom calls: model.attention=auto picks splash on TPU."""
    from infra.plan import compile_train_step, target_mesh
    from infra.targets import tpu_target
    from tests.conftest import TINY_MODEL

    cfg = load_config(None, [*TINY_MODEL, "model.d_model=256", "model.n_heads=2", "model.n_kv_heads=1",
                             "model.max_seq_len=256", "data.seq_len=256", "data.batch_size=4", "mesh.data=-1"])
    _, compiled = compile_train_step(cfg, target_mesh(cfg, tpu_target("v5e-4")))
    assert compiled.as_text().count("tpu_custom_call") == 3


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_llama3_8b_at_8k_tokens_fits_v5p_64_with_splash_and_not_with_dense():
    from infra.mesh import logical_rules
    from infra.plan import compiled_memory, memory_error, target_mesh
    from infra.targets import tpu_target
    from train.memory import estimate_memory
    from train.program import build_program

    target, figures = tpu_target("v5p-64"), {}
    for impl in ("splash", "dense"):
        cfg = load_config(None, ["model=llama3-8b", "data.seq_len=8192", "data.batch_size=32", "mesh.data=1",
                                 "mesh.fsdp=-1", "model.remat=none", f"model.attention={impl}"])
        mesh = target_mesh(cfg, target)
        figures[impl] = (estimate_memory(build_program(cfg, mesh, logical_rules(cfg))), *compiled_memory(cfg, mesh))
    estimate, xla, required = figures["splash"]
    assert xla is not None and xla.total <= target.memory_bytes  # measured 94.5 GiB of 95
    assert abs(memory_error(estimate, xla, required)) < 0.10  # measured +2.6%
    estimate, xla, required = figures["dense"]
    assert xla is None and required > 4 * target.memory_bytes  # the compiler asks for 471 GiB of temporaries
    assert abs(memory_error(estimate, xla, required)) < 0.10  # 493 GiB against 471 beside the state


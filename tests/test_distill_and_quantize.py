"""Distillation (the loss, the frozen teacher, offline top K) and `tessera quantize` on a trained run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from infra.cli import main
from infra.mesh import DEFAULT_RULES
from tests.conftest import TINY_DATA, TINY_MODEL, mesh_for, refused, tiny_config
from train.config import DistillConfig, dump_config
from train.objectives.distillation import combine, kl_per_position, topk_truncation_bound
from train.teacher import load_teacher
from train.program import build_program

TEACHER = ["model.n_layers=2", "model.d_model=32", "model.d_ff=64"]  # the tiny model
TINY_ARGS = [*TINY_MODEL, *TINY_DATA, "mesh.data=-1"]  # the CLI runs on all 8 devices
STUDENT = ["model.n_layers=1", "model.d_model=16", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=32"]


# ------------------------------------------------------------ the loss, by hand


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_distillation_loss_equals_a_hand_computation(kind):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 3, 11)) * 3, rng.normal(size=(2, 3, 11)) * 3
    targets, weights = rng.integers(0, 11, (2, 3)), np.array([[1, 1, 0], [1, 0, 1]], np.float64)
    cfg = DistillConfig(teacher="t", temperature=2.5, alpha=0.3, kl=kind)
    p, q = np.exp(_log_softmax(teacher / 2.5)), np.exp(_log_softmax(student / 2.5))
    kl = (p * np.log(p / q)).sum(-1) if kind == "forward" else (q * np.log(q / p)).sum(-1)
    ce = -np.take_along_axis(_log_softmax(student), targets[..., None], -1)[..., 0]
    expected = 0.3 * 2.5**2 * (kl * weights).sum() / weights.sum() + 0.7 * (ce * weights).sum() / weights.sum()

    got_kl = kl_per_position(jnp.asarray(student, jnp.float32), 2.5, kind, teacher_logits=jnp.asarray(teacher, jnp.float32))
    np.testing.assert_allclose(np.asarray(got_kl), kl, rtol=1e-5, atol=1e-6)
    got = combine(cfg, float(jnp.sum(got_kl * weights)) / weights.sum(), (ce * weights).sum() / weights.sum())
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_top_k_kl_is_within_its_stated_truncation_bound():
    key_s, key_t = jax.random.split(jax.random.key(0))
    student, teacher = jax.random.normal(key_s, (4, 16, 64)) * 2, jax.random.normal(key_t, (4, 16, 64)) * 4
    full = kl_per_position(student, 2.0, "forward", teacher_logits=teacher)
    for k in (4, 16):
        t = jax.nn.log_softmax(teacher / 2.0)
        topk = jax.lax.top_k(t, k)
        truncated = kl_per_position(student, 2.0, "forward", topk=topk)
        bound = topk_truncation_bound(teacher, student, 2.0, k)
        gap = jnp.abs(full - truncated)
        assert bool(jnp.all(gap <= bound + 1e-6)) and float(gap.max()) > 1e-3, k
    everything = kl_per_position(student, 2.0, "forward", topk=jax.lax.top_k(jax.nn.log_softmax(teacher / 2.0), 64))
    np.testing.assert_allclose(np.asarray(everything), np.asarray(full), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ the step: alpha = 0, frozen teacher


def _distill_program(rules, teacher_cfg, *overrides):
    cfg = tiny_config(*STUDENT, "optimizer.warmup_steps=0", "distill.teacher=unused", *overrides)
    from train.state import abstract_model

    teacher_model = abstract_model(teacher_cfg.model, teacher_cfg.precision.policy.model)
    return cfg, build_program(cfg, mesh_for(cfg, 1), rules, teacher=teacher_model)


@pytest.mark.slow
def test_distillation_step_alpha_zero_is_plain_training_and_teacher_stays_frozen(rules):
    teacher_cfg = tiny_config(*TEACHER, "model.init_std=0.3")  # large weights: a teacher with opinions
    teacher_params = build_program(teacher_cfg, mesh_for(teacher_cfg, 1), rules).init_state()["params"]
    frozen = jax.tree.map(np.array, teacher_params)
    plain_cfg = tiny_config(*STUDENT, "optimizer.warmup_steps=0")  # the first step moves the weights
    plain = build_program(plain_cfg, mesh_for(plain_cfg, 1), rules)
    from train.data.corpus import load_corpus, train_batches

    corpus = load_corpus(plain_cfg)
    rows = next(iter(train_batches(corpus.train, 8).to_iter_dataset()))
    batch = plain.device_batch(rows)
    plain_state, plain_metrics = plain.train_step(plain.init_state(), batch)

    _, alpha0 = _distill_program(rules, teacher_cfg, "distill.alpha=0")
    state, metrics = alpha0.train_step(alpha0.init_state(), batch, teacher_params)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(plain_state["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert float(metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), rel=1e-6)
    assert float(metrics["distill_kl"]) > 0.01  # the teacher ran; its term just carried no weight

    _, alpha1 = _distill_program(rules, teacher_cfg, "distill.alpha=1", "distill.temperature=2")
    state, metrics = alpha1.train_step(alpha1.init_state(), batch, teacher_params)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(state["params"]),
                                                           jax.tree.leaves(plain_state["params"]))]
    assert max(moved) > 1e-4  # a different loss moved the student differently
    for a, b in zip(jax.tree.leaves(teacher_params), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    # No teacher in the student's state, its optimizer state or its checkpoints: the same trees as plain training.
    assert jax.tree.structure(state) == jax.tree.structure(plain_state)


# ------------------------------------------------------------ a trained teacher: distill and quantize it


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from train.loop import train

    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    cfg = tiny_config(*TEACHER, "train.steps=30", "optimizer.warmup_steps=2", "train.eval_every=30",
                      "train.log_every=30", "train.eval_batches=1", "checkpoint.every=30", f"run.dir={run_dir}")
    train(cfg, mesh_for(cfg, 1), dict(DEFAULT_RULES))
    return run_dir


def _student_args(teacher_run, run_dir, *more):
    return [*TINY_ARGS, *STUDENT, f"distill.teacher={teacher_run}", "train.steps=3", "train.log_every=1",
            "train.eval_every=3", "train.eval_batches=1", f"run.dir={run_dir}", *more]


@pytest.mark.slow
def test_offline_top_k_files_hold_the_training_batches_and_the_teachers_top_k(teacher_run, tmp_path, capsys, rules):
    out = tmp_path / "topk"
    assert main(["distill", *_student_args(teacher_run, tmp_path / "s"), "--dump-teacher-topk", "5", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["k"] == 5 and meta["batches"] == 3 and meta["temperature"] == 2.0
    from train.data.corpus import load_corpus, train_batches
    from train.teacher import TopKBatches

    cfg = tiny_config(*STUDENT, f"distill.teacher={teacher_run}", "train.steps=3")
    first = next(iter(train_batches(load_corpus(cfg).train, 8).to_iter_dataset()))
    dumped = next(TopKBatches(out, 0, 1))
    for key in first:
        np.testing.assert_array_equal(dumped[key], first[key])  # the batch the student would have drawn
    teacher = load_teacher(cfg, mesh_for(cfg, 1), rules, load_corpus(cfg).tokenizer)
    logits = nnx.merge(teacher.model.graphdef, teacher.params)(jnp.asarray(first["inputs"]),
                                                               jnp.asarray(first["positions"]),
                                                               jnp.asarray(first["segment_ids"]))
    values, ids = jax.lax.top_k(jax.nn.log_softmax(logits / 2.0), 5)
    np.testing.assert_allclose(dumped["teacher_logprobs"], np.asarray(values), rtol=1e-5, atol=1e-5)
    assert (dumped["teacher_ids"] == np.asarray(ids)).mean() > 0.99  # ties may order differently

    assert main(["distill", *_student_args(teacher_run, tmp_path / "offline", f"distill.teacher_topk={out}")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "offline" / "metrics.jsonl").read_text().splitlines()]
    kls = [x["distill_kl"] for x in lines if "distill_kl" in x]
    assert len(kls) == 3 and all(np.isfinite(kls))
    capsys.readouterr()
    refused(capsys, ["distill", *_student_args(teacher_run, tmp_path / "x", f"distill.teacher_topk={out}",
                                                "train.steps=4")], "hold 3 batches")
    refused(capsys, ["distill", *_student_args(teacher_run, tmp_path / "x", f"distill.teacher_topk={out}",
                                                "distill.kl=reverse")], "distill.kl=reverse")


def test_distill_refusals(teacher_run, tmp_path, capsys):
    from train.tokenizer import train_bpe

    tokenizer = tmp_path / "tokenizer.json"
    train_bpe(["def f(x): return x + 1\n" * 50, "class A: pass\n" * 50], 300, tokenizer)
    refused(capsys, ["distill", *_student_args(teacher_run, tmp_path / "s", f"data.tokenizer={tokenizer}",
                                                "model.vocab_size=320")], "same tokenizer", watch=tmp_path / "s")
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.yaml").write_text(dump_config(tiny_config(*TEACHER, f"run.dir={untrained}")))
    refused(capsys, ["distill", *_student_args(untrained, tmp_path / "s")], "has no checkpoint yet", watch=tmp_path / "s")
    refused(capsys, ["distill", *_student_args(teacher_run, tmp_path / "s", "model.vocab_size=300")],
            "model.vocab_size=264 differs")
    refused(capsys, ["train", *_student_args(teacher_run, tmp_path / "s")], "run it with `tessera distill`")
    refused(capsys, ["distill", *_student_args(teacher_run, tmp_path / "s", "model.max_seq_len=128", "data.seq_len=128")],
            "teacher's model.max_seq_len=64 is shorter")
    refused(capsys, ["launch", "local", "--processes", "2", "--devices-per-process", "4", "--",
                     "distill", *_student_args(teacher_run, tmp_path / "s"), "--dump-teacher-topk", "4", "--out",
                     str(tmp_path / "k")], "runs on one host")
    refused(capsys, ["distill", *TINY_ARGS], "needs a distill section")


def test_a_quantization_aware_run_quantizes_to_a_serving_config(tmp_path):
    from train.quantize import quantized_config
    from model.config import WeightQuantConfig

    qat = tiny_config("model.qat.dtype=int8")
    served = quantized_config(qat, tmp_path / "q", WeightQuantConfig(method="int4-weight-only", group_size=16))
    assert served.model.qat is None and served.model.weight_quant.method == "int4-weight-only"
    assert served.run.dir == str(tmp_path / "q") and served.model.n_layers == qat.model.n_layers


def test_quantize_a_trained_run_and_sample_from_it(teacher_run, tmp_path, capsys, rules):
    out = tmp_path / "int8"
    assert main(["quantize", str(teacher_run), "--method", "int8-weight-only", "--out", str(out),
                 "--decode-tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads((out / "quantize_report.json").read_text())
    assert report["weights"] == 7  # q, k, v, o and the three SwiGLU matrices of the layer stack
    assert report["param_bytes_after"] < 0.6 * report["param_bytes_before"]
    assert abs(report["bits_per_byte_after"] - report["bits_per_byte_before"]) < 0.01
    assert report["decode_tokens_per_sec_after"] > 0

    from train.inference import load_trained

    cfg = tiny_config(*TEACHER)
    mesh = mesh_for(cfg, 1)
    quantized, original = load_trained(out, mesh, rules), load_trained(teacher_run, mesh, rules)
    q = quantized.params["blocks"]["mlp"]["wi"]
    assert isinstance(q, qwix.QArray) and q.qvalue.dtype == jnp.int8
    tokens = jnp.arange(32).reshape(2, 16) % 200
    reference = nnx.merge(original.model.graphdef, original.params)(tokens)
    logits = nnx.merge(quantized.model.graphdef, quantized.params)(tokens)
    assert float(jnp.linalg.norm(logits - reference) / jnp.linalg.norm(reference)) < 0.01

    assert main(["sample", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert "completion 0" in capsys.readouterr().out
    refused(capsys, ["quantize", str(teacher_run), "--method", "int3", "--out", str(tmp_path / "x")], "int3")
    refused(capsys, ["quantize", str(teacher_run), "--method", "int4-weight-only", "--group-size", "12",
                     "--out", str(tmp_path / "x")], "groups of 12")
    refused(capsys, ["quantize", str(teacher_run), "--method", "int4-weight-only", "--layers", "attention,router",
                     "--out", str(tmp_path / "x")], "router")
    refused(capsys, ["quantize", str(out), "--method", "int8-weight-only", "--out", str(tmp_path / "x")],
            "already quantized")
    refused(capsys, ["train", str(out)], "weight-only quantized model for serving")


def test_distillation_launches_like_training(teacher_run, tmp_path, capsys):
    job = _student_args(teacher_run, tmp_path / "s", "mesh.data=8")
    assert main(["launch", "slurm", "--nodes", "1", "--tasks-per-node", "2", "--cpu-devices", "4", "--dry-run",
                 "--", "distill", *job]) == 0
    script = capsys.readouterr().out
    assert "srun" in script and " distill " in script and f"distill.teacher={teacher_run}" in script

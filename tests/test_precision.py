"""The precision policy, quantization-aware training and weight-only quantization: dtypes where the
policy says, losses that track float32, quantization errors within their bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from model.config import ModelConfig, WeightQuantConfig
from model.precision import quantize_weight
from model.transformer import Transformer
from tests.conftest import mesh_for, tiny_config
from train.config import ConfigError
from train.recipes import load_config
from train.data.corpus import load_corpus, train_batches
from train.program import build_program

POLICIES = {  # preset (or explicit keys) -> (param, compute, grads, master copy)
    "fp32": ("float32", "float32", "float32", False),
    "bf16": ("float32", "bfloat16", "float32", False),
    "bf16-pure": ("bfloat16", "bfloat16", "bfloat16", True),
    "precision.grads=bfloat16": ("float32", "bfloat16", "bfloat16", False),  # gradients leave in another dtype
}


def _eqns(jaxpr):
    """Every equation of a jaxpr, inside scans, custom VJPs and nested jits too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


@pytest.mark.parametrize("preset", POLICIES)
def test_each_policy_puts_its_dtypes_at_every_layer(preset, rules):
    param, compute, grads, master = POLICIES[preset]
    policy = [preset, "precision.compute=bfloat16"] if "=" in preset else [f"precision.preset={preset}"]
    cfg = tiny_config(*policy)
    program = build_program(cfg, mesh_for(cfg, 1), rules)
    state = program.abstract_state()
    assert {p.dtype for p in jax.tree.leaves(state["params"])} == {jnp.dtype(param)}
    assert ("master" in state) == master
    if master:
        assert {p.dtype for p in jax.tree.leaves(state["master"])} == {jnp.dtype("float32")}
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert moments and {x.dtype for x in moments} == {jnp.dtype("float32")}

    graphdef = program.model.graphdef
    tokens = jnp.zeros((2, 8), jnp.int32)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens)
        return jnp.mean(logits), logits

    params = state["params"]
    jaxpr = jax.make_jaxpr(lambda p: loss(p)[1])(params)
    dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    # The scanned layer's q, k, v, scores, values, out, and SwiGLU's three, then the LM head: all of them
    # run on compute-dtype operands.
    assert len(dots) == 9 + 1
    assert {v.aval.dtype for e in dots for v in e.invars} == {jnp.dtype(compute)}
    assert jaxpr.out_avals[0].dtype == jnp.float32  # logits dtype
    grad_shapes = jax.eval_shape(jax.grad(lambda p: loss(p)[0]), params)
    assert {g.dtype for g in jax.tree.leaves(grad_shapes)} == {jnp.dtype(grads)}


@pytest.mark.parametrize("dtype, quantized", [("int8", "int8"), ("fp8", "float8_e4m3fn")])
def test_qat_quantizes_exactly_the_chosen_matmuls(dtype, quantized):
    cfg = tiny_config(f"model.qat.dtype={dtype}", "model.qat.layers=[mlp]").model
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(jnp.zeros((2, 8), jnp.int32)))(params)
    dots = [{v.aval.dtype for v in e.invars} for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    # The scanned layer's three MLP products on quantized operands; attention's six and the LM head's stay float.
    assert sum(kinds == {jnp.dtype(quantized)} for kinds in dots) == 3
    assert sum(kinds == {jnp.dtype("float32")} for kinds in dots) == 7


def test_a_key_set_apart_from_the_preset_wins_and_the_rest_is_the_presets(rules):
    cfg = tiny_config("precision.optimizer_state=bfloat16")
    state = build_program(cfg, mesh_for(cfg, 1), rules).abstract_state()
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0} == {jnp.dtype("bfloat16")}
    policy = tiny_config("precision.preset=bf16-pure", "precision.compute=float16").precision.policy
    assert (policy.params, policy.compute, policy.grads, policy.master_weights) == ("bfloat16", "float16", "bfloat16", True)
    with pytest.raises(ConfigError, match="master_weights keeps a float32 copy .* parameters are float32"):
        tiny_config("precision.master_weights=true")
    with pytest.raises(ConfigError, match="model.dtype is now precision.compute"):
        tiny_config("model.dtype=bfloat16")
    with pytest.raises(ConfigError, match="qat.layers may not include 'experts'"):
        load_config(None, ["model=tiny-moe", "model.qat.layers=[experts]"])


# ------------------------------------------------------------ training under each policy and QAT

STEPS = 25
RUNS = {
    "fp32": ["precision.preset=fp32"],
    "bf16": ["precision.preset=bf16"],
    "bf16-pure": ["precision.preset=bf16-pure"],
    "qat-int8": ["precision.preset=bf16", "model.qat.dtype=int8"],
}


@pytest.fixture(scope="module")
def trained(rules):
    """name -> (train losses, held-out loss after STEPS) for each policy, same data and seed."""
    base = ["optimizer.lr=3e-3", "optimizer.warmup_steps=2", f"train.steps={STEPS}", "data.batch_size=8"]
    corpus = load_corpus(tiny_config(*base))
    batches = iter(train_batches(corpus.train, 8).to_iter_dataset())
    train_rows = [next(batches) for _ in range(STEPS)]
    heldout = corpus.heldout.rows(np.arange(8))
    out = {}
    for name, overrides in RUNS.items():
        cfg = tiny_config(*base, *overrides)
        program = build_program(cfg, mesh_for(cfg, 1), rules)
        state, losses = program.init_state(), []
        for rows in train_rows:
            state, metrics = program.train_step(state, program.device_batch(rows))
            losses.append(float(metrics["loss"]))
        # A step reports the loss of the parameters it starts from: on held-out rows, their held-out loss.
        _, metrics = program.train_step(state, program.device_batch(heldout))
        out[name] = (np.array(losses), float(metrics["loss"]))
    return out


@pytest.mark.slow
def test_bf16_policies_track_float32(trained):
    fp32, _ = trained["fp32"]
    assert fp32[-5:].mean() < fp32[:5].mean() - 0.5  # it learns
    for name, tolerance in (("bf16", 0.01), ("bf16-pure", 0.03)):
        losses, _ = trained[name]
        assert np.all(np.abs(losses - fp32) / fp32 < tolerance), (name, np.abs(losses - fp32) / fp32)


@pytest.mark.slow
def test_int8_quantization_aware_training_learns_close_to_bf16(trained):
    _, bf16_eval = trained["bf16"]
    losses, eval_loss = trained["qat-int8"]
    assert losses[-5:].mean() < losses[:5].mean() - 0.5
    assert abs(eval_loss - bf16_eval) < 0.05 * bf16_eval, (eval_loss, bf16_eval)


def test_fp8_matmul_is_e4m3_forward_e5m2_backward_and_close():
    from model.precision import qat_einsum

    x = jax.random.normal(jax.random.key(0), (4, 8, 32))
    w = jax.random.normal(jax.random.key(1), (32, 16)) * 0.1

    def loss(w, spec="bld,df->blf"):
        return jnp.sum(jnp.sin(qat_einsum(spec, x, w, "fp8")))

    dots = [e for e in _eqns(jax.make_jaxpr(jax.value_and_grad(loss))(w).jaxpr) if e.primitive.name == "dot_general"]
    kinds = [{v.aval.dtype for v in e.invars} for e in dots]
    assert {jnp.dtype("float8_e4m3fn")} in kinds  # the forward product
    assert any(jnp.dtype("float8_e5m2") in k for k in kinds)  # gradients enter the backward products as e5m2
    value, grad = jax.value_and_grad(loss)(w)
    ref_value, ref_grad = jax.value_and_grad(lambda w: jnp.sum(jnp.sin(jnp.einsum("bld,df->blf", x, w))))(w)
    assert abs(float(value - ref_value)) < 0.05 * float(jnp.sum(jnp.abs(jnp.sin(jnp.einsum("bld,df->blf", x, w)))))
    assert float(jnp.linalg.norm(grad - ref_grad) / jnp.linalg.norm(ref_grad)) < 0.1


# ------------------------------------------------------------ weight-only quantization


@pytest.mark.parametrize("method, group, qmax", [("int8-weight-only", None, 127), ("int4-weight-only", 8, 7)])
def test_quantize_dequantize_error_is_half_a_step(method, group, qmax):
    w = jax.random.normal(jax.random.key(0), (3, 16, 4, 8)) * jnp.linspace(0.1, 3, 8)  # [layers, d, heads, hd]
    q = quantize_weight(w, contract=1, outputs=2, cfg=WeightQuantConfig(method=method, group_size=group))
    assert q.qvalue.dtype == (jnp.int8 if qmax == 127 else jnp.int4)
    x = np.asarray(w, np.float64)
    blocks = x.reshape(3, 16 // (group or 16), group or 16, 4, 8)
    absmax = np.abs(blocks).max(axis=2)  # one scale per (layer, group, head, channel)
    np.testing.assert_allclose(np.asarray(q.scale), absmax / (qmax + 0.5), rtol=1e-6)
    step = np.repeat(absmax / (qmax + 0.5), group or 16, axis=1)
    error = np.abs(np.asarray(qwix.dequantize(q), np.float64) - x)
    assert np.all(error <= step / 2 * (1 + 1e-4))  # float32 rounding of x / scale
    assert error.max() > step.max() / 50  # it is quantized, not a copy


@pytest.mark.parametrize("method, group, bound", [("int8-weight-only", None, 0.01), ("int4-weight-only", 16, 0.1)])
def test_weight_only_matmul_stays_close(method, group, bound):
    """The serving path: a stored QArray weight is dequantized inside the matmul (qwix)."""
    from model.precision import Numerics

    cfg = ModelConfig(weight_quant=WeightQuantConfig(method=method, group_size=group))
    x = jax.random.normal(jax.random.key(0), (2, 8, 64))
    w = jax.random.normal(jax.random.key(1), (64, 4, 16))
    param = nnx.Param(quantize_weight(w, 1, 2, cfg.weight_quant))
    y = Numerics.of(cfg).matmul("bld,dhk->blhk", x, param, "attention")
    reference = jnp.einsum("bld,dhk->blhk", x, w)
    error = float(jnp.linalg.norm(y - reference) / jnp.linalg.norm(reference))
    assert error < bound, error
    assert error > bound / 100  # the weights really are quantized


def test_a_run_written_with_dtypes_in_the_model_section_still_resumes(tmp_path):
    """Before the precision policy had one place, config.yaml kept the dtypes in the model section."""
    import yaml

    from train.recipes import load_config
    from train.run_dir import check_run_dir

    def write_legacy(precision: dict, **dtypes):
        tree = tiny_config().model_dump(mode="json")
        tree["model"].update(dtypes)
        tree["precision"] = precision
        del tree["distill"]
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))

    # A bf16-pure run: the preset filled the model's dtypes and the optimizer's.
    write_legacy({"preset": "bf16-pure", "optimizer_state": "float32", "master_weights": True},
                 param_dtype="bfloat16", dtype="bfloat16", logits_dtype="float32", grad_dtype="bfloat16")
    cfg = tiny_config("precision.preset=bf16-pure", tmp_path=tmp_path)
    assert load_config(tmp_path).precision.policy == cfg.precision.policy
    assert check_run_dir(cfg) == tmp_path  # the same policy, named by other keys: resumes without --force
    with pytest.raises(ConfigError, match="different model"):
        check_run_dir(tiny_config("model.d_ff=128", tmp_path=tmp_path))
    # A run without a preset: an unset optimizer or gradient dtype followed the parameters'.
    write_legacy({"preset": None, "optimizer_state": None, "master_weights": False},
                 param_dtype="bfloat16", dtype="bfloat16", logits_dtype="float32", grad_dtype=None)
    policy = load_config(tmp_path).precision.policy
    assert (policy.params, policy.compute, policy.grads, policy.optimizer_state, policy.master_weights) == (
        "bfloat16", "bfloat16", "bfloat16", "bfloat16", False)
    # ... and with a master copy, the optimizer updated the float32 copy: its moments were float32.
    write_legacy({"preset": None, "optimizer_state": None, "master_weights": True},
                 param_dtype="bfloat16", dtype="bfloat16", logits_dtype="float32", grad_dtype=None)
    policy = load_config(tmp_path).precision.policy
    assert (policy.params, policy.optimizer_state, policy.master_weights) == ("bfloat16", "float32", True)

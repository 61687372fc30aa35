"""Mixture of experts: routing, both dispatch paths against a per-token reference, the
auxiliary losses by hand, and expert parallelism against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from model.flops import param_counts
from model.moe import MoeMlp, capacity_experts, load_balancing_loss, route
from model.config import Precision
from model.precision import Numerics
from tests.conftest import mesh_for, tiny_config

E, K, D, F = 4, 2, 16, 24


def moe_model(**moe) -> ModelConfig:
    return ModelConfig(
        n_layers=2, d_model=D, n_heads=2, d_ff=32, vocab_size=64, max_seq_len=32,
        moe={"num_experts": E, "top_k": K, "d_expert": F, **moe},
    )


def layer_and_input(seed=0, shape=(2, 8), **moe):
    cfg = moe_model(**moe)
    layer = MoeMlp(cfg, Numerics.of(cfg), nnx.Rngs(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (*shape, D))
    return layer, x


def reference(params, x):
    """Loop over tokens; run each chosen expert's SwiGLU MLP on that token alone; float32."""
    b, s, _ = x.shape
    logits = x @ params["router"]
    probs = jax.nn.softmax(logits, axis=-1)
    out = []
    for i in range(b * s):
        t = x.reshape(b * s, D)[i]
        p = probs.reshape(b * s, E)[i]
        chosen = jnp.argsort(-p)[:K]
        w = p[chosen] / jnp.sum(p[chosen])
        y = jnp.zeros(D)
        for j in range(K):
            e = chosen[j]
            h = jax.nn.silu(t @ params["wg"][e]) * (t @ params["wi"][e])
            y = y + w[j] * (h @ params["wo"][e])
        out.append(y)
    return jnp.stack(out).reshape(b, s, D)


def layer_params(layer):
    return nnx.to_pure_dict(nnx.state(layer))


def apply(layer, params, x):
    return nnx.merge(nnx.graphdef(layer), params)(x, jnp.ones(x.shape[:2], bool))[0]


def test_dropless_equals_per_token_reference_with_gradients():
    layer, x = layer_and_input(shape=(1, 6))  # the reference unrolls a loop per token
    params = layer_params(layer)
    np.testing.assert_allclose(apply(layer, params, x), jax.jit(reference)(params, x), rtol=1e-5, atol=1e-6)
    probe = jax.random.normal(jax.random.key(7), x.shape)
    got = jax.jit(jax.grad(lambda p: jnp.sum(apply(layer, p, x) * probe)))(params)
    want = jax.jit(jax.grad(lambda p: jnp.sum(reference(p, x) * probe)))(params)
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_capacity_path_with_room_for_every_token_equals_dropless():
    dropless, x = layer_and_input()
    roomy, _ = layer_and_input(dispatch="capacity", capacity_factor=E / K)  # every expert can take all 8 tokens
    valid = jnp.ones(x.shape[:2], bool)
    y_capacity, aux = roomy(x, valid)
    np.testing.assert_allclose(y_capacity, dropless(x, valid)[0], rtol=1e-5, atol=1e-6)
    assert float(aux["moe_dropped_fraction"]) == 0.0


def test_small_capacity_drops_exactly_the_overflow_choices():
    layer, x = layer_and_input()
    params = layer_params(layer)
    valid = jnp.ones(x.shape[:2], bool)
    weights, experts, _ = route(x @ params["router"], K, "softmax", True)
    slots = 2
    y, kept = capacity_experts(x, weights, experts, valid, params["wi"], params["wg"], params["wo"], slots)

    # Choice-major priority: every token's first choice in sequence order, then the second choices.
    experts_np, want_kept = np.asarray(experts), np.zeros(experts.shape, bool)
    for b in range(x.shape[0]):
        filled = np.zeros(E, int)
        for j in range(K):
            for s in range(x.shape[1]):
                e = experts_np[b, s, j]
                want_kept[b, s, j] = filled[e] < slots
                filled[e] += 1
    np.testing.assert_array_equal(np.asarray(kept), want_kept)
    assert 0 < want_kept.sum() < want_kept.size  # the case really drops some and keeps some

    # Kept choices contribute exactly what the reference's expert gives them; dropped ones nothing.
    h = jnp.einsum("bsd,edf->bsef", x, params["wi"]) * jax.nn.silu(jnp.einsum("bsd,edf->bsef", x, params["wg"]))
    per_expert = jnp.einsum("bsef,efd->bsed", h, params["wo"])
    chosen = jnp.take_along_axis(per_expert, experts[..., None], axis=2)  # [b, s, k, d]
    want = jnp.sum(chosen * (weights * want_kept)[..., None], axis=2)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_by_hand_and_its_balanced_minimum():
    # 4 tokens, 2 experts, top-1: three tokens go to expert 0, one to expert 1.
    probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    experts = jnp.array([[0], [0], [0], [1]])
    valid = jnp.ones(4)
    fractions, mean_prob = np.array([0.75, 0.25]), np.array([2.6, 1.4]) / 4
    assert float(load_balancing_loss(probs, experts, valid)) == pytest.approx(2 * np.sum(fractions * mean_prob))

    balanced = jnp.array([[0], [1], [0], [1]])
    assert float(load_balancing_loss(probs, balanced, valid)) == pytest.approx(1.0)
    # Routing that follows the router's own preferences is never below the balanced value.
    for seed in range(20):
        logits = jax.random.normal(jax.random.key(seed), (64, 8)) * 2
        _, chosen, p = route(logits, 2, "softmax", True)
        assert float(load_balancing_loss(p, chosen, jnp.ones(64))) >= 1.0 - 1e-6


def test_padding_takes_no_part_in_routing_statistics():
    layer, x = layer_and_input(dispatch="capacity")
    valid = jnp.ones(x.shape[:2], bool).at[:, 4:].set(False)
    y, aux = layer(x, valid)
    _, aux_cut = layer(x[:, :4], valid[:, :4])
    assert np.all(np.asarray(y[:, 4:]) == 0)
    for name in ("moe_aux_loss", "moe_z_loss", "moe_expert_load"):
        np.testing.assert_allclose(aux[name], aux_cut[name], rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------- expert parallelism

MOE_TRAIN = ["model.moe={num_experts: 4, top_k: 2, d_expert: 32, num_shared_experts: 1}"]


def one_step(cfg, n_devices, initial=None):
    """One train step from `initial` (a state, placed on this mesh) or a fresh one."""
    from infra.mesh import DEFAULT_RULES
    from train.program import build_program

    program = build_program(cfg, mesh_for(cfg, n_devices), dict(DEFAULT_RULES))
    rng = np.random.default_rng(0)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    rows = {
        "inputs": rng.integers(0, 256, shape).astype(np.int32),
        "targets": rng.integers(0, 256, shape).astype(np.int32),
        "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
        "segment_ids": np.ones(shape, np.int32),
        "weights": np.ones(shape, np.float32),
    }
    state = program.init_state() if initial is None else jax.device_put(initial, program.shardings)
    batch = program.device_batch(rows)
    start = jax.device_get(state)  # the step donates its input
    compiled = program.train_step.lower(state, batch).compile()
    new_state, metrics = compiled(state, batch)
    return jax.device_get(new_state["params"]), jax.device_get(metrics), compiled.as_text(), start


@pytest.fixture(scope="module")
def one_device_steps():
    """Per dispatch path: the one-device step's results, and the initial state (shared by both paths)."""
    results, initial = {}, None
    for dispatch in ("capacity", "dropless"):
        params, metrics, _, initial = one_step(tiny_config(*MOE_TRAIN, f"model.moe.dispatch={dispatch}"), 1, initial)
        results[dispatch] = (params, metrics, initial)
    return results


@pytest.mark.parametrize(
    "mesh,dispatch",
    [
        (["mesh.data=1", "mesh.expert=2", "mesh.fsdp=2", "mesh.tensor=2"], "capacity"),
        (["mesh.data=1", "mesh.expert=4", "mesh.fsdp=2"], "dropless"),
    ],
    ids=["expert2-fsdp2-tensor2-capacity", "expert4-fsdp2-dropless"],
)
@pytest.mark.slow
def test_expert_parallel_step_equals_one_device(one_device_steps, mesh, dispatch):
    cfg = tiny_config(*MOE_TRAIN, f"model.moe.dispatch={dispatch}", *mesh)
    want_params, want_metrics, initial = one_device_steps[dispatch]
    params, metrics, hlo, _ = one_step(cfg, 8, initial)
    for key in ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss", "moe_dropped_fraction"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(metrics["moe_expert_load"], want_metrics["moe_expert_load"], atol=1e-6)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # Tokens travel to their experts' devices, not the experts to the tokens: all-to-all for the
    # capacity path; for dropless, an expert group's tokens are gathered and the outputs reduce-scattered.
    assert ("all-to-all" if dispatch == "capacity" else "reduce-scatter") in hlo


def test_presets_reproduce_published_parameter_counts():
    from train.recipes import load_config

    # Mixtral: 46.7B total, 12.9B active (paper); exact figures from its released config.
    mixtral = param_counts(load_config("configs/models/mixtral-8x7b.yaml").model)
    assert (mixtral.total, mixtral.active) == (46_702_792_704, 12_879_925_248)
    # DeepSeek-V2-Lite: 15.7B total, "2.4B activated" (paper) = active less the input embedding table.
    lite = param_counts(load_config("configs/models/deepseek-v2-lite.yaml").model)
    assert (lite.total, lite.active - lite.embedding) == (15_706_484_224, 2_451_435_008)
    bert = param_counts(load_config("configs/models/bert-base.yaml").model)
    # Published BERT-base, less its pooler, token-type table and embedding LayerNorm, plus our final LayerNorm.
    assert bert.total == 109_482_240 - 590_592 - 1_536 - 1_536 + 1_536


SHRUNK = ["model.d_model=64", "model.d_ff=96", "model.vocab_size=300", "model.max_seq_len=64", "data.seq_len=32"]


@pytest.mark.parametrize("preset, extra", [
    ("tiny-moe", []),
    ("tiny-mlm", []),
    ("deepseek-v2-lite", ["model.n_layers=3", "model.n_heads=4", "model.mla.kv_lora_rank=16", "model.mla.q_lora_rank=24",
                          "model.mla.nope_head_dim=8", "model.mla.rope_head_dim=4", "model.mla.v_head_dim=12",
                          "model.moe.num_experts=8", "model.moe.d_expert=16"]),
    ("mixtral-8x7b", ["model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.moe.every=2"]),
])
def test_analytic_counts_equal_the_modules_parameters(preset, extra):
    from train.recipes import load_config
    from train.state import abstract_model

    cfg = load_config(None, [f"model={preset}", *SHRUNK, *extra]).model
    leaves = jax.tree.leaves(abstract_model(cfg, Precision()).params)
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == param_counts(cfg).total


def test_latent_attention_is_causal_and_every_weight_learns():
    from model.transformer import Transformer

    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=32,
                      mla={"kv_lora_rank": 8, "q_lora_rank": 12, "nope_head_dim": 8, "rope_head_dim": 4, "v_head_dim": 6})
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    params = jax.jit(lambda: nnx.split(Transformer(cfg, nnx.Rngs(0)))[1])()
    tokens = jnp.arange(16, dtype=jnp.int32)[None] % 64

    @jax.jit
    def logits_and_grads(params, tokens):
        model = nnx.merge(graphdef, params)
        loss = lambda m: jnp.mean(m(tokens) ** 2)  # noqa: E731
        return model(tokens), nnx.state(nnx.grad(loss)(model))

    base, grads = logits_and_grads(params, tokens)
    moved = np.abs(np.asarray(logits_and_grads(params, tokens.at[0, 10].set(3))[0] - base))[0].max(axis=-1)
    assert np.all(moved[:10] == 0) and np.all(moved[10:] > 0)
    attention = nnx.to_pure_dict(grads)["blocks"]["attn"]
    assert set(attention) == {"wq_a", "q_norm", "wq", "wkv_a", "kv_norm", "wkv_b", "wo"}
    for path, g in jax.tree_util.tree_leaves_with_path(attention):
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)

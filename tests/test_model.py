import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from model.precision import Precision
from model.transformer import Transformer

LLAMA = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=97, max_seq_len=32)
GPT2 = LLAMA.model_copy(
    update=dict(norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True, use_bias=True, n_kv_heads=None)
)


@pytest.fixture(scope="module", params=[LLAMA, GPT2], ids=["llama", "gpt2"])
def model_and_apply(request):
    cfg = request.param
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    apply = jax.jit(lambda s, t, p, seg: nnx.merge(graphdef, s)(t, p, seg))
    return cfg, state, apply


def tokens(seed, shape=(2, 16), vocab=97):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def positions_of(t):
    return jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)


def test_changing_token_t_changes_no_earlier_logits(model_and_apply):
    cfg, state, apply = model_and_apply
    t = tokens(0)
    seg = jnp.ones_like(t)
    base = apply(state, t, positions_of(t), seg)
    changed = t.at[:, 9].set((t[:, 9] + 1) % cfg.vocab_size)
    out = apply(state, changed, positions_of(t), seg)
    np.testing.assert_array_equal(np.asarray(base[:, :9]), np.asarray(out[:, :9]))
    assert not np.allclose(base[:, 9:], out[:, 9:])


def test_documents_in_a_packed_row_do_not_see_each_other(model_and_apply):
    cfg, state, apply = model_and_apply
    # Row: document A (positions 0..5) then document B (positions 0..9).
    t = tokens(1, (1, 16))
    seg = jnp.array([[1] * 6 + [2] * 10])
    pos = jnp.array([list(range(6)) + list(range(10))])
    base = apply(state, t, pos, seg)
    other_a = t.at[0, :6].set((t[0, :6] + 5) % cfg.vocab_size)
    out = apply(state, other_a, pos, seg)
    np.testing.assert_array_equal(np.asarray(base[0, 6:]), np.asarray(out[0, 6:]))
    # Document B alone, at the start of a row, gives the same logits as inside the packed row.
    alone = apply(state, t[:, 6:], pos[:, 6:], jnp.ones((1, 10), jnp.int32))
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(base[0, 6:]), rtol=1e-5, atol=1e-5)


def test_scan_equals_unrolled_loop(model_and_apply):
    cfg, state, apply = model_and_apply
    t = tokens(2)
    unrolled = Transformer(cfg.model_copy(update={"scan_layers": False}), nnx.Rngs(0))
    graphdef, _ = nnx.split(unrolled)
    ref = jax.jit(lambda s: nnx.merge(graphdef, s)(t, positions_of(t), jnp.ones_like(t)))(state)
    out = apply(state, t, positions_of(t), jnp.ones_like(t))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def _hand_written_layer_loop(cfg, state, t):
    """Independent reference: index layer i's slice of every stacked parameter and apply a Block."""
    from model.attention import attention_mask
    from model.transformer import Block, Context

    model = nnx.merge(nnx.split(Transformer(cfg, nnx.Rngs(0)))[0], state)
    x = model.embed(t)
    if model.pos_embed is not None:
        x = x + model.pos_embed[...][positions_of(t)]
    block_def, stacked = nnx.split(model.blocks)
    segments = jnp.ones_like(t)
    ctx = Context(positions_of(t), segments, attention_mask(segments, causal=True))
    for i in range(cfg.n_layers):
        block = nnx.merge(block_def, jax.tree.map(lambda a: a[i], stacked))
        assert isinstance(block, Block)
        x, _, _ = block(x, ctx)
    return model.logits(model.final_norm(x))


def test_scan_equals_per_layer_reference(model_and_apply):
    cfg, state, apply = model_and_apply
    t = tokens(3)
    ref = _hand_written_layer_loop(cfg, state, t)
    out = apply(state, t, positions_of(t), jnp.ones_like(t))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_change_memory_not_math(policy):
    t = tokens(4)
    grads = []
    for remat in ("none", policy):
        cfg = LLAMA.model_copy(update={"remat": remat})
        graphdef, state = nnx.split(Transformer(cfg, nnx.Rngs(0)))
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(t) ** 2)  # noqa: E731
        grads.append(jax.jit(jax.grad(loss))(nnx.to_pure_dict(state)))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_gqa_stores_only_kv_heads_and_untied_head():
    _, state = nnx.split(Transformer(LLAMA, nnx.Rngs(0)))
    p = nnx.to_pure_dict(state)
    assert p["blocks"]["attn"]["wk"].shape == (3, 32, 2, 8)
    assert p["blocks"]["attn"]["wq"].shape == (3, 32, 4, 8)
    assert p["head"].shape == (32, 97)


def test_bfloat16_compute_with_float32_params():
    model = Transformer(LLAMA, nnx.Rngs(0), Precision(compute="bfloat16"))
    assert model.embed.table[...].dtype == jnp.float32
    logits = model(tokens(5))
    assert logits.dtype == jnp.float32  # logits always leave in float32 for the loss
    ref = Transformer(LLAMA, nnx.Rngs(0))(tokens(5))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.1)


def test_rope_relative_positions():
    """Rotary attention depends only on relative positions: shifting all positions changes nothing."""
    cfg = LLAMA
    model = Transformer(cfg, nnx.Rngs(0))
    t = tokens(6)
    a = model(t, positions_of(t), jnp.ones_like(t))
    b = model(t, positions_of(t) + 5, jnp.ones_like(t))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)

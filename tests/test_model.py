import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from model.config import Precision
from model.transformer import Transformer

LLAMA = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=97, max_seq_len=32)
GPT2 = LLAMA.model_copy(
    update=dict(norm="layernorm", mlp="gelu", position="learned", tie_embeddings=True, qkv_bias=True,
                attention_out_bias=True, mlp_bias=True, n_kv_heads=None)
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


def reference_logits(cfg, params, tokens) -> np.ndarray:
    """The model's forward written again in float64 NumPy from the architecture's definitions, sharing no code
    with model/: embeddings (+ learned positions), pre-norm blocks of causal attention (GQA, half-split
    rotary positions) and an MLP (SwiGLU or tanh-GELU), a final norm, and the head (tied or not)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b, length = tokens.shape
    hd, groups = cfg.d_model // cfg.n_heads, cfg.n_heads // cfg.kv_heads

    def norm(x, scale, bias=None):
        if cfg.norm == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * scale
        return x if bias is None else x + bias

    def rope(x):  # x [b, l, heads, hd]: rotate (first half, second half) pairs by position * frequency
        half = hd // 2
        angle = np.arange(length)[:, None] * cfg.rope_theta ** (-np.arange(half) / half)
        cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x = p["embed"]["table"][tokens]
    if cfg.position == "learned":
        x = x + p["pos_embed"][np.arange(length)]
    future = np.triu(np.ones((length, length), bool), 1)
    for i in range(cfg.n_layers):
        layer = jax.tree.map(lambda a: a[i], p["blocks"])
        attn, mlp = layer["attn"], layer["mlp"]
        h = norm(x, layer["attn_norm"]["scale"], layer["attn_norm"].get("bias"))
        q, k, v = (np.einsum("bld,dhk->blhk", h, attn[w]) + (attn[f"b{w[1]}"] if cfg.qkv_bias else 0)
                   for w in ("wq", "wk", "wv"))
        if cfg.position == "rope":
            q, k = rope(q), rope(k)
        k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # each kv head serves `groups` heads
        scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(hd)
        scores = np.where(future, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("bhqs,bshk->bqhk", probs, v)
        x = x + np.einsum("bqhk,hkd->bqd", out, attn["wo"]) + (attn["bo"] if cfg.attention_out_bias else 0)
        h = norm(x, layer["mlp_norm"]["scale"], layer["mlp_norm"].get("bias"))
        up = h @ mlp["wi"] + (mlp["bi"] if cfg.mlp_bias else 0)
        if cfg.mlp == "swiglu":
            gate = h @ mlp["wg"]
            up = gate / (1 + np.exp(-gate)) * up
        else:
            up = gelu(up)
        x = x + up @ mlp["wo"] + (mlp["bo"] if cfg.mlp_bias else 0)
    x = norm(x, p["final_norm"]["scale"], p["final_norm"].get("bias"))
    return x @ (p["embed"]["table"].T if cfg.tie_embeddings else p["head"])


def test_logits_equal_a_float64_numpy_forward(model_and_apply):
    cfg, state, apply = model_and_apply
    t = tokens(3)
    out = np.asarray(apply(state, t, positions_of(t), jnp.ones_like(t)), np.float64)
    ref = reference_logits(cfg, nnx.to_pure_dict(state), np.asarray(t))
    # float32 against float64 through three layers: a few float32 roundings (2^-24 each) of values near 1.
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.abs(ref).max() > 0.1  # logits large enough for the tolerance to mean something


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
    assert logits.dtype == jnp.float32  # logits leave in the policy's logits dtype (float32 by default)
    ref = np.asarray(Transformer(LLAMA, nnx.Rngs(0))(tokens(5)), np.float64)
    error = np.asarray(logits, np.float64) - ref
    # bfloat16 keeps 8 significant bits: each rounding errs by at most u = 2^-8 relative. The logits pass a
    # handful of roundings (operands cast, each matmul's output), so their RMS error stays within 4u of the
    # logits' spread (measured: 1.2u to 1.3u over three seeds); and above u/4, or bfloat16 never ran.
    u = 2.0**-8
    relative_rms = np.sqrt(np.mean(error**2)) / ref.std()
    assert u / 4 < relative_rms < 4 * u, relative_rms
    assert np.abs(error).max() < 8 * u * np.abs(ref).max()


def test_rope_relative_positions():
    """Rotary attention depends only on relative positions: shifting all positions changes nothing."""
    cfg = LLAMA
    model = Transformer(cfg, nnx.Rngs(0))
    t = tokens(6)
    a = model(t, positions_of(t), jnp.ones_like(t))
    b = model(t, positions_of(t) + 5, jnp.ones_like(t))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)

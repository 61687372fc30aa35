"""Every attention implementation that runs on CPU against a float64 reference written apart from the model:
values, and gradients with respect to q, k and v, on packed rows of 1 to 4 documents, GQA groups 1, 2 and 4,
causal and bidirectional, with and without a sliding window, lengths that are and are not block multiples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.attention.kernels import attend, implementation
from model.attention.mask import AttentionMask

HEAD_DIM = 16


def reference(q, k, v, q_seg, kv_seg, causal, window, offset=0):
    """softmax(q k^T / sqrt(d)) v over the allowed keys, in float64 jax.numpy (for its gradients too)."""
    b, lq, heads, d = q.shape
    lk, kv_heads = k.shape[1], k.shape[2]
    k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    i, j = np.arange(lq)[:, None] + offset, np.arange(lk)[None, :]
    allowed = np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    if causal:
        allowed = allowed & (j <= i)
    if window is not None:
        allowed = allowed & (i - j < window)
    scores = jnp.where(allowed[:, None], scores, -jnp.inf)
    weights = jnp.exp(scores - scores.max(-1, keepdims=True))
    return jnp.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)


def packed_segments(length: int, documents: int, seed: int) -> np.ndarray:
    """[2, length] document ids: `documents` documents per row at random cut points, the second row padded."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in range(2):
        cuts = np.sort(rng.choice(np.arange(1, length), documents - 1, replace=False)) if documents > 1 else []
        ids = np.searchsorted(cuts, np.arange(length), side="right") + 1
        if row == 1:
            ids[length - length // 5:] = 0  # padding at the end of the corpus
        rows.append(ids)
    return np.array(rows, np.int32)


CASES = [  # (length, documents, heads, kv heads, causal, window)
    (64, 1, 4, 4, True, None),  # groups 1, one block multiple
    (70, 3, 4, 2, True, None),  # groups 2, not a block multiple
    (70, 4, 8, 2, True, 9),  # groups 4, a sliding window
    (48, 2, 4, 1, False, None),  # bidirectional, multi-query
    (33, 1, 2, 1, True, None),  # shorter than a block
]


def inputs(length, heads, kv_heads, seed=0):
    key = jax.random.key(seed)
    return tuple(jax.random.normal(jax.random.fold_in(key, i), (2, length, n, HEAD_DIM))
                 for i, n in enumerate((heads, kv_heads, kv_heads)))


def value_and_grads(fn, q, k, v):
    """fn's output and the gradients of a loss that weighs every output differently (so each entry counts)."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(jnp.sin(out) * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out, np.float64), [np.asarray(g, np.float64) for g in grads]


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
@pytest.mark.parametrize("case", CASES, ids=[f"L{c[0]}-docs{c[1]}-g{c[2] // c[3]}-{'causal' if c[4] else 'bidi'}"
                                             f"{'-w' if c[5] else ''}" for c in CASES])
def test_values_and_gradients_equal_a_float64_reference(impl, case):
    length, documents, heads, kv_heads, causal, window = case
    q, k, v = inputs(length, heads, kv_heads)
    seg = packed_segments(length, documents, seed=length)
    mask = AttentionMask(jnp.asarray(seg), jnp.asarray(seg), causal, window)
    ours = lambda q, k, v: attend(q, k, v, mask, choice=impl, block=16)  # noqa: E731
    with jax.enable_x64(True):
        theirs = lambda q, k, v: reference(q, k, v, seg, seg, causal, window)  # noqa: E731
        want, want_grads = value_and_grads(theirs, *(jnp.asarray(a, jnp.float64) for a in (q, k, v)))
    got, got_grads = value_and_grads(ours, q, k, v)
    # float32 against float64: each output is a softmax-weighted sum of a few dozen float32 products, so
    # its error is a few float32 roundings (2^-24 each) of values of order 1; 2e-5 leaves room for ~100.
    real = seg > 0  # padding queries' outputs are never used; their scores are masked alike all the same
    np.testing.assert_allclose(got[real], want[real], rtol=2e-5, atol=2e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=f"d{name}")


@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 40)],
                         ids=["causal", "bidi", "causal-w40"])
def test_splash_in_the_pallas_interpreter_equals_the_reference(causal, window):
    """The TPU kernel itself (run by Pallas's interpreter on CPU): GQA, packed rows, a local mask; values and
    the gradients of all three inputs (its forward, dK/dV and dQ kernels)."""
    length, heads, kv_heads = 128, 4, 2
    q, k, v = inputs(length, heads, kv_heads, seed=1)
    seg = packed_segments(length, 3, seed=2)
    mask = AttentionMask(jnp.asarray(seg), jnp.asarray(seg), causal, window)
    ours = lambda q, k, v: attend(q, k, v, mask, choice="splash")  # noqa: E731
    with jax.enable_x64(True):
        theirs = lambda q, k, v: reference(q, k, v, seg, seg, causal, window)  # noqa: E731
        want, want_grads = value_and_grads(theirs, *(jnp.asarray(a, jnp.float64) for a in (q, k, v)))
    got, got_grads = value_and_grads(ours, q, k, v)
    real = seg > 0
    np.testing.assert_allclose(got[real], want[real], rtol=2e-5, atol=2e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=f"d{name}")


def test_a_traced_query_offset_attends_densely_to_the_valid_range_of_the_cache():
    """Decoding: two new tokens at cache slots 5 and 6 of rows whose real tokens start at slots 2 and 0. The
    offset is traced, so every choice runs dense; the mask's offset and key segments must place them."""
    q, k, v = inputs(8, 2, 1, seed=3)
    q = q[:, :2]
    start = jnp.array([2, 0])
    kv_seg = (jnp.arange(8)[None] >= start[:, None]).astype(jnp.int32)
    mask = AttentionMask(jnp.ones((2, 2), jnp.int32), kv_seg, True, None, q_offset=jnp.int32(5))
    with jax.enable_x64(True):
        want = np.asarray(reference(*(jnp.asarray(a, jnp.float64) for a in (q, k, v)), np.ones((2, 2)),
                                    np.asarray(kv_seg), True, None, offset=5))
    np.testing.assert_allclose(np.asarray(attend(q, k, v, mask, choice="blockwise")), want, rtol=2e-5, atol=2e-5)


def test_blockwise_with_a_static_offset_equals_the_reference():
    """A prompt prefilled at a static offset into a longer cache: blockwise takes it (and skips blocks)."""
    q, k, v = inputs(48, 4, 2, seed=8)
    q = q[:, :16]
    seg = np.ones((2, 48), np.int32)
    mask = AttentionMask(jnp.asarray(seg[:, :16]), jnp.asarray(seg), True, 20, q_offset=24)
    with jax.enable_x64(True):
        want = np.asarray(reference(*(jnp.asarray(a, jnp.float64) for a in (q, k, v)), seg[:, :16], seg, True, 20,
                                    offset=24))
    got = attend(q, k, v, mask, choice="blockwise", block=16)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_auto_picks_by_platform_and_length_and_shapes_a_kernel_cannot_take_run_dense():
    from model.attention.kernels import CPU_BLOCKWISE_FROM

    assert implementation("auto", "tpu", 2048, 2048) == "splash"
    assert implementation("auto", "tpu", 100, 100) == "dense"  # not a multiple of 128
    assert implementation("auto", "gpu", 2048, 2048) == "blockwise"  # cudnn not until it has run on a GPU
    assert implementation("auto", "cpu", CPU_BLOCKWISE_FROM, CPU_BLOCKWISE_FROM) == "blockwise"
    assert implementation("auto", "cpu", CPU_BLOCKWISE_FROM - 1, CPU_BLOCKWISE_FROM - 1) == "dense"
    assert implementation("blockwise", "cpu", 1, 4096, q_offset=None) == "dense"  # decoding from a cache
    assert implementation("blockwise", "cpu", 16, 48, q_offset=24) == "blockwise"  # prefill at an offset
    assert implementation("splash", "tpu", 128, 256) == "splash"  # a prompt into a longer cache, from slot 0
    assert implementation("splash", "tpu", 128, 256, q_offset=128) == "dense"
    assert implementation("splash", "cpu", 100, 100) == "dense"  # asked for, but not a multiple of 128
    assert implementation("cudnn", "gpu", 128, 128) == "cudnn"
    assert implementation("cudnn", "gpu", 128, 256) == "dense"  # cuDNN here takes rows of the same slots


def test_blockwise_skips_blocks_above_the_diagonal_and_out_of_the_window():
    from model.attention.blockwise import Blocks

    causal = Blocks(16, 16, 4, 4, causal=True, window=None, q_offset=0, scale=1.0)
    assert [causal.kv_range(i) for i in range(4)] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert causal.computed_fraction() == 10 / 16
    windowed = Blocks(16, 16, 4, 4, causal=True, window=20, q_offset=0, scale=1.0)
    assert [windowed.kv_range(i) for i in range(4)] == [(0, 1), (0, 2), (0, 3), (1, 4)]
    assert Blocks(16, 16, 4, 4, causal=False, window=None, q_offset=0, scale=1.0).computed_fraction() == 1.0


def test_cudnn_packs_documents_as_offsets_and_lengths():
    from model.attention.cudnn import segment_offsets

    lengths, offsets = segment_offsets(jnp.array([[1, 1, 2, 3, 3, 3], [5, 5, 5, 5, 5, 5]]), 6)
    assert lengths.tolist() == [[2, 1, 3, -1, -1, -1], [6, -1, -1, -1, -1, -1]]
    assert offsets.tolist() == [[0, 2, 3, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1]]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_equals_the_reference_on_a_gpu():
    q, k, v = (a.astype(jnp.bfloat16) for a in inputs(128, 4, 2, seed=4))
    seg = packed_segments(128, 3, seed=5)
    mask = AttentionMask(jnp.asarray(seg), jnp.asarray(seg), True)
    want = np.asarray(reference(*(a.astype(jnp.float32) for a in (q, k, v)), seg, seg, True, None))
    got = np.asarray(attend(q, k, v, mask, choice="cudnn"), np.float32)
    real = seg > 0
    np.testing.assert_allclose(got[real], want[real], rtol=2e-2, atol=2e-2)  # bfloat16: 8 significant bits


@pytest.mark.slow
def test_the_model_trains_samples_and_scores_alike_with_dense_and_blockwise(rules):
    """Same parameters: logits (what evaluation scores), a train step's loss and gradient norm, and the greedy
    tokens of a prefill (blockwise when asked) followed by cached decoding agree."""
    from model.generate import generate
    from model.sampling import Sampling
    from model.transformer import Transformer
    from tests.conftest import mesh_for, tiny_config
    from train.program import build_program

    seg = jnp.asarray(packed_segments(64, 3, seed=6))
    positions = jnp.asarray(np.concatenate([np.arange(64)[None]] * 2))
    tokens = jax.random.randint(jax.random.key(7), (2, 64), 0, 264)
    greedy = Sampling(jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.ones(2))
    results = {}
    for impl in ("dense", "blockwise"):
        cfg = tiny_config(f"model.attention={impl}", "model.attention_block=16", "model.max_seq_len=64",
                          "data.seq_len=64")
        graphdef, params = nnx.split(Transformer(cfg.model, nnx.Rngs(0)))
        logits = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens, positions, seg))(params)
        sampled = jax.jit(lambda p: generate(nnx.merge(graphdef, p), tokens[:, :40], jnp.array([40, 25]),
                                             jax.random.split(jax.random.key(0), 2), greedy, max_new_tokens=16,
                                             eos_ids=(), pad_id=0).tokens)(params)
        program = build_program(cfg, mesh_for(cfg, 1), rules)
        rows = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "positions": positions, "segment_ids": seg,
                "weights": (seg > 0).astype(jnp.float32)}
        _, metrics = program.train_step(program.init_state(), program.device_batch(jax.device_get(rows)))
        results[impl] = (np.asarray(logits), np.asarray(sampled), float(metrics["loss"]), float(metrics["grad_norm"]))
    (dense_logits, dense_tokens, dense_loss, dense_norm), (logits, sampled, loss, norm) = results.values()
    np.testing.assert_allclose(logits, dense_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sampled, dense_tokens)
    assert loss == pytest.approx(dense_loss, rel=1e-5) and norm == pytest.approx(dense_norm, rel=1e-4)

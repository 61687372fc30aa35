"""Generation: the KV-cache decoder against full recomputation, the samplers' distributions, seeds,
beam search, stop strings, constrained decoding, sharded decoding, and the response cache."""

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
import scipy.stats
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.mesh import DEFAULT_RULES
from model.beam import beam_search
from model.config import ModelConfig
from model.generate import STOPPED_EOS, STOPPED_LENGTH, StopStrings, _stop_match, generate, left_padded_positions
from model.config import Precision
from model.sampling import Sampling, sample_tokens, top_p_filter
from model.transformer import Transformer
from tests.conftest import mesh_for, tiny_config
from train.generation import Generator, SamplingOptions
from train.sharding import tree_shardings
from train.state import abstract_model
from train.tokenizer import ByteTokenizer, train_bpe

SMALL = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=264, max_seq_len=64)


def make_generator(cfg: ModelConfig, tokenizer, mesh_overrides=("mesh.data=1",), n_devices=1):
    mesh = mesh_for(tiny_config(*mesh_overrides), n_devices)
    model = abstract_model(cfg, Precision())
    params = nnx.to_pure_dict(nnx.split(Transformer(cfg, nnx.Rngs(0)))[1])
    params = jax.device_put(params, tree_shardings(model.logical_specs, model.params, mesh, DEFAULT_RULES))
    return Generator(cfg, model.graphdef, params, tokenizer, mesh, dict(DEFAULT_RULES))


@pytest.fixture(scope="session")
def byte_generator():
    return make_generator(ModelConfig(**SMALL), ByteTokenizer())


@pytest.fixture(scope="session")
def bpe_generator(tmp_path_factory):
    from train.data.sources import stdlib_documents

    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok = train_bpe((text for _, text in stdlib_documents(limit=30)), 300, path)
    return make_generator(ModelConfig(**{**SMALL, "vocab_size": 320}), tok)


# ------------------------------------------------------------ KV cache


@pytest.mark.parametrize("kv_heads, window", [(4, None), (2, None), (2, 3)], ids=["mha", "gqa", "gqa-window3"])
def test_cached_decoding_matches_full_forward(kv_heads, window):
    """Prefill of left-padded prompts of mixed lengths, then one token at a time: the logits at every
    step equal a full forward over the growing sequence (float32); with a sliding window shorter than the
    prompts, the cache's slots and the forward's positions must drop the same keys."""
    model = Transformer(ModelConfig(**{**SMALL, "n_kv_heads": kv_heads, "sliding_window": window}), nnx.Rngs(0))
    lengths, width, steps = np.array([6, 3, 1]), 6, 5
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, n + steps) for n in lengths]
    prompt = np.zeros((3, width), np.int32)
    for b, n in enumerate(lengths):
        prompt[b, width - n:] = seqs[b][:n]
    positions, start = left_padded_positions(jnp.asarray(lengths), width)
    decode = jax.jit(model.decode)
    # A causal model's logits at position t depend only on tokens <= t: one forward over each whole
    # (right-padded) sequence is the reference for every step.
    padded = np.zeros((3, width + steps), np.int32)
    for b, seq in enumerate(seqs):
        padded[b, : len(seq)] = seq
    reference = model(jnp.asarray(padded))
    cache = model.init_cache(3, width + steps)
    assert cache["blocks"]["k"].shape == (2, 3, width + steps, kv_heads, 8)  # only the kv heads are cached
    logits, cache = decode(jnp.asarray(prompt), positions, cache, 0, start)
    for i in range(steps):
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(logits[b, -1], reference[b, n + i - 1], rtol=1e-5, atol=1e-5)
        token = jnp.asarray([[s[n + i]] for s, n in zip(seqs, lengths)])
        logits, cache = decode(token, jnp.asarray((lengths + i)[:, None]), cache, width + i, start)


def test_greedy_generation_equals_recomputing_the_whole_sequence(byte_generator):
    g = byte_generator
    model = nnx.merge(g.graphdef, g.params)
    prompt = "def fib(n):"
    got = g.complete([prompt, "x"], SamplingOptions(max_new_tokens=10, temperature=0))[0][0]
    seq = list(ByteTokenizer().encode(prompt))
    forward = jax.jit(model.__call__)
    buffer = np.zeros((1, 64), np.int32)  # right padding never reaches earlier positions of a causal model
    for _ in range(10):
        buffer[0, : len(seq)] = seq
        logits = forward(jnp.asarray(buffer))[0, len(seq) - 1]
        seq.append(int(jnp.argmax(jnp.where(g.allowed_tokens, logits, -jnp.inf))))  # padding etc. never sampled
    assert got.tokens == seq[-10:][: len(got.tokens)]
    assert got.finish_reason == "length" or got.tokens[-1] == ByteTokenizer().eod_id


# ------------------------------------------------------------ samplers


def _settings(n, temperature=1.0, top_k=0, top_p=1.0):
    return Sampling(jnp.full(n, temperature, jnp.float32), jnp.full(n, top_k, jnp.int32), jnp.full(n, top_p, jnp.float32))


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def test_temperature_towards_zero_is_greedy():
    logits = jax.random.normal(jax.random.key(1), (2000, 64))
    greedy = sample_tokens(_keys(2000), logits, _settings(2000, temperature=0.0))
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    cold = sample_tokens(_keys(2000), logits, _settings(2000, temperature=1e-5))
    np.testing.assert_array_equal(cold, greedy)


def test_top_k_never_leaves_the_top_k():
    n, k = 4000, 5
    logits = jax.random.normal(jax.random.key(2), (n, 50))
    tokens = np.asarray(sample_tokens(_keys(n), logits, _settings(n, top_k=k)))
    top = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    assert all(t in row for t, row in zip(tokens, top, strict=True))
    assert len(set(tokens.tolist())) > k  # different rows have different top sets: not a constant


def test_top_p_samples_the_renormalised_nucleus():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])
    n = 20000
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 1))
    tokens = np.asarray(sample_tokens(_keys(n, seed=3), logits, _settings(n, top_p=0.75)))
    counts = np.bincount(tokens, minlength=len(probs))
    assert counts[3:].sum() == 0  # mass above the fourth token is 0.80 >= 0.75: it is outside
    expected = probs[:3] / probs[:3].sum() * n
    assert scipy.stats.chisquare(counts[:3], expected).pvalue > 1e-3
    # top_p = 1 is exactly off, even where a float32 running sum reaches 1 early (a flat 50k vocabulary).
    assert bool(jnp.all(jnp.isfinite(top_p_filter(jnp.zeros((2, 50_000)), jnp.ones(2)))))


def test_seeds_reproduce_and_differ(byte_generator):
    opts = SamplingOptions(max_new_tokens=12, temperature=1.0, top_k=40, seed=7, num_samples=3)
    first = byte_generator.complete(["import os", "def"], opts)
    again = byte_generator.complete(["import os", "def"], opts)
    assert [[c.tokens for c in cs] for cs in first] == [[c.tokens for c in cs] for cs in again]
    assert len({tuple(c.tokens) for c in first[0]}) == 3  # the samples of one prompt differ
    assert all(byte_generator.allowed_tokens[t] for cs in first for c in cs for t in c.tokens)  # no padding etc.
    other = byte_generator.complete(["import os"], SamplingOptions(**{**opts.__dict__, "seed": 8}))
    assert [c.tokens for c in other[0]] != [c.tokens for c in first[0]]
    # A prompt's samples do not depend on the rest of the batch.
    alone = byte_generator.complete(["def"], opts)
    assert [c.tokens for c in alone[0]] == [c.tokens for c in first[1]]


# ------------------------------------------------------------ test-time compute


def test_beam_of_width_one_is_greedy(byte_generator):
    prompts = ["class A:", "x = 1"]
    greedy = byte_generator.complete(prompts, SamplingOptions(max_new_tokens=10, temperature=0))
    beam = byte_generator.complete(prompts, SamplingOptions(max_new_tokens=10, beam=1))
    assert [g[0].tokens for g in greedy] == [b[0].tokens for b in beam]
    np.testing.assert_allclose([b[0].logprob for b in beam], [g[0].logprob for g in greedy], rtol=1e-5)


class MarkovModel:
    """A next-token table on the last token: the smallest model with the decoder's interface."""

    def __init__(self, probs):
        self.logits = jnp.log(jnp.asarray(probs, jnp.float32))

    def init_cache(self, batch, length):
        return {"last": jnp.zeros((1, batch), jnp.int32)}

    def decode(self, tokens, positions, cache, index, start, last_only=False):
        logits = self.logits[tokens]
        return logits[:, -1:] if last_only else logits, {"last": tokens[None, :, -1]}

    @staticmethod
    def reorder_cache(cache, rows):
        return jax.tree.map(lambda c: jnp.take(c, rows, axis=1), cache)


def test_beam_search_finds_what_greedy_misses():
    eps = 1e-9  # tokens 4 (eos) and 5 (pad) are never likely
    probs = np.full((6, 6), eps)
    probs[0, [1, 2]] = [0.55, 0.45]  # greedy takes 1 ...
    probs[1, :4] = 0.25  # ... and then has only 0.25: 0.1375 in all
    probs[2, :4] = [0.02, 0.02, 0.01, 0.95]  # 2 then 3: 0.4275
    probs[3, :4] = 0.25
    model = MarkovModel(probs)
    prompt, length = jnp.zeros((1, 1), jnp.int32), jnp.ones(1, jnp.int32)
    run = lambda width: beam_search(model, prompt, length, width=width, max_new_tokens=2, eos_ids=(4,), pad_id=5)  # noqa: E731
    greedy, beam = run(1), run(2)
    assert greedy.tokens[0, 0].tolist() == [1, 0]
    assert beam.tokens[0, 0].tolist() == [2, 3]
    np.testing.assert_allclose(beam.logprob[0, 0], np.log(0.45 * 0.95), rtol=1e-5)


def test_any_of_several_eos_ids_ends_a_row():
    """An instruct model ends a turn with one id and a document with another: sampling and beam search stop
    at whichever comes first; an empty tuple never stops early."""
    chain = np.full((6, 6), 1e-9)
    chain[[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]] = 1.0  # greedy from 0: 1 2 3 4 0
    model = MarkovModel(chain)
    prompt, length = jnp.zeros((2, 1), jnp.int32), jnp.ones(2, jnp.int32)
    greedy = Sampling(jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.ones(2))
    keys = jax.random.split(jax.random.key(0), 2)
    for eos_ids, n in [((4,), 4), ((4, 2), 2), (jnp.array([3, 4]), 3), ((), 5)]:
        out = generate(model, prompt, length, keys, greedy, max_new_tokens=5, eos_ids=eos_ids, pad_id=5)
        assert out.lengths.tolist() == [n, n] and out.tokens[0].tolist() == [1, 2, 3, 4, 0][:n] + [5] * (5 - n)
        assert out.stop_reason.tolist() == [STOPPED_EOS if n < 5 else STOPPED_LENGTH] * 2
        beams = beam_search(model, prompt[:1], length[:1], width=1, max_new_tokens=5, eos_ids=eos_ids, pad_id=5)
        assert beams.tokens[0, 0].tolist() == out.tokens[0].tolist() and int(beams.lengths[0, 0]) == n


def test_generator_stops_on_every_stop_id_and_drops_them(byte_generator):
    """A tokenizer's second stop id (generation_config.json's eos_token_id) is sampled, ends the completion
    as "eos", and is left out of the text, like end-of-document."""
    opts = SamplingOptions(max_new_tokens=10, temperature=0)
    plain = byte_generator.complete(["def fib(n):"], opts)[0][0]
    stop = plain.tokens[2]
    tokenizer = ByteTokenizer()
    tokenizer.stop_ids = (tokenizer.eod_id, stop, tokenizer.special["<sep>"])  # <sep>: never sampled otherwise
    g = make_generator(ModelConfig(**SMALL), tokenizer)
    assert g.allowed_tokens[list(tokenizer.stop_ids)].all()
    got = g.complete(["def fib(n):"], opts)[0][0]
    assert got.tokens == plain.tokens[: plain.tokens.index(stop) + 1] and got.finish_reason == "eos"
    assert got.text == tokenizer.decode(got.tokens[:-1])
    assert g._text([65, tokenizer.special["<sep>"], 66, tokenizer.eod_id], ()) == "AB"


def test_best_of_keeps_the_candidate_the_scorer_prefers(byte_generator):
    opts = SamplingOptions(max_new_tokens=8, temperature=1.0, seed=3, best_of=6)
    samples = byte_generator.complete(["a"], SamplingOptions(max_new_tokens=8, temperature=1.0, seed=3, num_samples=6))[0]
    best = byte_generator.complete(["a"], opts)[0][0]
    assert best.tokens == max(samples, key=lambda c: c.mean_logprob).tokens
    assert best.candidates == pytest.approx([c.mean_logprob for c in samples])
    by_length = byte_generator.complete(["a"], opts, score=lambda prompt, text: -abs(len(text.encode()) - 3))[0][0]
    assert by_length.text == min(samples, key=lambda c: abs(len(c.text.encode()) - 3)).text


# ------------------------------------------------------------ stop strings


def test_stop_strings_match_across_token_boundaries():
    pieces = [b"ab", b"c\n", b"\nd", b"x"]
    token_bytes = np.full((4, 2), -1, np.int32)
    for i, p in enumerate(pieces):
        token_bytes[i, : len(p)] = list(p)
    stops = [b"\n\n", b"abc"]
    strings = np.full((2, 3), -1, np.int32)
    for i, s in enumerate(stops):
        strings[i, : len(s)] = list(s)
    tables = StopStrings(jnp.asarray(token_bytes), jnp.asarray([2, 2, 2, 1]), jnp.asarray(strings), jnp.asarray([2, 3]))

    def hits(sequence):
        window, out = jnp.full((1, 3), -1, jnp.int32), []
        for t in sequence:
            window, hit = _stop_match(window, jnp.asarray([t]), tables)
            out.append(bool(hit[0]))
        return out

    assert hits([1, 2]) == [False, True]  # "c\n" + "\nd": "\n\n" spans the two tokens
    assert hits([0, 1]) == [False, True]  # "ab" + "c\n": "abc"
    assert hits([1, 3, 2]) == [False, False, False]
    assert hits([3, 3, 0, 3]) == [False] * 4


# ------------------------------------------------------------ structured outputs

ATOMS = st.one_of(
    st.sampled_from(list("abxyz019_-")).map(re.escape),
    st.sampled_from(["[a-c]", "[0-9]", "[xyz]", "(ab|c)", "(0|1[0-9])"]),
)
PIECES = st.tuples(ATOMS, st.sampled_from(["", "?", "+", "*", "{2}", "{1,3}"])).map("".join)
REGEXES = st.lists(PIECES, min_size=1, max_size=4).map("".join)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(regex=REGEXES, seed=st.integers(0, 2**16))
def test_every_regex_constrained_output_matches(byte_generator, regex, seed):
    opts = SamplingOptions(max_new_tokens=16, temperature=1.0, seed=seed, regex=regex, num_samples=2)
    for c in byte_generator.complete(["value: "], opts)[0]:
        assert re.fullmatch(regex, c.text), (regex, c.text)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(regex=REGEXES, seed=st.integers(0, 2**16))
def test_regex_constraints_work_with_bpe_tokens(bpe_generator, regex, seed):
    opts = SamplingOptions(max_new_tokens=16, temperature=1.0, seed=seed, regex=regex, num_samples=2)
    for c in bpe_generator.complete(["value = "], opts)[0]:
        assert re.fullmatch(regex, c.text), (regex, c.text)


PROPERTY_SCHEMAS = st.sampled_from([
    {"type": "integer"},
    {"type": "boolean"},
    {"type": "string", "maxLength": 3},
    {"enum": ["red", "green"]},
    {"type": "integer", "minDigits": 1, "maxDigits": 2},
    {"type": "string", "pattern": "[a-z]{2}"},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
])
SCHEMAS = st.dictionaries(st.sampled_from(["a", "b", "id", "ok"]), PROPERTY_SCHEMAS, min_size=1, max_size=3).map(
    lambda props: {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_every_schema_constrained_output_validates(byte_generator, schema, seed):
    opts = SamplingOptions(max_new_tokens=48, temperature=1.0, seed=seed, json_schema=json.dumps(schema))
    for c in byte_generator.complete(["{"], opts)[0]:
        jsonschema.validate(json.loads(c.text), schema)


# ------------------------------------------------------------ on a mesh


def test_sharded_decoding_equals_one_device(byte_generator):
    """Parameters and the KV cache sharded by the training rules (batch over data, heads over tensor)
    give the same tokens as one device."""
    sharded = make_generator(ModelConfig(**SMALL), ByteTokenizer(), ("mesh.data=4", "mesh.tensor=2"), 8)
    assert sharded.params["embed"]["table"].sharding.spec[0] == "tensor"  # vocabulary split over tensor
    prompts = ["import sys", "for i in", "x"]
    opts = SamplingOptions(max_new_tokens=10, seed=5, top_p=0.9)
    one, many = byte_generator.complete(prompts, opts), sharded.complete(prompts, opts)
    assert [c[0].tokens for c in one] == [c[0].tokens for c in many]
    np.testing.assert_allclose([c[0].logprob for c in one], [c[0].logprob for c in many], rtol=1e-4)

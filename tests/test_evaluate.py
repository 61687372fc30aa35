"""Evaluation metrics, the contamination check, and the `tessera sample` / `tessera eval` commands on a
trained run that has memorised one document."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from infra.cli import main
from train.data import pack
from train.evaluate import Sums, metrics
from train.generation import SamplingOptions
from train.step import token_nll
from train.tokenizer import ByteTokenizer, char_starts


def test_a_uniform_byte_model_scores_eight_bits_per_byte():
    """Uniform over the 256 byte values, scored on packed UTF-8 text (the eod targets carry no weight
    here, as a uniform byte model cannot predict them)."""
    tok = ByteTokenizer()
    corpus = pack([tok.encode("héllo wörld, ünïcode"), tok.encode("plain ascii text")], tok, 8)
    rows = corpus.rows(np.arange(corpus.n_rows))
    weights = rows["weights"] * (rows["targets"] < 256)
    logits = jnp.zeros(rows["targets"].shape + (256,))
    nll, _ = token_nll(logits, jnp.asarray(np.minimum(rows["targets"], 255)))
    sums = Sums(float(jnp.sum(nll * weights)), float(weights.sum()),
                float((tok.token_bytes[rows["targets"]] * weights).sum()),
                float((tok.token_chars[rows["targets"]] * weights).sum()))
    m = metrics(sums)
    assert m["bits_per_byte"] == pytest.approx(8.0, rel=1e-6)
    assert m["bits_per_token"] == pytest.approx(8.0, rel=1e-6)  # one byte per token
    assert m["perplexity"] == pytest.approx(math.exp(m["cross_entropy"]))
    assert m["bits_per_char"] > m["bits_per_byte"]  # accented characters take two bytes


def test_characters_are_counted_exactly_when_tokens_split_them():
    pieces = [b"a", "é".encode()[:1], "é".encode()[1:], "€".encode()]
    assert char_starts(pieces).tolist() == [1, 1, 0, 1]


def run_cli(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_eval_reports_every_metric_and_flags_memorised_text(memorized_run, capsys):
    run_dir, leaked, fresh = memorized_run
    out = json.loads(run_cli(capsys, "eval", str(run_dir), "--contamination", f"{leaked.parent}/*.txt", "--json"))
    for key in ("cross_entropy", "perplexity", "bits_per_token", "bits_per_char", "bits_per_byte", "tokens"):
        assert key in out
    assert out["perplexity"] == pytest.approx(math.exp(out["cross_entropy"]))
    assert out["bits_per_char"] == pytest.approx(out["bits_per_byte"])  # ASCII letters: one byte each
    verdicts = {d["name"]: d for d in out["contamination"]["documents"]}
    assert verdicts[str(leaked)]["contaminated"]
    assert not verdicts[str(fresh)]["contaminated"] and verdicts[str(fresh)]["ratio"] > 0.8
    assert out["contamination"]["threshold"] == 0.5
    # Scoring the fresh document as data gives the figure the check used for it.
    single = json.loads(run_cli(capsys, "eval", str(run_dir), "--data", str(fresh), "--json"))
    assert single["bits_per_byte"] == pytest.approx(verdicts[str(fresh)]["bits_per_byte"], rel=1e-5)


def test_sample_continues_memorised_text_and_stops_at_stop_strings(memorized_run, capsys):
    run_dir, leaked, _ = memorized_run
    text = leaked.read_text()
    prompt, expected = text[:32], text[32:52]
    out = json.loads(run_cli(capsys, "sample", str(run_dir), "--prompt", prompt, "--temperature", "0",
                             "--max-new-tokens", "20", "--json"))
    greedy = out[0]["completions"][0]
    assert greedy["finish_reason"] == "length" and len(greedy["text"]) == 20
    # Greedy decoding recites the memorised text (chance would get one letter in 27 right).
    assert sum(a == b for a, b in zip(greedy["text"], expected)) >= 15, (greedy["text"], expected)
    stop = greedy["text"][6:8]
    out = json.loads(run_cli(capsys, "sample", str(run_dir), "--prompt", prompt, "--temperature", "0",
                             "--max-new-tokens", "20", "--stop", stop, "--json"))
    stopped = out[0]["completions"][0]
    assert stopped["text"] == greedy["text"][: greedy["text"].index(stop)] and stopped["finish_reason"] == "stop"


def test_response_cache_answers_repeats_without_the_model(memorized_run, monkeypatch, tmp_path):
    from infra.runtime import open_trained_run
    from train.generation import Generator
    from train.response_cache import ResponseCache, complete_cached

    run, mesh, rules = open_trained_run(str(memorized_run[0]), [])
    generator = Generator(run.cfg.model, run.model.graphdef, run.params, run.tokenizer, mesh, rules)
    cache = ResponseCache(tmp_path / "responses")
    opts = SamplingOptions(max_new_tokens=8, temperature=0.9, seed=11, num_samples=2)
    first = complete_cached(generator, run.checkpoint_id, ["abc", "xyz"], opts, cache)

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran for a cached request")

    monkeypatch.setattr(generator, "complete", no_model)
    assert complete_cached(generator, run.checkpoint_id, ["xyz", "abc"], opts, cache) == first[::-1]
    with pytest.raises(AssertionError):  # another seed is another request
        complete_cached(generator, run.checkpoint_id, ["abc"], SamplingOptions(**{**opts.__dict__, "seed": 12}), cache)

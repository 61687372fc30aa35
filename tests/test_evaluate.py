"""Evaluation metrics, the contamination check, and the `tessera sample` / `tessera eval` commands on a
trained run that has memorised one document."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from infra.cli import main
from tests.conftest import refused
from tests.conftest import prepared_stream
from train.evaluate import Sums, metrics
from train.generation import SamplingOptions
from train.objectives.cross_entropy import token_nll
from train.tokenizer import ByteTokenizer, char_starts


def test_a_uniform_byte_model_scores_eight_bits_per_byte(tmp_path):
    """Uniform over the 256 byte values, scored on packed UTF-8 text (the eod targets carry no weight
    here, as a uniform byte model cannot predict them)."""
    tok = ByteTokenizer()
    corpus = prepared_stream([("a", "héllo wörld, ünïcode"), ("b", "plain ascii text")], tmp_path, 8)
    rows = corpus.rows(np.arange(corpus.n_rows))
    weights = rows["weights"] * (rows["targets"] < 256)
    logits = jnp.zeros(rows["targets"].shape + (256,))
    nll, _ = token_nll(logits, jnp.asarray(np.minimum(rows["targets"], 255)))
    sums = Sums(nll=float(jnp.sum(nll * weights)), tokens=float(weights.sum()), correct=0.0,
                bytes=float((tok.token_bytes[rows["targets"]] * weights).sum()),
                chars=float((tok.token_chars[rows["targets"]] * weights).sum()))
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_the_response_cache_runs_only_the_misses_in_one_batch(tmp_path):
    from train.generation import Completion
    from train.response_cache import ResponseCache, complete_cached

    class CountingGenerator:
        def __init__(self):
            self.calls = []

        def complete(self, prompts, opts, score=None):
            self.calls.append(list(prompts))
            return [[Completion(f"{p}!{opts.seed}", [1, 2], -1.5, "length")] for p in prompts]

    generator, cache = CountingGenerator(), ResponseCache(tmp_path / "responses")
    opts = SamplingOptions(max_new_tokens=4, seed=3)
    first = complete_cached(generator, "run@1", ["a", "b"], opts, cache)
    again = complete_cached(generator, "run@1", ["b", "c", "a"], opts, cache)
    assert generator.calls == [["a", "b"], ["c"]]  # only the miss ran, and the hits came back in order
    assert [c[0].text for c in again] == ["b!3", "c!3", "a!3"] and again[2] == first[0]
    complete_cached(generator, "run@2", ["a"], opts, cache)  # other weights: another key
    complete_cached(generator, "run@1", ["a"], SamplingOptions(max_new_tokens=4, seed=4), cache)  # another seed
    assert generator.calls[2:] == [["a"], ["a"]]
    (tmp_path / "responses" / f"{cache.key('run@1', 'b', opts)}.json").write_text('[{"text": ')  # torn file
    complete_cached(generator, "run@1", ["b"], opts, cache)
    assert generator.calls[-1] == ["b"]  # recomputed, not an error
    calls = len(generator.calls)
    complete_cached(generator, "run@1", ["b"], opts, cache, score=lambda p, c: 0.0)  # a scorer is code: no cache
    assert len(generator.calls) == calls + 1


# ------------------------------------------------------------ refusals of sample and eval (all before loading weights)

SAMPLE_CASES = {
    "prompt longer than the context": (["--prompt", "a" * 60, "--max-new-tokens", "10"],
                                        ["prompt 0 is 60 tokens", "context of 64 tokens"]),
    "empty prompt": (["--prompt", ""], ["prompt 0 is empty"]),
    "no prompt": ([], ["give at least one prompt"]),
    "top_p zero": (["--prompt", "a", "--top-p", "0"], ["--top-p must be in (0, 1]", "got 0.0"]),
    "top_p above one": (["--prompt", "a", "--top-p", "1.5"], ["--top-p must be in (0, 1]"]),
    "negative temperature": (["--prompt", "a", "--temperature", "-0.5"], ["--temperature must be >= 0"]),
    "regex longer than the budget": (["--prompt", "a", "--regex", "b{100}", "--max-new-tokens", "10"],
                                     ["needs at least 100 tokens", "--max-new-tokens"]),
    "invalid regex": (["--prompt", "a", "--regex", "(ab"], ["--regex '(ab' cannot constrain decoding"]),
    "regex the tokenizer cannot spell": (["--prompt", "a", "--regex", "[^\\x00-\\U0010FFFF]"],
                                         ["--regex", "cannot"]),
    "beam with a constraint": (["--prompt", "a", "--beam", "2", "--regex", "a+"], ["not --beam"]),
    "beam with a stop string": (["--prompt", "a", "--beam", "2", "--stop", "x"], ["--stop works with sampling"]),
    "stop string with a constraint": (["--prompt", "a", "--regex", "a+", "--stop", "a"], ["drop --stop or the constraint"]),
}


@pytest.mark.parametrize("name", SAMPLE_CASES)
def test_sample_refusals(capsys, untrained_run, name):
    """Each refusal comes before the weights load: the run here has none, which would be the error otherwise."""
    argv, expected = SAMPLE_CASES[name]
    refused(capsys, ["sample", str(untrained_run), "--max-new-tokens", "10", *argv], *expected)


def test_numeric_bounds_in_a_schema_are_refused(capsys, untrained_run, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}))
    refused(capsys, ["sample", str(untrained_run), "--prompt", "a", "--json-schema", str(schema)],
            "'maximum'", "minDigits/maxDigits")


def test_sampling_a_run_without_a_checkpoint(capsys, untrained_run, tmp_path):
    refused(capsys, ["sample", str(untrained_run), "--prompt", "a"], "has no checkpoint",
            f"tessera train {untrained_run}")
    refused(capsys, ["eval", str(untrained_run)], "has no checkpoint")
    refused(capsys, ["sample", str(tmp_path), "--prompt", "a"], "not a run directory")


def test_eval_with_a_missing_data_file(capsys, untrained_run, tmp_path):
    refused(capsys, ["eval", str(untrained_run), "--data", str(tmp_path / "nothing.txt")], "does not exist")

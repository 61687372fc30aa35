import numpy as np
import pytest

from train import data as data_lib
from train.config import ConfigError, DataConfig
from train.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def docs(n=30, seed=0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return [(f"doc{i}.py", "".join(rng.choice(letters, int(rng.integers(1, 90))))) for i in range(n)]


@pytest.fixture(scope="module")
def corpus():
    return data_lib.pack(data_lib.tokenize(docs(), TOK), TOK, seq_len=16)


def test_every_token_is_an_input_exactly_once_per_epoch(corpus):
    stream = np.concatenate([np.append(TOK.encode(t), TOK.eod_id) for _, t in docs()])
    rows = data_lib.train_batches(corpus, global_batch=1, seed=3)
    epoch = [rows[k] for k in range(corpus.n_rows)]
    all_inputs = corpus.rows(np.arange(corpus.n_rows))["inputs"]
    order = [int(np.flatnonzero(np.all(all_inputs == r["inputs"], axis=1))[0]) for r in epoch]
    assert sorted(order) == list(range(corpus.n_rows))  # a permutation of all rows
    inputs = corpus.rows(np.arange(corpus.n_rows))["inputs"].reshape(-1)[: len(stream)]
    np.testing.assert_array_equal(inputs, stream)
    # Targets are the stream shifted by one; padding after the corpus carries no loss.
    all_rows = corpus.rows(np.arange(corpus.n_rows))
    np.testing.assert_array_equal(all_rows["targets"].reshape(-1)[: len(stream) - 1], stream[1:])
    assert all_rows["weights"].reshape(-1)[len(stream) - 1 :].sum() == 0


def test_loss_never_crosses_a_document_boundary(corpus):
    r = corpus.rows(np.arange(corpus.n_rows))
    eod = r["inputs"] == TOK.eod_id
    # The <eod> token's target is the next document's first token: never scored.
    assert np.all(r["weights"][eod] == 0)
    # Every other real token predicts a token of its own document.
    assert np.all(r["weights"][~eod & (r["segment_ids"] > 0)] == 1)


def test_positions_restart_at_each_document_start(corpus):
    r = corpus.rows(np.arange(corpus.n_rows))
    for row_seg, row_pos in zip(r["segment_ids"], r["positions"]):
        for j in range(len(row_seg)):
            expect = 0 if j == 0 or row_seg[j] != row_seg[j - 1] else row_pos[j - 1] + 1
            assert row_pos[j] == expect


def test_same_seed_same_batches_other_seed_other_order(corpus):
    a = data_lib.train_batches(corpus, 4, seed=1)
    b = data_lib.train_batches(corpus, 4, seed=1)
    c = data_lib.train_batches(corpus, 4, seed=2)
    for k in range(5):
        np.testing.assert_array_equal(a[k]["inputs"], b[k]["inputs"])
    assert any(not np.array_equal(a[k]["inputs"], c[k]["inputs"]) for k in range(5))


def test_epochs_are_reshuffled(corpus):
    ds = data_lib.train_batches(corpus, 1, seed=0)
    n = corpus.n_rows
    first = np.stack([ds[k]["inputs"][0] for k in range(n)])
    second = np.stack([ds[k]["inputs"][0] for k in range(n, 2 * n)])
    assert not np.array_equal(first, second)
    assert sorted(map(bytes, first)) == sorted(map(bytes, second))  # same rows, new order


@pytest.mark.parametrize("processes", [2, 4])
def test_process_count_partitions_the_same_global_batch(corpus, processes):
    whole = data_lib.train_batches(corpus, 8, seed=5)
    parts = [data_lib.train_batches(corpus, 8, seed=5, process_index=p, process_count=processes) for p in range(processes)]
    for k in range(6):
        joined = np.concatenate([part[k]["inputs"] for part in parts])
        np.testing.assert_array_equal(joined, whole[k]["inputs"])


def test_iterator_state_resumes_the_stream(corpus):
    it = iter(data_lib.train_batches(corpus, 4, seed=0).to_iter_dataset())
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["inputs"] for _ in range(3)]
    fresh = iter(data_lib.train_batches(corpus, 4, seed=0).to_iter_dataset())
    fresh.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(fresh)["inputs"], e)


def test_heldout_split_is_deterministic_and_about_the_fraction():
    keys = [f"lib/module_{i}.py" for i in range(20000)]
    held = [k for k in keys if data_lib.is_heldout(k, 0.02)]
    assert 0.015 < len(held) / len(keys) < 0.025
    assert held == [k for k in keys if data_lib.is_heldout(k, 0.02)]


def test_stdlib_corpus_is_found_without_download():
    d, _ = data_lib.load_documents(DataConfig(max_documents=5))
    assert len(d) == 5 and all(k.endswith(".py") for k, _ in d)
    assert not any("site-packages" in k for k, _ in data_lib.stdlib_documents())


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta")
    got, skipped = data_lib.load_documents(DataConfig(source="text", paths=[str(tmp_path / "**" / "*.txt")]))
    assert sorted(t for _, t in got) == ["alpha", "beta"] and skipped == {}
    (tmp_path / "c.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\nnot json\n{"text": "three"}\n')
    got, skipped = data_lib.load_documents(DataConfig(source="jsonl", paths=[str(tmp_path / "c.jsonl")], text_field="body"))
    assert [t for _, t in got] == ["one", "two"]
    assert skipped == {"invalid_json": 1, "missing_text_field": 1}
    with pytest.raises(ConfigError, match="no usable documents.*data.text_field='nope'"):
        data_lib.load_documents(DataConfig(source="jsonl", paths=[str(tmp_path / "c.jsonl")], text_field="nope"))
    with pytest.raises(ConfigError, match="matched no files"):
        data_lib.load_documents(DataConfig(source="text", paths=[str(tmp_path / "*.md")]))


def test_unigram_baseline_matches_hand_computation():
    tok = TOK
    train = data_lib.pack([np.array([97, 97, 98], np.int32)], tok, 4)
    held = data_lib.pack([np.array([97, 98], np.int32), np.array([99], np.int32)], tok, 8)
    counts = np.ones(tok.vocab_size)
    counts[97] += 2
    counts[98] += 1
    counts[tok.eod_id] += 1
    p = counts / counts.sum()
    # Scored targets, as the model's loss weights them: 98 and <eod> of the first document, <eod> of
    # the second; the first document's <eod> -> 99 crosses a boundary and is not scored. Bytes: 98's one.
    expected = -(np.log2(p[98]) + 2 * np.log2(p[tok.eod_id])) / 1
    batches = [held.rows(np.arange(held.n_rows))]
    assert batches[0]["weights"].sum() == 3
    assert data_lib.unigram_bits_per_byte(train, batches, tok.token_bytes) == pytest.approx(expected)

import numpy as np
import pytest

from infra.cli import main
from tests.conftest import tiny_config
from train.config import ConfigError
from train.data.corpus import load_corpus
from train.data.prepare import tokenized
from train.data.sources import stdlib_documents
from train.tokenizer import ByteTokenizer, BpeTokenizer, train_bpe

TEXT = "def naïve(x):\n    return x  # ünïcödé ✓\n"


def test_byte_tokenizer_round_trip_and_byte_counts():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert int(tok.token_bytes[ids].sum()) == len(TEXT.encode())
    assert tok.token_bytes[tok.eod_id] == 0 and tok.vocab_size == 264
    assert {"<pad>", "<eod>", "<mask>", "<cls>", "<sep>", "<|system|>", "<|user|>", "<|assistant|>"} == set(tok.special)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    texts = [t for _, t in stdlib_documents(40)]
    return train_bpe(texts, 600, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def test_bpe_round_trip_and_compression(bpe):
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT
    code = stdlib_documents(3)[2][1]
    assert len(bpe.encode(code)) < 0.7 * len(code.encode())  # merges learned on Python source compress it


def test_bpe_token_bytes_add_up_to_the_text(bpe):
    for text in (TEXT, stdlib_documents(5)[4][1][:2000]):
        assert int(bpe.token_bytes[bpe.encode(text)].sum()) == len(text.encode("utf-8"))


def test_bpe_special_tokens_and_reload(bpe):
    again = BpeTokenizer(bpe.path)
    assert again.eod_id == bpe.special["<eod>"] and again.pad_id == bpe.special["<pad>"]
    assert {"<mask>", "<cls>", "<sep>"} <= set(again.special)
    assert all(ids[-1] == again.eod_id for ids in tokenized(again, ["a = 1", "b = 2"]))


def test_tokenizer_train_cli(tmp_path):
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "data.max_documents=30", "--vocab-size", "400", "--out", str(out)]) == 0
    tok = BpeTokenizer(out)
    assert tok.vocab_size == 400


def test_tokenizer_train_cli_rejects_tiny_vocab(tmp_path, capsys):
    assert main(["tokenizer", "train", "data.max_documents=5", "--vocab-size", "100", "--out", str(tmp_path / "t.json")]) == 2
    assert "--vocab-size 100 is too small" in capsys.readouterr().err


def test_vocab_must_cover_the_tokenizer(bpe, tmp_path):
    with pytest.raises(ConfigError, match="model.vocab_size=264 is smaller than the tokenizer's 600"):
        load_corpus(tiny_config(f"data.tokenizer={bpe.path}", tmp_path=tmp_path))
    corpus = load_corpus(tiny_config(f"data.tokenizer={bpe.path}", "model.vocab_size=600", tmp_path=tmp_path))
    counts = corpus.sources[0].token_counts()
    assert len(counts) == 600 and counts[264:].sum() > 0  # merged tokens, all within the vocabulary


def test_missing_tokenizer_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="tessera tokenizer train"):
        load_corpus(tiny_config(f"data.tokenizer={tmp_path}/none.json", tmp_path=tmp_path))

"""Data: sources, preparation into shards, rows read from them, batches, mixtures; each against a plain
reference (the documents' own tokens)."""

import gzip
import json
import os

import numpy as np
import pytest

from tests.conftest import prepared_stream
from train.config import ConfigError, DataConfig
from train.data import corpus as data_lib
from train.data.mixture import BLOCK, Mixture, shares
from train.data.prepare import prepare
from train.data.reader import PreparedData, SplitStream
from train.data.sources import FileSource, InMemorySource, is_heldout, read_documents, stdlib_documents
from train.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def docs(n=30, seed=0, longest=90):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return [(f"doc{i}.py", "".join(rng.choice(letters, int(rng.integers(1, longest))))) for i in range(n)]


def doc_tokens(texts):
    return [np.append(TOK.encode(t), TOK.eod_id) for t in texts]


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return prepared_stream(docs(), tmp_path_factory.mktemp("prepared"), seq_len=16, seed=3)


def epoch_rows(stream, epoch=0):
    return stream.rows(epoch * stream.n_rows + np.arange(stream.n_rows))


def documents_of(rows):
    """Each (row, segment)'s input tokens (padding dropped)."""
    out = []
    for inputs, seg in zip(rows["inputs"], rows["segment_ids"]):
        out += [inputs[seg == s] for s in np.unique(seg[seg > 0])]
    return out


def test_every_token_is_an_input_exactly_once_per_epoch_in_document_order(stream):
    texts = [t for _, t in docs()]
    expected = doc_tokens(texts)
    rows = epoch_rows(stream)
    inputs = rows["inputs"][rows["segment_ids"] > 0]
    assert len(inputs) == sum(map(len, expected))  # every token once: none lost, none repeated
    assert sorted(inputs.tolist()) == sorted(np.concatenate(expected).tolist())
    # Read in stream order (undo the row shuffle), the rows are the documents in the epoch's order, whole.
    order, starts, row_order = stream._epoch(0)
    in_stream_order = {k: v[np.argsort(row_order)] for k, v in rows.items()}
    stream_inputs = in_stream_order["inputs"].reshape(-1)[: stream.n_tokens]
    np.testing.assert_array_equal(stream_inputs, np.concatenate([expected[i] for i in order]))
    np.testing.assert_array_equal(in_stream_order["targets"].reshape(-1)[: stream.n_tokens - 1], stream_inputs[1:])


def test_no_segment_crosses_a_document(stream):
    pieces = documents_of(epoch_rows(stream))
    whole = [",".join(map(str, t)) + "," for t in doc_tokens(t for _, t in docs())]
    # Each segment is a contiguous piece of one document.
    for piece in pieces:
        assert any(("," + ",".join(map(str, piece)) + ",") in ("," + w) for w in whole)


def test_loss_never_crosses_a_document_boundary(stream):
    r = epoch_rows(stream)
    eod = r["inputs"] == TOK.eod_id
    # The <eod> token's target is the next document's first token: never scored.
    assert np.all(r["weights"][eod] == 0)
    # Every other real token predicts a token of its own document.
    assert np.all(r["weights"][~eod & (r["segment_ids"] > 0)] == 1)


def test_positions_restart_at_each_document_start(stream):
    r = epoch_rows(stream)
    for row_seg, row_pos in zip(r["segment_ids"], r["positions"]):
        for j in range(len(row_seg)):
            expect = 0 if j == 0 or row_seg[j] != row_seg[j - 1] else row_pos[j - 1] + 1
            assert row_pos[j] == expect


def test_same_seed_same_batches_other_seed_other_order(stream):
    other = SplitStream(stream.data, "train", 16, seed=4)
    again = SplitStream(stream.data, "train", 16, seed=3)
    a, b, c = (data_lib.train_batches(s, 4) for s in (stream, again, other))
    for k in range(5):
        np.testing.assert_array_equal(a[k]["inputs"], b[k]["inputs"])
    assert any(not np.array_equal(a[k]["inputs"], c[k]["inputs"]) for k in range(5))


def test_epochs_are_reshuffled_documents_and_rows(stream):
    first, second = epoch_rows(stream, 0), epoch_rows(stream, 1)
    assert not np.array_equal(first["inputs"], second["inputs"])
    assert sorted(first["inputs"][first["segment_ids"] > 0].tolist()) == \
        sorted(second["inputs"][second["segment_ids"] > 0].tolist())
    assert not np.array_equal(stream._epoch(0)[0], stream._epoch(1)[0])  # a new document order too


@pytest.mark.parametrize("processes", [2, 4])
def test_process_count_partitions_the_same_global_batch(stream, processes):
    whole = data_lib.train_batches(stream, 8)
    parts = [data_lib.train_batches(stream, 8, process_index=p, process_count=processes) for p in range(processes)]
    for k in range(6):
        joined = np.concatenate([part[k]["inputs"] for part in parts])
        np.testing.assert_array_equal(joined, whole[k]["inputs"])


@pytest.mark.parametrize("prefetch", [0, 3])
def test_iterator_state_is_after_the_last_batch_returned(stream, prefetch):
    it = data_lib.batch_iterator(data_lib.train_batches(stream, 4), prefetch)
    for _ in range(3):
        next(it)
    state = it.get_state()
    assert state == {"next_index": 3}  # not the prefetched position
    expected = [next(it)["inputs"] for _ in range(3)]
    fresh = data_lib.batch_iterator(data_lib.train_batches(stream, 4), prefetch)
    fresh.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(fresh)["inputs"], e)


def test_heldout_split_is_deterministic_and_about_the_fraction():
    keys = [f"lib/module_{i}.py" for i in range(20000)]
    held = [k for k in keys if is_heldout(k, 0.02)]
    assert 0.015 < len(held) / len(keys) < 0.025
    assert held == [k for k in keys if is_heldout(k, 0.02)]


def test_stdlib_corpus_is_found_without_download():
    d = stdlib_documents(5)
    assert len(d) == 5 and all(k.endswith(".py") for k, _ in d)
    assert not any("site-packages" in k for k, _ in stdlib_documents())


def test_text_jsonl_compressed_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta")
    (tmp_path / "sub" / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "sub" / "blank.txt").write_text("  \n")
    got, skipped = read_documents(FileSource("text", (str(tmp_path / "**" / "*.txt"),)))
    assert sorted(t for _, t in got) == ["alpha", "beta"] and skipped == {"invalid_utf8": 1, "empty": 1}
    lines = b'{"body": "one"}\n\n{"body": "two"}\nnot json\n{"text": "three"}\n'
    (tmp_path / "c.jsonl").write_bytes(lines)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst"):
        got, skipped = read_documents(FileSource("jsonl", (str(tmp_path / name),), "body"))
        assert [t for _, t in got] == ["one", "two"], name
        assert skipped == {"invalid_json": 1, "missing_text_field": 1}
    pq.write_table(pa.table({"body": ["uno", None, "dos", ""]}), tmp_path / "d.parquet", row_group_size=2)
    got, skipped = read_documents(FileSource("parquet", (str(tmp_path / "d.parquet"),), "body"))
    assert [t for _, t in got] == ["uno", "dos"] and skipped == {"missing_text_field": 1, "empty": 1}
    with pytest.raises(ConfigError, match="has no column 'text'"):
        read_documents(FileSource("parquet", (str(tmp_path / "d.parquet"),), "text"))
    with pytest.raises(ConfigError, match="matched no files"):
        read_documents(FileSource("text", (str(tmp_path / "*.md"),)))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="cannot read .*broken.jsonl.gz"):
        read_documents(FileSource("jsonl", (str(tmp_path / "broken.jsonl.gz"),)))


def test_prepare_counts_skipped_records_by_cause_in_the_manifest(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "one"}\nnot json\n{"x": 1}\n{"text": "  "}\n{"text": "two"}\n')
    manifest = prepare(FileSource("jsonl", (str(tmp_path / "c.jsonl"),)), "byte", tmp_path / "out",
                       heldout_fraction=0.0)
    assert manifest["skipped"] == {"empty": 1, "invalid_json": 1, "missing_text_field": 1}
    assert manifest["splits"]["train"]["documents"] == 2 and manifest["records"] == 5
    assert manifest["splits"]["train"]["tokens"] == len("one") + len("two") + 2
    assert manifest["plan"]["id_dtype"] == "uint16" and manifest["plan"]["tokenizer"]["identity"] == "byte"
    assert PreparedData(tmp_path / "out").lengths("train").tolist() == [4, 4]


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith("prepare")}


def test_prepare_is_deterministic_for_any_worker_count_and_resumes(tmp_path):
    source = InMemorySource(tuple(docs(60, seed=1, longest=400)))
    one = prepare(source, "byte", tmp_path / "one", shard_chars=2000)
    assert len(one["splits"]["train"]["shards"]) > 3
    two = prepare(source, "byte", tmp_path / "two", shard_chars=2000, workers=2)
    assert one == two and shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")

    # A run that dies after some chunks leaves them, and no manifest; the next run writes only the rest.
    class Dying(InMemorySource):
        def records(self):
            for i, record in enumerate(super().records()):
                if i == 30:
                    raise KeyboardInterrupt
                yield record

    with pytest.raises(KeyboardInterrupt):
        prepare(Dying(source.documents), "byte", tmp_path / "three", shard_chars=2000)
    assert not (tmp_path / "three" / "manifest.json").exists()
    with pytest.raises(ConfigError, match="a prepare was interrupted"):
        PreparedData(tmp_path / "three")
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "three").iterdir() if p.name.startswith("chunk-")}
    assert done
    prepare(source, "byte", tmp_path / "three", shard_chars=2000)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "three").iterdir() if p.name.startswith("chunk-")}
    assert all(after[name] == t for name, t in done.items())  # finished chunks were not written again
    assert shard_bytes(tmp_path / "three") == shard_bytes(tmp_path / "one")
    # Run again on the same inputs: nothing is written.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").iterdir()}
    assert prepare(source, "byte", tmp_path / "one", shard_chars=2000) == one
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").iterdir()} == stamps
    with pytest.raises(ConfigError, match="prepared differently .*source"):
        prepare(InMemorySource(tuple(docs(5))), "byte", tmp_path / "one", shard_chars=2000)


def test_damaged_shards_are_named(tmp_path):
    prepared_stream(docs(40), tmp_path / "a", seq_len=16)
    shard = tmp_path / "a" / "train-00000.arrayrecord"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=f"shard {shard} is damaged"):
        PreparedData(tmp_path / "a")
    # Same size, bytes overwritten inside the records.
    corrupted = bytearray(data)
    corrupted[100:400] = bytes(300)
    shard.write_bytes(bytes(corrupted))
    stream = SplitStream(PreparedData(tmp_path / "a"), "train", 16, seed=0)
    with pytest.raises(ConfigError, match=f"{shard}|shards of .* cannot be read"):
        epoch_rows(stream)


def test_a_mixture_draws_each_source_by_its_weight(tmp_path):
    streams = [prepared_stream(docs(20, seed=i), tmp_path / f"s{i}", seq_len=8, seed=0) for i in range(3)]
    weights = [0.5, 0.3, 0.2]
    mixture = Mixture(streams, weights, seed=7)
    picked = np.array([mixture.locate(g)[0] for g in range(10_000)])
    realised = np.bincount(picked, minlength=3) / len(picked)
    assert np.all(np.abs(realised - weights) < 0.01), realised
    assert mixture.rows_before(10_000).tolist() == np.bincount(picked).tolist()
    # Each source's rows come in its own order, every one of them once.
    for s in range(3):
        index = [mixture.locate(g)[1] for g in range(10_000) if picked[g] == s]
        assert index == list(range(len(index)))
    # A row of the mixture is that source's row.
    g = int(np.flatnonzero(picked == 2)[5])
    np.testing.assert_array_equal(mixture.rows(np.array([g]))["inputs"], streams[2].rows(np.array([5]))["inputs"])
    assert shares([1, 1, 1], 10).tolist() == [4, 3, 3] and shares([0.7, 0.3]).sum() == BLOCK


def test_mixture_config_is_checked():
    with pytest.raises(ValueError, match="weight=0.0 must be > 0"):
        DataConfig(mixture=[{"source": "a", "weight": 1}, {"source": "b", "weight": 0}])
    with pytest.raises(ValueError, match="both set"):
        DataConfig(source="a", mixture=[{"source": "b", "weight": 1}])
    with pytest.raises(ValueError, match="s3:// scheme is not supported"):
        DataConfig(source="s3://bucket/data")


def test_a_source_prepared_with_another_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    prepared_stream(docs(10), tmp_path / "d", seq_len=8)
    bpe = tmp_path / "tok" / "tokenizer.json"
    bpe.parent.mkdir()
    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<eod>"])
    tok.save(str(bpe))
    with pytest.raises(ConfigError, match=rf"prepared with tokenizer 'byte' .* but data.tokenizer='{bpe}'"):
        data_lib.open_prepared(str(tmp_path / "d"), str(bpe))


def test_unigram_baseline_matches_hand_computation(tmp_path):
    train = prepared_stream([("a", "aab")], tmp_path / "t", seq_len=4)
    held = prepared_stream([("b", "ab"), ("c", "c")], tmp_path / "h", seq_len=8)
    counts = np.ones(TOK.vocab_size)
    counts[97] += 2
    counts[98] += 1
    counts[TOK.eod_id] += 1
    p = counts / counts.sum()
    # Scored targets, as the model's loss weights them: 98 and <eod> of the first document, <eod> of
    # the second; the first document's <eod> -> 99 crosses a boundary and is not scored. Bytes: 98's one.
    expected = -(np.log2(p[98]) + 2 * np.log2(p[TOK.eod_id])) / 1
    batches = [held.rows(np.arange(held.n_rows))]
    assert batches[0]["weights"].sum() == 3
    got = data_lib.unigram_bits_per_byte(train.data.token_counts(), batches, TOK.token_bytes)
    assert got == pytest.approx(expected)


def test_a_config_corpus_is_prepared_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_DATA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for _, t in docs(50)))
    from tests.conftest import tiny_config

    cfg = tiny_config("data.source=jsonl", f"data.paths=[{tmp_path / 'c.jsonl'}]", "data.heldout_fraction=0.2")
    corpus = data_lib.load_corpus(cfg)
    [prepared] = list((tmp_path / "cache").iterdir())
    stamp = os.stat(prepared / "manifest.json").st_mtime_ns
    again = data_lib.load_corpus(cfg)
    assert os.stat(prepared / "manifest.json").st_mtime_ns == stamp
    assert corpus.train.n_tokens == again.train.n_tokens == corpus.sources[0].split("train")["tokens"]
    held = [t for i, (_, t) in enumerate(docs(50)) if is_heldout(f"{tmp_path / 'c.jsonl'}:{i + 1}", 0.2)]
    assert corpus.heldout.n_tokens == sum(len(t) + 1 for t in held)


READ_ROWS = """
import json, sys
from infra.runtime import apply_platform_flags
apply_platform_flags()
import jax
from infra.distributed import start_from_env
start_from_env()
from tests.conftest import tiny_config
from train.data import corpus as data_lib
corpus = data_lib.load_corpus(tiny_config("data.batch_size=8", "data.seq_len=32"))
documents = corpus.train.streams[0].documents
read, get = set(), type(documents).__getitem__
type(documents).__getitem__ = lambda self, i: read.add(int(i)) or get(self, i)
batches = data_lib.train_batches(corpus.train, 8, jax.process_index(), jax.process_count())
rows = [batches[k]["inputs"].tolist() for k in (0, 5)]
print(json.dumps({"process": jax.process_index(), "rows": rows, "read": sorted(read)}))
"""


DIFFERENT_DATA = """
import sys
from infra.runtime import apply_platform_flags
apply_platform_flags()
import jax
from infra.distributed import start_from_env
start_from_env()
from tests.conftest import tiny_config
from train.config import ConfigError
from train.data import corpus as data_lib
corpus = data_lib.load_corpus(tiny_config(f"data.max_documents={100 + jax.process_index()}"))
try:
    data_lib.check_same_data(corpus)
except ConfigError as e:
    print("refused:", e)
"""


@pytest.mark.slow
def test_processes_that_prepared_different_data_are_refused():
    import subprocess
    import sys

    from infra.launch.local import free_port, process_env

    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", DIFFERENT_DATA], env=process_env(i, 2, 1, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all("refused: the processes prepared different data from the same config" in out for out in outs), outs


@pytest.mark.slow
def test_processes_of_a_real_job_read_disjoint_rows_that_make_the_same_global_batch(tmp_path):
    import subprocess
    import sys

    from infra.launch.local import free_port, process_env

    def job(processes):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-c", READ_ROWS], env=process_env(i, processes, 1, port),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
        return sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outs), key=lambda r: r["process"])

    one = job(1)[0]
    for processes in (2, 4):
        parts = job(processes)
        for k in range(2):  # each process's rows, in process order, are the one-process global batch
            assert sum((p["rows"][k] for p in parts), []) == one["rows"][k]
        # Each process read only the documents under its own rows: together, what one process reads for
        # the whole batches; each, a part of it.
        reads = [set(p["read"]) for p in parts]
        assert set().union(*reads) == set(one["read"])
        assert max(map(len, reads)) < len(one["read"])


def test_data_commands_prepare_inspect_and_refuse_in_one_line(tmp_path, capsys):
    from infra.cli import main
    from tests.conftest import refused

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for _, t in docs(12)))
    out = tmp_path / "prepared"
    assert main(["data", "prepare", str(tmp_path / "c.jsonl"), "--text-field", "body", "--out", str(out),
                 "--heldout-fraction", "0.25"]) == 0
    assert "documents" in capsys.readouterr().out
    assert main(["data", "inspect", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["splits"]["train"]["documents"] + shown["splits"]["heldout"]["documents"] == 12
    assert main(["data", "inspect", str(out), "--samples", "1"]) == 0
    assert "--- train document 0" in capsys.readouterr().out
    refused(capsys, ["data", "prepare", str(tmp_path / "none" / "*.jsonl"), "--out", str(tmp_path / "o")],
            "matched no files")
    refused(capsys, ["data", "prepare", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o")],
            "gave no usable documents", "--text-field 'text'")
    refused(capsys, ["data", "prepare", str(tmp_path / "c.jsonl"), "--text-field", "body", "--out", str(out),
                     "--heldout-fraction", "0.5"], "prepared differently (heldout_fraction differ)", watch=out)
    refused(capsys, ["data", "inspect", str(tmp_path)], "not a prepared data directory")
    refused(capsys, ["train", f"data.source={tmp_path}"], "not a prepared data directory")
    refused(capsys, ["export-hf", str(tmp_path), "--out", "gs://bucket/export"], "written to a local directory")

"""Reading a prepared directory: one split as an endless stream of packed rows, read at random.

Rows are defined globally, never per process: each epoch the split's documents are shuffled (by seed and
epoch), concatenated (each already ends with <eod>) and cut into rows of `seq_len` inputs, the targets
being the stream shifted by one; then the rows' order is shuffled too. Every token is an input exactly once
per epoch and no document is truncated. Row g of the run is row g mod R of epoch g // R, so a process asks
for the rows of its share of a global batch and reads only the documents that overlap them, whatever the
number of processes. Segment ids mark documents (attention and loss never cross one); positions restart
where a document starts within a row.

Post-training data packs differently (the manifest's `packing`): whole conversations (`ExampleStream`), several
to a row and never split, each token's loss mark from the record; and preference pairs (`PairStream`), one row
per response, a row of the batch holding both.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from train.config import ConfigError, first_line
from train import storage
from train.data import records
from train.data.prepare import FORMAT_VERSION, SPLITS


class PreparedData:
    """A prepared directory's manifest, checked: its format, and that every shard is there at its size."""

    def __init__(self, path: str | Path):
        self.path = storage.path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            hint = " (a prepare was interrupted: run it again to finish)" if (self.path / "prepare.json").is_file() \
                else " (make one with `tessera data prepare`)"
            raise ConfigError(f"{self.path} is not a prepared data directory: no manifest.json{hint}")
        try:
            self.manifest = json.loads(manifest.read_text())
            self.plan = self.manifest["plan"]
            version = self.plan["format_version"]
            shards = {split: self.manifest["splits"][split]["shards"] for split in SPLITS}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{manifest} is damaged ({first_line(e)}); prepare the data again") from None
        if version != FORMAT_VERSION:
            raise ConfigError(f"{self.path} was prepared in format {version}; this Tessera reads format "
                              f"{FORMAT_VERSION}: prepare it again")
        if self.packing not in STREAMS:
            raise ConfigError(f"{self.path} asks for packing {self.packing!r}; this Tessera packs "
                              f"{', '.join(map(repr, STREAMS))}")
        for split in SPLITS:
            for shard in shards[split]:
                file = self.path / shard["file"]
                size = storage.size(file)
                if size != shard["bytes"]:
                    found = "missing" if size is None else f"{size:,} bytes, not {shard['bytes']:,}"
                    raise ConfigError(f"shard {file} is damaged ({found}); prepare the data again")

    @property
    def tokenizer(self) -> dict:
        return self.plan["tokenizer"]

    @property
    def packing(self) -> str:
        return self.plan.get("packing", "concat")

    def stream(self, split: str, seq_len: int, seed: int | None):
        """This split as rows, packed as the data's kind asks."""
        return STREAMS[self.packing](self, split, seq_len, seed)

    def split(self, name: str) -> dict:
        return self.manifest["splits"][name]

    def lengths(self, split: str) -> np.ndarray:
        lengths = _load_array(self.path / f"{split}.lengths.npy")
        if len(lengths) != self.split(split)["documents"]:
            raise ConfigError(f"{self.path / f'{split}.lengths.npy'} does not match the manifest; prepare again")
        return lengths

    def token_counts(self) -> np.ndarray:
        return _load_array(self.path / "train.counts.npy")


def _load_array(file) -> np.ndarray:
    try:
        return np.load(io.BytesIO(file.read_bytes()), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"{file} cannot be read ({first_line(e)}); prepare the data again") from None


class Documents:
    """Random access to one split's documents (global index over its shards), with a small cache: a document
    longer than a row is asked for by several rows."""

    def __init__(self, data: PreparedData, split: str, cache_size: int = 64):
        from grain.sources import ArrayRecordDataSource

        shards = data.split(split)["shards"]
        self.files = [str(data.path / s["file"]) for s in shards]
        self.ends = np.cumsum([s["documents"] for s in shards])
        try:  # "file[0:n]": the manifest's counts, so no shard is opened before its first document is read
            self.source = ArrayRecordDataSource([f"{f}[0:{s['documents']}]" for f, s in zip(self.files, shards)])
        except Exception as e:  # the reader's own error for a damaged file names no file
            raise ConfigError(f"shards of {data.path} cannot be read ({first_line(e)}); prepare the data again") \
                from None
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_size, self.lock = cache_size, threading.Lock()

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """The record's fields (a document: its `tokens`)."""
        with self.lock:
            if index in self.cache:
                self.cache.move_to_end(index)
                return self.cache[index]
        try:
            tokens = records.decode(self.source[index])
        except Exception as e:
            shard = self.files[int(np.searchsorted(self.ends, index, side="right"))]
            raise ConfigError(f"shard {shard} is damaged at document {index} ({first_line(e)}); "
                              "prepare the data again") from None
        with self.lock:
            self.cache[index] = tokens
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return tokens


class SplitStream:
    """One split of a prepared directory as rows of `seq_len` (see the module doc). `seed=None` keeps the
    documents and rows in prepared order (evaluation: the same rows every time)."""

    def __init__(self, data: PreparedData, split: str, seq_len: int, seed: int | None):
        self.data, self.split, self.seq_len, self.seed = data, split, seq_len, seed
        self.lengths = data.lengths(split).astype(np.int64)
        if not len(self.lengths):
            raise ConfigError(f"{data.path} has no {split} documents; prepare it with a held-out fraction that "
                              "leaves documents on both sides, or add documents")
        self.n_tokens = int(self.lengths.sum())
        self.n_rows = -(-self.n_tokens // seq_len)  # every token is an input once (the last one's target: padding)
        self.pad_id = data.tokenizer["pad_id"]
        self.documents = Documents(data, split)
        self._epochs: OrderedDict[int, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, each document's start in the stream, row order) of an epoch; the last two kept."""
        with self._lock:
            if epoch in self._epochs:
                return self._epochs[epoch]
        n = len(self.lengths)
        index = np.uint32 if max(n, self.n_rows) < 2**32 else np.int64  # half the memory of a corpus's orders
        if self.seed is None:
            order, rows = np.arange(n, dtype=index), np.arange(self.n_rows, dtype=index)
        else:
            seed = self.seed % 2**64  # any int a config holds
            order = np.random.default_rng([seed, epoch, 0]).permutation(n).astype(index)
            rows = np.random.default_rng([seed, epoch, 1]).permutation(self.n_rows).astype(index)
        starts = np.concatenate([[0], np.cumsum(self.lengths[order])])
        with self._lock:
            self._epochs[epoch] = (order, starts, rows)
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return order, starts, rows

    def _row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and segment ids (0: padding) of `seq_len + 1` stream positions from the row's start."""
        order, starts, rows = self._epoch(row // self.n_rows)
        begin = int(rows[row % self.n_rows]) * self.seq_len
        end = begin + self.seq_len + 1
        first = int(np.searchsorted(starts, begin, side="right")) - 1
        last = min(int(np.searchsorted(starts, end, side="left")), len(order))
        pieces = [self.documents[int(order[d])]["tokens"] for d in range(first, last)]
        tokens = np.concatenate(pieces).astype(np.int32)[begin - starts[first]: end - starts[first]]
        segments = np.repeat(np.arange(1, last - first + 1, dtype=np.int32), [len(p) for p in pieces])
        segments = segments[begin - starts[first]: end - starts[first]]
        pad = self.seq_len + 1 - len(tokens)
        if pad:  # the epoch's last row
            tokens = np.concatenate([tokens, np.full(pad, self.pad_id, np.int32)])
            segments = np.concatenate([segments, np.zeros(pad, np.int32)])
        return tokens, segments

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `index` (run-wide row numbers): inputs, targets, loss weights, segment ids and positions."""
        tokens, segments = zip(*(self._row(int(g)) for g in np.asarray(index).reshape(-1)))
        return packed_rows(np.stack(tokens), np.stack(segments))


def packed_rows(tokens: np.ndarray, segments: np.ndarray, marks: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Training rows from windows of `seq_len + 1` tokens and their segment ids: the target of each input is
    the next token, weighted only within a document (and, given loss `marks` per token, only where the target
    is marked)."""
    seg, next_seg = segments[:, :-1], segments[:, 1:]
    learn = np.ones(seg.shape, bool) if marks is None else marks[:, 1:] > 0
    column = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
    starts = np.ones_like(seg, dtype=bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    run_start = np.maximum.accumulate(np.where(starts, column, 0), axis=1)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": ((seg == next_seg) & (seg > 0) & learn).astype(np.float32),
        "segment_ids": seg,
        "positions": (column - run_start).astype(np.int32),
    }


class _Examples:
    """What whole-example streams share: the split's records, each of at most `limit` tokens, and the row
    order of an epoch (the examples themselves are fixed to rows once)."""

    def __init__(self, data: PreparedData, split: str, seq_len: int, seed: int | None, limit: int, what: str):
        self.data, self.split, self.seq_len, self.seed = data, split, seq_len, seed
        self.lengths = data.lengths(split).astype(np.int64)
        if not len(self.lengths):
            raise ConfigError(f"{data.path} has no {split} examples; prepare it with a held-out fraction that leaves "
                              "examples on both sides, or add examples")
        too_long = np.flatnonzero(self.lengths > limit)
        if len(too_long):
            i = int(too_long[0])
            raise ConfigError(f"{what} {i} of {data.path}'s {split} split is {self.lengths[i]} tokens, longer than "
                              f"data.seq_len={seq_len} allows ({len(too_long)} such); raise data.seq_len or shorten "
                              "them")
        self.n_tokens = int(self.lengths.sum())
        self.pad_id = data.tokenizer["pad_id"]
        self.documents = Documents(data, split)
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def row_order(self, row: int, n_rows: int) -> int:
        """Which packed row (or pair) run-wide row `row` reads: the epoch's shuffled order (the last two kept)."""
        if self.seed is None:
            return row % n_rows
        epoch = row // n_rows
        with self._lock:
            order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed % 2**64, epoch, 1]).permutation(n_rows)
            with self._lock:
                self._orders[epoch] = order
                if len(self._orders) > 2:
                    self._orders.popitem(last=False)
        return int(order[row % n_rows])


class ExampleStream(_Examples):
    """Whole conversations packed into rows of `seq_len + 1` positions (next-fit, in an order shuffled once by
    the seed), never split; each row's order is shuffled per epoch. Loss only on the records' marked tokens."""

    def __init__(self, data: PreparedData, split: str, seq_len: int, seed: int | None):
        super().__init__(data, split, seq_len, seed, seq_len + 1, "conversation")
        order = np.arange(len(self.lengths)) if seed is None else \
            np.random.default_rng([seed % 2**64, 0, 3]).permutation(len(self.lengths))
        starts, used = [0], 0
        for i, n in enumerate(self.lengths[order]):
            if used + n > seq_len + 1:
                starts.append(i)
                used = 0
            used += n
        self.order, self.starts = order, np.array([*starts, len(order)])
        self.n_rows = len(starts)

    def _row(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = self.row_order(row, self.n_rows)
        records_ = [self.documents[int(i)] for i in self.order[self.starts[r]: self.starts[r + 1]]]
        width = self.seq_len + 1
        tokens, segments, marks = np.full(width, self.pad_id, np.int32), np.zeros(width, np.int32), \
            np.zeros(width, np.uint8)
        at = 0
        for k, rec in enumerate(records_, 1):
            n = len(rec["tokens"])
            tokens[at: at + n], segments[at: at + n], marks[at: at + n] = rec["tokens"], k, rec["loss"]
            at += n
        return tokens, segments, marks

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        tokens, segments, marks = zip(*(self._row(int(g)) for g in np.asarray(index).reshape(-1)))
        return packed_rows(np.stack(tokens), np.stack(segments), np.stack(marks))


class PairStream(_Examples):
    """Preference pairs: row g holds both responses, [2, seq_len] each field (chosen first), each response
    alone in its row from position 0, and `ends` [2]: where its last token (the end token) is an input, so a
    score read there sees the whole response whatever the padding after it."""

    def __init__(self, data: PreparedData, split: str, seq_len: int, seed: int | None):
        super().__init__(data, split, seq_len, seed, seq_len, "preference pair")
        self.n_rows = len(self.lengths)

    def _pair(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rec = self.documents[self.row_order(row, self.n_rows)]
        width = self.seq_len + 1
        tokens, segments, marks = np.full((2, width), self.pad_id, np.int32), np.zeros((2, width), np.int32), \
            np.zeros((2, width), np.uint8)
        ends = np.zeros(2, np.int32)
        for side, name in enumerate(("chosen", "rejected")):
            n = len(rec[name])
            tokens[side, :n], segments[side, :n], marks[side, :n] = rec[name], 1, rec[f"{name}_loss"]
            ends[side] = n - 1
        return tokens, segments, marks, ends

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        tokens, segments, marks, ends = map(np.stack, zip(*(self._pair(int(g)) for g in np.asarray(index).reshape(-1))))
        n = len(tokens)
        flat = packed_rows(tokens.reshape(2 * n, -1), segments.reshape(2 * n, -1), marks.reshape(2 * n, -1))
        return {**{k: v.reshape(n, 2, -1) for k, v in flat.items()}, "ends": ends}


STREAMS = {"concat": SplitStream, "whole": ExampleStream, "pairs": PairStream}

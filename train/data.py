"""Data: documents -> tokens -> packed rows -> shuffled, process-sharded grain batches.

The corpus becomes one token stream (each document followed by <eod>) cut into rows
of `seq_len` inputs; the targets are the stream shifted by one. Every token is an
input exactly once per epoch. Segment ids mark documents so attention and loss never
cross a boundary; positions restart where a document starts within a row.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from train.config import ConfigError, DataConfig, ExperimentConfig
from train.tokenizer import BpeTokenizer, Tokenizer, load_tokenizer

Document = tuple[str, str]  # (key used for the held-out split, text)


# ---------------------------------------------------------------- sources


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _usable_text(raw: bytes, skipped: Counter) -> str | None:
    """Decoded text, or None (counted in `skipped`) for a record that is not valid UTF-8 or is empty."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        skipped["invalid_utf8"] += 1
        return None
    if not text.strip():
        skipped["empty"] += 1
        return None
    return text


def stdlib_documents(limit: int | None = None, skipped: Counter | None = None) -> list[Document]:
    """The Python standard library's own .py files: present on every machine with Python."""
    skipped = Counter() if skipped is None else skipped
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    docs = [(str(p.relative_to(root)), _usable_text(p.read_bytes(), skipped)) for p in files[:limit]]
    return [(key, text) for key, text in docs if text is not None]


def _glob_files(patterns: list[str]) -> list[Path]:
    files: set[Path] = set()
    for pattern in patterns:
        matches = [Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file()]
        if not matches:
            problem = "matched no files" if glob.has_magic(pattern) else "does not exist"
            raise ConfigError(f"data.paths entry {pattern!r} {problem}")
        files.update(matches)
    return sorted(files)


def text_documents(patterns: list[str], skipped: Counter) -> list[Document]:
    docs = [(str(p), _usable_text(p.read_bytes(), skipped)) for p in _glob_files(patterns)]
    return [(key, text) for key, text in docs if text is not None]


def jsonl_documents(patterns: list[str], field: str, skipped: Counter) -> list[Document]:
    docs = []
    for path in _glob_files(patterns):
        for line_no, raw in enumerate(path.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                skipped["invalid_json"] += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                skipped["missing_text_field"] += 1
                continue
            text = _usable_text(record[field].encode("utf-8", errors="surrogatepass"), skipped)
            if text is not None:
                docs.append((f"{path}:{line_no}", text))
    return docs


def load_documents(cfg: DataConfig) -> tuple[list[Document], dict[str, int]]:
    """The configured documents, and how many records of each kind of problem were skipped."""
    skipped: Counter = Counter()
    if cfg.source == "stdlib":
        docs = stdlib_documents(cfg.max_documents, skipped)
    elif cfg.source == "text":
        docs = text_documents(cfg.paths, skipped)[: cfg.max_documents]
    else:
        docs = jsonl_documents(cfg.paths, cfg.text_field, skipped)[: cfg.max_documents]
    if not docs:
        hint = f" (skipped: {dict(skipped)}; is data.text_field={cfg.text_field!r} right?)" if skipped else ""
        raise ConfigError(f"data.source={cfg.source!r} with data.paths={cfg.paths} gave no usable documents{hint}")
    return docs, dict(skipped)


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split by a hash of the document's key (its path), stable across machines."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest / 2**64 < fraction


def split_documents(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if not is_heldout(d[0], fraction)]
    heldout = [d for d in docs if is_heldout(d[0], fraction)]
    if not train or not heldout:
        raise ConfigError(
            f"data.heldout_fraction={fraction} leaves {len(train)} training and {len(heldout)} held-out documents "
            f"out of {len(docs)}; both need at least one (add documents or change the fraction)"
        )
    return train, heldout


# ---------------------------------------------------------------- packing


@dataclass(frozen=True)
class PackedCorpus:
    """A token stream with per-token document ids, cut into rows of `seq_len`."""

    tokens: np.ndarray  # [n_rows * seq_len + 1] int32, padded with pad_id
    segments: np.ndarray  # same shape; document index + 1, 0 for padding
    seq_len: int
    n_tokens: int  # real (unpadded) tokens

    @property
    def n_rows(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Batch of rows: inputs, targets, loss weights, segment ids and in-document positions."""
        index = np.asarray(index, dtype=np.int64)
        span = index[:, None] * self.seq_len + np.arange(self.seq_len)
        seg, next_seg = self.segments[span], self.segments[span + 1]
        column = np.broadcast_to(np.arange(self.seq_len), seg.shape)
        starts = np.ones_like(seg, dtype=bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        run_start = np.maximum.accumulate(np.where(starts, column, 0), axis=1)
        return {
            "inputs": self.tokens[span],
            "targets": self.tokens[span + 1],
            "weights": ((seg == next_seg) & (seg > 0)).astype(np.float32),
            "segment_ids": seg,
            "positions": (column - run_start).astype(np.int32),
        }


def tokenize(docs: list[Document], tokenizer: Tokenizer) -> list[np.ndarray]:
    texts = [text for _, text in docs]
    if isinstance(tokenizer, BpeTokenizer):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(t) for t in texts]


def pack(token_docs: list[np.ndarray], tokenizer: Tokenizer, seq_len: int) -> PackedCorpus:
    pieces, segs = [], []
    for i, ids in enumerate(token_docs):
        if len(ids) == 0 or ids[-1] != tokenizer.eod_id:  # an HF encoding may end with it already (BERT's [SEP])
            ids = np.append(ids, np.int32(tokenizer.eod_id)).astype(np.int32)
        pieces.append(ids)
        segs.append(np.full(len(ids), i + 1, dtype=np.int32))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    segments = np.concatenate(segs) if segs else np.zeros(0, np.int32)
    n_rows = max(1, -(-len(tokens) // seq_len))
    pad = n_rows * seq_len + 1 - len(tokens)
    return PackedCorpus(
        tokens=np.concatenate([tokens, np.full(pad, tokenizer.pad_id, np.int32)]),
        segments=np.concatenate([segments, np.zeros(pad, np.int32)]),
        seq_len=seq_len,
        n_tokens=len(tokens),
    )


# ---------------------------------------------------------------- batches


Layout = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # an objective's view of packed rows


def _same(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rows


def train_batches(
    corpus: PackedCorpus, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
    layout: Layout = _same,
) -> grain.MapDataset:
    """Endless shuffled batches; element k is this process's share of global batch k.

    Rows are reshuffled every epoch. Global batch k is the same rows whatever the
    process count: each process takes its contiguous slice of it. `layout` is the
    objective's host-side view of the rows (e.g. <cls> first for an encoder).
    """
    rows = grain.MapDataset.range(corpus.n_rows).shuffle(seed=seed).repeat(None)
    return _process_batches(corpus, rows, global_batch, process_index, process_count, layout)


def _process_batches(corpus, rows: grain.MapDataset, global_batch: int, process_index: int, process_count: int,
                     layout: Layout):
    """Cut a stream of row indices into global batches; keep this process's contiguous slice of each (the
    mesh checks guarantee the process count divides the batch)."""
    local = rows.batch(global_batch // process_count, drop_remainder=True)
    return local[process_index::process_count].map(lambda index: layout(corpus.rows(index)))


def eval_batches(
    corpus: PackedCorpus, global_batch: int, n_batches: int, process_index: int = 0, process_count: int = 1,
    layout: Layout = _same,
) -> list[dict[str, np.ndarray]]:
    """The first n_batches global batches of held-out rows, in order (cycling if the split is small)."""
    rows = grain.MapDataset.range(corpus.n_rows).repeat(None)
    ds = _process_batches(corpus, rows, global_batch, process_index, process_count, layout)
    return [ds[k] for k in range(n_batches)]


@dataclass(frozen=True)
class Corpus:
    tokenizer: Tokenizer
    train: PackedCorpus
    heldout: PackedCorpus
    skipped: dict[str, int]  # per-record problems that were skipped, by kind


def load_corpus(cfg: ExperimentConfig) -> Corpus:
    """Tokenizer, documents, split and packing for an experiment; user errors raise ConfigError."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens; "
            f"set model.vocab_size>={tokenizer.vocab_size}"
        )
    docs, skipped = load_documents(cfg.data)
    train_docs, heldout_docs = split_documents(docs, cfg.data.heldout_fraction)
    seq = cfg.data.seq_len
    return Corpus(
        tokenizer,
        pack(tokenize(train_docs, tokenizer), tokenizer, seq),
        pack(tokenize(heldout_docs, tokenizer), tokenizer, seq),
        skipped,
    )


def unigram_bits_per_byte(train: PackedCorpus, batches: list[dict[str, np.ndarray]], token_bytes: np.ndarray) -> float:
    """Bits per byte of a unigram model fitted on the training stream (add-one smoothing), scored on
    the weighted targets of `batches`: the baseline a language model must beat on the same tokens.
    """
    counts = np.bincount(train.tokens[: train.n_tokens], minlength=len(token_bytes)).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
    weights = np.concatenate([b["weights"].reshape(-1) for b in batches])
    return float(-(logp[targets] * weights).sum() / (token_bytes[targets] * weights).sum())

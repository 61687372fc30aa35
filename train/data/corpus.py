"""An experiment's data: its prepared sources (documents named in the config are prepared on first use into
a cache), their tokenizer checked against the run's, and grain datasets of global batches.

There is one path: whatever the config names, training, evaluation, distillation dumps and the unigram
baseline read prepared shards through SplitStream.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from train.config import ConfigError, DataConfig, ExperimentConfig
from train.data.mixture import Mixture
from train.data.prepare import DEFAULT_SHARD_CHARS, NoDocuments, plan_of, prepare_plan, tokenizer_identity
from train.data.reader import PreparedData
from train.data.sources import FileSource, Source
from train.tokenizer import Tokenizer, load_tokenizer

ENDLESS = 2**62  # batches of a training dataset: it never runs out


def cache_root() -> Path:
    return Path(os.environ.get("TESSERA_DATA_CACHE") or Path.home() / ".cache" / "tessera" / "data")


def prepared_on_first_use(source: Source, tokenizer: str, heldout_fraction: float) -> Path:
    """The cache directory holding `source` prepared with `tokenizer`, preparing it if it is not there yet.
    Named by the preparation's plan (everything the shards and the manifest depend on); concurrent processes
    preparing it write the same bytes."""
    plan = plan_of(source, tokenizer, heldout_fraction, DEFAULT_SHARD_CHARS)
    out = cache_root() / hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:20]
    prepare_plan(source, plan, out)
    return out


def data_locations(data: DataConfig) -> list[tuple[str, float]]:
    """(prepared directory, weight) of every source of the config, preparing raw documents on first use."""
    if data.mixture is not None:
        return [(m.source, m.weight) for m in data.mixture]
    if data.raw:
        try:
            location = prepared_on_first_use(FileSource.of(data), data.tokenizer, data.heldout_fraction)
        except NoDocuments as e:
            hint = f"; is data.text_field={data.text_field!r} right?" if data.source in ("jsonl", "parquet") else ""
            raise ConfigError(f"data.source={data.source!r} with data.paths={data.paths} gave no usable documents "
                              f"(skipped: {e.skipped or 'none'}{hint})") from None
        return [(str(location), 1.0)]
    return [(data.source, 1.0)]


def _check_split(prepared: PreparedData, fraction: float) -> None:
    train, heldout = (prepared.split(s)["documents"] for s in ("train", "heldout"))
    if not train or not heldout:
        raise ConfigError(
            f"data.heldout_fraction={fraction} leaves {train} training and {heldout} held-out documents out of "
            f"{train + heldout}; both need at least one (add documents or change the fraction)"
        )


def open_prepared(location: str, tokenizer_name: str, key: str = "data.source", ours: str | None = None) -> PreparedData:
    """A prepared directory, refused when it was tokenized by another tokenizer than the run's (`ours`: that
    tokenizer's identity, if the caller has it already)."""
    data = PreparedData(location)
    theirs, ours = data.tokenizer["identity"], ours or tokenizer_identity(tokenizer_name)
    if theirs != ours:
        raise ConfigError(
            f"{key}={location} was prepared with tokenizer {data.tokenizer['name']!r} ({theirs[:19]}) but "
            f"data.tokenizer={tokenizer_name!r} ({ours[:19]}); prepare it with this tokenizer or set "
            f"data.tokenizer={data.tokenizer['name']}"
        )
    return data


@dataclass(frozen=True)
class Corpus:
    tokenizer: Tokenizer
    train: Mixture
    heldout: Mixture
    sources: list[PreparedData]
    weights: list[float]

    @property
    def skipped(self) -> dict[str, int]:
        """Records skipped at preparation, by cause, over all sources."""
        total: dict[str, int] = {}
        for source in self.sources:
            for cause, n in source.manifest["skipped"].items():
                total[cause] = total.get(cause, 0) + n
        return total

    def digest(self) -> np.ndarray:
        """The sources' manifests hashed (as uint32 words): processes that compare equal read the same rows."""
        # What defines the rows (not where the inputs lay on each host): the shards' counts and sizes, the tokenizer.
        text = "".join(json.dumps([s.manifest["splits"], s.tokenizer["identity"]], sort_keys=True) for s in self.sources)
        return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint32)

    @property
    def source_names(self) -> list[str]:
        """A short name per source (its directory's name, numbered where two share one)."""
        names = [Path(str(s.path).rstrip("/")).name for s in self.sources]
        return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    def unigram_counts(self) -> np.ndarray:
        """Token frequencies of the training stream as the mixture draws it (each source's by its weight)."""
        vocab = self.tokenizer.vocab_size
        mixed = np.zeros(vocab, np.float64)
        for source, weight in zip(self.sources, self.weights, strict=True):
            counts = source.token_counts()[:vocab].astype(np.float64)
            mixed += weight / sum(self.weights) * counts / max(counts.sum(), 1.0)
        return mixed * self.train.n_tokens


def check_same_data(corpus: Corpus) -> None:
    """Every process defines the global rows from its own manifests (a corpus named in the config is prepared
    on each host): they must be the same data, or the processes would train on unrelated rows."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    try:
        multihost_utils.assert_equal(corpus.digest(), "")
    except AssertionError:
        where = ", ".join(str(s.path) for s in corpus.sources)
        raise ConfigError(f"the processes prepared different data from the same config ({where} differ between "
                          "hosts); prepare it once with `tessera data prepare --out gs://...` and train on that") \
            from None


def load_corpus(cfg: ExperimentConfig) -> Corpus:
    """Tokenizer, prepared sources and their row streams for an experiment; user errors raise ConfigError."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens; "
            f"set model.vocab_size>={tokenizer.vocab_size}"
        )
    locations = data_locations(cfg.data)
    key = lambda i: "data.source" if cfg.data.mixture is None else f"data.mixture[{i}].source"  # noqa: E731
    ours = tokenizer_identity(cfg.data.tokenizer)
    sources = [open_prepared(loc, cfg.data.tokenizer, key(i), ours) for i, (loc, _) in enumerate(locations)]
    if cfg.data.raw:  # prepared here from the config's documents: its held-out fraction must leave both sides
        _check_split(sources[0], cfg.data.heldout_fraction)
    weights = [w for _, w in locations]
    seq, seed = cfg.data.seq_len, cfg.run.seed
    packings = {s.packing for s in sources}
    if "pairs" in packings and len(packings) > 1:
        raise ConfigError("data.mixture mixes preference pairs with other data; a batch holds pairs or rows, not both")
    train = Mixture([s.stream("train", seq, seed) for s in sources], weights, seed)
    # Evaluation mixes the sources that hold documents out (a small source may have none).
    held = [(s, w) for s, w in zip(sources, weights, strict=True) if s.split("heldout")["documents"]]
    if not held:
        names = ", ".join(str(s.path) for s in sources)
        raise ConfigError(f"{names} hold no held-out documents to evaluate on; prepare with a larger "
                          f"--heldout-fraction")
    heldout = Mixture([s.stream("heldout", seq, None) for s, _ in held], [w for _, w in held], seed)
    return Corpus(tokenizer, train, heldout, sources, weights)


# ---------------------------------------------------------------- batches


def _same(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return rows


def train_batches(rows, global_batch: int, process_index: int = 0, process_count: int = 1,
                  layout=_same) -> grain.MapDataset:
    """Endless batches; element k is this process's contiguous share of global batch k (rows [kB, (k+1)B)),
    so global batch k is the same rows whatever the process count. `layout` is the objective's host-side
    view of the rows (e.g. <cls> first for an encoder)."""
    local = global_batch // process_count

    def batch(k: int) -> dict[str, np.ndarray]:
        return layout(rows.rows(k * global_batch + process_index * local + np.arange(local)))

    return grain.MapDataset.range(ENDLESS).map(batch)


def batch_iterator(dataset: grain.MapDataset, prefetch: int):
    """A checkpointable iterator (get_state/set_state: the position after the last batch returned, never a
    prefetched one) reading `prefetch` batches ahead in background threads."""
    if prefetch == 0:
        return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=min(prefetch, 4), prefetch_buffer_size=prefetch)))


def eval_batches(rows, global_batch: int, n_batches: int, process_index: int = 0, process_count: int = 1,
                 layout=_same) -> list[dict[str, np.ndarray]]:
    """The first n_batches global batches of held-out rows, in order (cycling if the split is small)."""
    ds = train_batches(rows, global_batch, process_index, process_count, layout)
    return [ds[k] for k in range(n_batches)]


def unigram_bits_per_byte(counts: np.ndarray, batches: list[dict[str, np.ndarray]], token_bytes: np.ndarray) -> float:
    """Bits per byte of a unigram model fitted on the training stream's token counts (add-one smoothing),
    scored on the weighted targets of `batches`: the baseline a language model must beat on the same tokens."""
    counts = np.asarray(counts, np.float64)[: len(token_bytes)] + 1.0
    logp = np.log2(counts / counts.sum())
    targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
    weights = np.concatenate([b["weights"].reshape(-1) for b in batches])
    return float(-(logp[targets] * weights).sum() / (token_bytes[targets] * weights).sum())

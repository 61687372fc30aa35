"""Scoring a trained model on text: cross entropy, perplexity, bits per token, character and
byte, and a contamination check.

What is scored: documents are tokenized, each followed by the end-of-document token,
packed into rows of data.seq_len, and every token whose predecessor is in the same
document is predicted, so a document's first token is not (it has no context) and its
end-of-document token is. A row sees only itself: a document longer than a row is
scored in windows of seq_len tokens, each from a fresh context. Bytes and characters
are those of exactly the predicted tokens (the end-of-document token has none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.data.prepare import tokenized
from train.pairs import pair_terms
from train.data.reader import packed_rows
from train.metrics import LN2
from train.objectives import Objective
from train.objectives.cross_entropy import token_nll
from train.objectives.next_token import NextToken
from train.sharding import Rules, activation_rules, batch_sharding, replicated
from train.tokenizer import Tokenizer

CONTAMINATION_RATIO = 0.5  # flagged when a text's bits per byte is below half the held-out figure
EVAL_SEED = 12345  # masked-token evaluation masks the same positions at every evaluation
LOG_FLOAT_MAX = math.log(np.finfo(np.float64).max)  # exp() of more than this overflows: perplexity is inf


@dataclass(frozen=True)
class Sums:
    """What scoring adds up over the predicted tokens."""

    nll: float  # nats
    tokens: float
    correct: float  # top-1 predictions equal to the target
    bytes: float
    chars: float

    def __add__(self, other: Sums) -> Sums:
        return Sums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def metrics(s: Sums) -> dict[str, float]:
    """cross_entropy (nats/token), perplexity = exp(cross_entropy) (inf past float range, never clamped),
    bits per token, character and byte, top-1 accuracy, and the token count."""
    ce = s.nll / max(s.tokens, 1.0)
    return {
        "cross_entropy": ce,
        "perplexity": math.exp(ce) if ce < LOG_FLOAT_MAX else math.inf,
        "bits_per_token": ce / LN2,
        "bits_per_char": s.nll / LN2 / max(s.chars, 1.0),
        "bits_per_byte": s.nll / LN2 / max(s.bytes, 1.0),
        "accuracy": s.correct / max(s.tokens, 1.0),
        "tokens": int(s.tokens),
    }


class Scorer:
    """The one evaluator: per-row sums of a model's predictions on packed rows, on a mesh (rows over the
    batch axes). Training evaluates with it every train.eval_every steps, `tessera eval` on any text.

    The objective prepares each batch as training does (masked-token models: with a fixed key, so every
    evaluation masks the same positions).
    """

    def __init__(self, graphdef: nnx.GraphDef, param_shardings, tokenizer: Tokenizer, mesh, rules: Rules,
                 batch_size: int, objective: Objective = NextToken()):
        self.tokenizer, self.batch_size, self.mesh, self.objective = tokenizer, batch_size, mesh, objective
        token_bytes, token_chars = jnp.asarray(tokenizer.token_bytes), jnp.asarray(tokenizer.token_chars)

        def row_sums(params, batch):
            batch = objective.prepare(batch, jax.random.key(EVAL_SEED))
            with activation_rules(mesh, rules):
                model = nnx.merge(graphdef, params)
                logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
            nll, _ = token_nll(logits, batch["targets"])
            w, t = batch["weights"], batch["targets"]
            correct = (jnp.argmax(logits, axis=-1) == t) * w
            # Targets past the tokenizer's table (a model vocabulary rounded up) are never real text.
            per_token = lambda table: jnp.take(table, t, mode="fill", fill_value=0) * w  # noqa: E731
            return jnp.stack([jnp.sum(nll * w, 1), jnp.sum(w, 1), jnp.sum(correct, 1),
                              jnp.sum(per_token(token_bytes), 1), jnp.sum(per_token(token_chars), 1)], axis=1)

        self.rows_sharding = batch_sharding(mesh, rules)
        self._row_sums = jax.jit(row_sums, in_shardings=(param_shardings, self.rows_sharding),
                                 out_shardings=replicated(mesh))

    def row_sums(self, params, batch) -> np.ndarray:
        """[rows, 5] sums (nll, tokens, correct, bytes, chars) of one batch (host rows or device arrays)."""
        return np.asarray(self._row_sums(params, batch), np.float64)

    def batches(self, params, batches) -> Sums:
        """The sums over whole batches (e.g. training's held-out batches, already on the mesh)."""
        return Sums(*np.sum([self.row_sums(params, b).sum(axis=0) for b in batches], axis=0).tolist())

    def rows(self, params, corpus, max_rows: int | None = None) -> np.ndarray:
        """[rows, 5] sums for every row of `corpus` (or its first max_rows), batch_size rows at a time."""
        n = corpus.n_rows if max_rows is None else min(corpus.n_rows, max_rows)
        out = []
        for first in range(0, n, self.batch_size):
            index = np.arange(first, first + self.batch_size)
            batch = self.objective.rows(corpus.rows(np.minimum(index, n - 1)))  # laid out as the objective trains
            batch["weights"] = batch["weights"] * (index < n)[:, None]  # the last batch's filler rows count nothing
            out.append(self.row_sums(params, batch)[: max(0, min(self.batch_size, n - first))])
        return np.concatenate(out) if out else np.zeros((0, len(fields(Sums))))

    def corpus(self, params, corpus, max_rows: int | None = None) -> Sums:
        return Sums(*self.rows(params, corpus, max_rows).sum(axis=0).tolist())

    def documents(self, params, docs: list[tuple[str, str]], seq_len: int) -> list[Sums]:
        """Each document scored alone (in rows of its own), as it would be packed for training."""
        return [self.corpus(params, OneDocument(ids, seq_len, self.tokenizer.pad_id))
                for ids in tokenized(self.tokenizer, [text for _, text in docs])]


class PairScorer:
    """Held-out preference pairs scored by a pairwise objective (a reward model's, or preference finetuning's
    against its frozen `reference` parameters, if it has them): the mean loss and the objective's metrics
    (accuracy, margins) over the pairs."""

    def __init__(self, objective, graphdef: nnx.GraphDef, param_shardings, mesh, rules: Rules, reference=None):
        self.reference = () if reference is None else (reference,)

        def per_pair(params, batch, *reference):
            with activation_rules(mesh, rules):
                loss, stats, _ = pair_terms(objective, graphdef, params, batch, *reference)
            return {"loss": loss, **stats}  # per pair: the caller leaves out a last batch's filler pairs

        shardings = (param_shardings, batch_sharding(mesh, rules), *(jax.tree.map(lambda a: a.sharding, r)
                                                                      for r in self.reference))
        self._per_pair = jax.jit(per_pair, in_shardings=shardings, out_shardings=replicated(mesh))

    def batches(self, params, batches, count: int | None = None) -> dict[str, float]:
        """Means over the first `count` pairs of `batches` (on the mesh or host rows; default all of them: a
        small split's batches repeat its pairs to fill the last one), and the count of pairs."""
        per_pair = [jax.device_get(self._per_pair(params, batch, *self.reference)) for batch in batches]
        values = {k: np.concatenate([p[k] for p in per_pair])[:count] for k in per_pair[0]}
        return {**{k: float(np.mean(v)) for k, v in values.items()}, "pairs": len(values["loss"])}


@dataclass(frozen=True)
class OneDocument:
    """One tokenized document (ending with <eod>) as rows of `seq_len`, the last one padded."""

    tokens: np.ndarray
    seq_len: int
    pad_id: int

    @property
    def n_rows(self) -> int:
        return -(-len(self.tokens) // self.seq_len)

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        padded = np.full(self.n_rows * self.seq_len + 1, self.pad_id, np.int32)
        padded[: len(self.tokens)] = self.tokens
        segments = (np.arange(len(padded)) < len(self.tokens)).astype(np.int32)
        span = np.asarray(index)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        return packed_rows(padded[span], segments[span])


@dataclass(frozen=True)
class Contamination:
    """Per-document and overall bits per byte of candidate texts against held-out and training text."""

    heldout_bits_per_byte: float
    train_bits_per_byte: float
    threshold: float
    documents: list[dict]
    overall: dict

    def as_dict(self) -> dict:
        return {
            "heldout_bits_per_byte": self.heldout_bits_per_byte,
            "train_bits_per_byte": self.train_bits_per_byte,
            "train_to_heldout_ratio": self.train_bits_per_byte / self.heldout_bits_per_byte,
            "threshold": self.threshold,
            "rule": f"contaminated when bits_per_byte / heldout_bits_per_byte < {self.threshold}",
            "documents": self.documents,
            "overall": self.overall,
        }


def contamination(
    candidates: list[tuple[str, Sums]], heldout: Sums, train: Sums, threshold: float = CONTAMINATION_RATIO
) -> Contamination:
    """Verdict per candidate and overall: a text the model predicts far better than unseen text
    (ratio of bits per byte below `threshold`) was probably in its training data."""
    held = metrics(heldout)["bits_per_byte"]

    def verdict(name: str, s: Sums) -> dict:
        bpb = metrics(s)["bits_per_byte"]
        ratio = bpb / held
        return {"name": name, "bits_per_byte": bpb, "ratio": ratio, "bytes": int(s.bytes),
                "contaminated": bool(ratio < threshold)}

    total = Sums(0.0, 0.0, 0.0, 0.0, 0.0)
    for _, s in candidates:
        total = total + s
    return Contamination(
        held, metrics(train)["bits_per_byte"], threshold,
        [verdict(name, s) for name, s in candidates], verdict("all candidates", total),
    )

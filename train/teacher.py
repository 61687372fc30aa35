"""The teacher of a distillation (the loss is train/objectives/distillation.py).

The teacher runs in one of two ways:
- online: its parameters, restored from its run directory onto the student's mesh by the
  same rules, enter the jitted step as an argument of their own, so they never get
  gradients or optimizer state;
- offline: `dump_teacher_topk` runs it once over the training batches and writes each
  position's top-K log-probabilities (at T) beside the batch itself; the student then
  trains from those files (`TopKBatches`) without the teacher in memory.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from train.data import corpus as data_lib
from train import storage
from train.config import ConfigError, ExperimentConfig, OptionError, first_line
from train.inference import TrainedRun, load_trained, run_config
from train.objectives.distillation import softened_log_probs
from train.sharding import activation_rules, batch_sharding
from train.tokenizer import Tokenizer, TokenizerError, load_tokenizer

TOPK_KEYS = ("teacher_logprobs", "teacher_ids")
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")
BATCHES_PER_SHARD = 64
TOPK_POSITION = "teacher_topk_next_batch"  # the data position a checkpoint records for the top-K batches


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Same ids for the same byte strings, special tokens included."""
    return a.vocab_size == b.vocab_size and a.special == b.special and a.token_byte_strings == b.token_byte_strings


def check_teacher(cfg: ExperimentConfig, teacher_cfg: ExperimentConfig, tokenizer: Tokenizer) -> None:
    """The teacher must speak the student's vocabulary, token for token, and predict the same thing."""
    where = cfg.distill.teacher
    try:
        teacher_tokenizer = load_tokenizer(teacher_cfg.data.tokenizer)
    except TokenizerError as e:
        raise ConfigError(f"the teacher {where}: {e}") from None
    if not same_tokenizer(tokenizer, teacher_tokenizer):
        raise ConfigError(
            f"the teacher {where} uses tokenizer {teacher_cfg.data.tokenizer!r} ({teacher_tokenizer.vocab_size} tokens) "
            f"and the student {cfg.data.tokenizer!r} ({tokenizer.vocab_size} tokens); distillation compares their "
            "distributions token by token, so both must use the same tokenizer"
        )
    if teacher_cfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"the teacher's model.vocab_size={teacher_cfg.model.vocab_size} differs from the student's "
            f"model.vocab_size={cfg.model.vocab_size}; set the student's to the teacher's"
        )
    if teacher_cfg.model.max_seq_len < cfg.data.seq_len:
        raise ConfigError(
            f"the teacher's model.max_seq_len={teacher_cfg.model.max_seq_len} is shorter than the student's "
            f"data.seq_len={cfg.data.seq_len}; the teacher cannot score rows that long"
        )
    if teacher_cfg.objective != cfg.objective:
        raise ConfigError(
            f"the teacher was trained for {teacher_cfg.objective} and the student trains for {cfg.objective}; "
            "a teacher can only teach the prediction it makes"
        )


def load_teacher(cfg: ExperimentConfig, mesh, rules, tokenizer: Tokenizer) -> TrainedRun:
    """The teacher's latest checkpoint on the student's mesh, checked against the student first."""
    teacher_dir = storage.path(cfg.distill.teacher)
    teacher_cfg = run_config(teacher_dir)
    check_teacher(cfg, teacher_cfg, tokenizer)
    if teacher_cfg.model.weight_quant is not None:
        raise ConfigError(f"the teacher {teacher_dir} is weight-quantized for serving; use its float run directory")
    return load_trained(teacher_dir, mesh, rules, teacher_cfg)


# ---------------------------------------------------------------- offline: the teacher's top K on disk


class TopKMeta(BaseModel):
    """meta.json of a top-K dump: what the batches were written with."""

    model_config = ConfigDict(extra="forbid")

    teacher: str
    k: int = Field(ge=1)
    temperature: float = Field(gt=0)
    batches: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    tokenizer: str
    batches_per_shard: int = Field(ge=1)


def read_meta(directory: Path) -> dict:
    """The dump's meta.json, checked field by field; ConfigError naming the file for anything else."""
    path = directory / "meta.json"
    try:
        return TopKMeta.model_validate(json.loads(path.read_bytes())).model_dump()
    except (ValueError, ValidationError) as e:  # JSON or UTF-8 errors are ValueErrors
        raise ConfigError(f"{path} is not a top-K dump's meta.json ({first_line(e)}); dump the teacher again") from None


def dump_meta(cfg: ExperimentConfig, tokenizer: Tokenizer, k: int, batches: int) -> dict:
    """meta.json's fields for a dump of `batches` batches (the schema read_meta checks them against)."""
    return TopKMeta(
        teacher=cfg.distill.teacher if storage.is_remote(cfg.distill.teacher) else str(Path(cfg.distill.teacher).resolve()), k=k, temperature=cfg.distill.temperature,
        batches=batches, batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
        vocab_size=tokenizer.vocab_size, tokenizer=cfg.data.tokenizer, batches_per_shard=BATCHES_PER_SHARD,
    ).model_dump()


def dump_teacher_topk(cfg: ExperimentConfig, mesh, rules, k: int, out: str | Path, report=print) -> Path:
    """Run the teacher over the first train.steps training batches (the order the student would see
    them in) and write each batch with the teacher's top-K log-probs at T to OUT/shard-NNNNN.npz."""
    if cfg.objective != "next_token":
        raise OptionError("{dump_teacher_topk} needs a next-token student: masked-token inputs are drawn inside each step")
    if not 1 <= k <= cfg.model.vocab_size:
        raise OptionError("{dump_teacher_topk} {k} must be between 1 and the vocabulary size {vocab}", k=k,
                          vocab=cfg.model.vocab_size)
    out = storage.local_only(out, "the teacher's top-K dump")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OptionError("{out} {path} is not an empty directory; choose a new one for the teacher's top-K files", path=out)
    corpus = data_lib.load_corpus(cfg)
    teacher = load_teacher(cfg, mesh, rules, corpus.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    temperature, graphdef = cfg.distill.temperature, teacher.model.graphdef
    sharding = batch_sharding(mesh, rules)

    @jax.jit
    def topk(params, batch):
        with activation_rules(mesh, rules):
            logits, _ = nnx.merge(graphdef, params).forward(batch["inputs"], batch["positions"], batch["segment_ids"])
        values, ids = jax.lax.top_k(softened_log_probs(logits, temperature), k)
        return values, ids.astype(jnp.int32)

    batches = data_lib.batch_iterator(data_lib.train_batches(corpus.train, cfg.data.batch_size), cfg.data.prefetch)
    steps, start = cfg.train.steps, time.perf_counter()
    for first in range(0, steps, BATCHES_PER_SHARD):
        shard = {key: [] for key in (*BATCH_KEYS, *TOPK_KEYS)}
        for _ in range(min(BATCHES_PER_SHARD, steps - first)):
            rows = next(batches)
            values, ids = topk(teacher.params, {key: jax.device_put(v, sharding) for key, v in rows.items()})
            for key in BATCH_KEYS:
                shard[key].append(rows[key])
            shard["teacher_logprobs"].append(np.asarray(values))
            shard["teacher_ids"].append(np.asarray(ids))
        path = out / f"shard-{first // BATCHES_PER_SHARD:05d}.npz"
        np.savez(path.with_suffix(".tmp.npz"), **{key: np.stack(v) for key, v in shard.items()})
        path.with_suffix(".tmp.npz").rename(path)  # a shard is either whole or absent
        report(f"wrote {path.name}: batches {first}..{first + len(shard['inputs']) - 1}")
    (out / "meta.json").write_text(json.dumps(dump_meta(cfg, corpus.tokenizer, k, steps), indent=2) + "\n")
    report(f"teacher top-{k} log-probs of {steps} batches in {out} ({time.perf_counter() - start:.1f}s)")
    return out


class TopKBatches:
    """The dumped batches in order, each process taking its contiguous share of the rows; its
    position is checkpointed like the data pipeline's (get_state / set_state)."""

    def __init__(self, directory: str | Path, process_index: int, process_count: int):
        self.dir = Path(directory)
        self.meta = read_meta(self.dir)
        self.process_index, self.process_count = process_index, process_count
        self.next_batch, self._shard_index, self._shard = 0, None, None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.next_batch >= self.meta["batches"]:
            raise StopIteration
        index, offset = divmod(self.next_batch, self.meta["batches_per_shard"])
        if index != self._shard_index:
            self._shard, self._shard_index = self._read_shard(index), index
        rows = self.meta["batch_size"] // self.process_count
        share = slice(self.process_index * rows, (self.process_index + 1) * rows)
        self.next_batch += 1
        return {key: value[offset][share] for key, value in self._shard.items()}

    def _read_shard(self, index: int) -> dict[str, np.ndarray]:
        path = self.dir / f"shard-{index:05d}.npz"
        try:
            with np.load(path) as f:
                shard = {key: f[key] for key in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ConfigError(f"{path} cannot be read ({first_line(e)}); dump the teacher's top K again") from None
        missing = set(BATCH_KEYS + TOPK_KEYS) - set(shard)
        if missing:
            raise ConfigError(f"{path} lacks {', '.join(sorted(missing))}; dump the teacher's top K again")
        return shard

    def get_state(self) -> dict:
        return {TOPK_POSITION: self.next_batch}

    def set_state(self, state: dict) -> None:
        self.next_batch = int(state[TOPK_POSITION])


def open_topk(cfg: ExperimentConfig, tokenizer: Tokenizer, process_index: int, process_count: int) -> TopKBatches:
    """The dump named by distill.teacher_topk, checked against the student's config."""
    directory = storage.local_only(cfg.distill.teacher_topk, "distill.teacher_topk=")
    if not (directory / "meta.json").is_file():
        raise ConfigError(f"distill.teacher_topk={directory} has no meta.json; it is not a dump of a teacher's top K "
                          "(write one with `tessera distill`'s teacher top-K dump)")
    source = TopKBatches(directory, process_index, process_count)
    meta = source.meta
    expected = {"temperature": cfg.distill.temperature, "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
                "vocab_size": tokenizer.vocab_size, "tokenizer": cfg.data.tokenizer}
    for key, value in expected.items():
        if meta[key] != value:
            raise ConfigError(f"the top-K files in {directory} were written with {key}={meta[key]}, but this "
                              f"distillation has {key}={value}; dump them again with this config")
    if meta["batches"] < cfg.train.steps:
        raise ConfigError(f"the top-K files in {directory} hold {meta['batches']} batches and train.steps="
                          f"{cfg.train.steps} needs one per step; dump at least that many")
    return source

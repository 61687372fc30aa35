"""The training loop: build (or resume) the sharded state, step, log, evaluate, checkpoint.

It receives a Mesh and the logical-axis rules from the caller and never builds either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jax
import yaml
from jax.sharding import Mesh

from model.flops import param_counts, train_flops_per_token
from train import data as data_lib
from train.checkpoint import Checkpointer
from train.config import ConfigError, ExperimentConfig, dump_config
from train.metrics import ConsoleReporter, MetricsWriter, eval_summary
from train.program import build_program
from train.sharding import Rules
from train.tokenizer import Tokenizer, TokenizerError, load_tokenizer


@dataclass(frozen=True)
class Corpus:
    tokenizer: Tokenizer
    train: data_lib.PackedCorpus
    heldout: data_lib.PackedCorpus


def load_corpus(cfg: ExperimentConfig) -> Corpus:
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens; "
            f"set model.vocab_size>={tokenizer.vocab_size}"
        )
    train_docs, heldout_docs = data_lib.split_documents(data_lib.load_documents(cfg.data), cfg.data.heldout_fraction)
    seq = cfg.data.seq_len
    return Corpus(
        tokenizer,
        data_lib.pack(data_lib.tokenize(train_docs, tokenizer), tokenizer, seq),
        data_lib.pack(data_lib.tokenize(heldout_docs, tokenizer), tokenizer, seq),
    )


def prepare_run_dir(cfg: ExperimentConfig, is_main: bool) -> Path:
    """Create RUN_DIR and write config.yaml; refuse to resume a run whose model differs."""
    run_dir = Path(cfg.run.dir)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        previous = yaml.safe_load(saved.read_text()) or {}
        if previous.get("model") != cfg.model.model_dump(mode="json"):
            raise ConfigError(
                f"run.dir={cfg.run.dir} holds a run of a different model; its checkpoints cannot be resumed "
                "with this model config (use a new run.dir)"
            )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(dump_config(cfg))
    return run_dir


class Trainer:
    """One experiment on one mesh: state (fresh or restored), data, compiled steps, outputs."""

    def __init__(self, cfg: ExperimentConfig, mesh: Mesh, rules: Rules, reporter: ConsoleReporter | None = None):
        self.cfg = cfg
        is_main = jax.process_index() == 0
        self.run_dir = prepare_run_dir(cfg, is_main)
        self.reporter = reporter or ConsoleReporter(cfg.train.steps, 0, enabled=is_main)
        self.corpus = load_corpus(cfg)

        self.program = program = build_program(cfg, mesh, rules)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint)

        latest = self.checkpointer.latest_step()
        if latest is None:
            self.state, data_state, self.start = program.init_state(), None, 0
        else:
            self.state, data_state = self.checkpointer.restore(latest, program.abstract_state())
            self.start = latest
            self.reporter.log(f"resumed from {self.run_dir / 'checkpoints'} at step {latest}")

        self.iterator = iter(
            data_lib.train_batches(
                self.corpus.train, cfg.data.batch_size, cfg.run.seed, jax.process_index(), jax.process_count()
            ).to_iter_dataset()
        )
        if data_state is not None:
            self.iterator.set_state(data_state)

        self.eval_step = program.eval_step(self.corpus.tokenizer.token_bytes)
        self.eval_data = [
            program.device_batch(b)
            for b in data_lib.eval_batches(
                self.corpus.heldout, cfg.data.batch_size, cfg.train.eval_batches, jax.process_index(), jax.process_count()
            )
        ]
        self.writer = MetricsWriter(self.run_dir, enabled=is_main)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.flops_per_step = train_flops_per_token(cfg.model, cfg.data.seq_len) * self.tokens_per_step
        self.reporter.log(
            f"model {cfg.model.name}: {param_counts(cfg.model).total:,} parameters | mesh {dict(mesh.shape)} | "
            f"{self.corpus.train.n_tokens:,} training tokens, {self.corpus.heldout.n_tokens:,} held-out"
        )

    def next_batch(self) -> dict[str, jax.Array]:
        return self.program.device_batch(next(self.iterator))

    def evaluate(self) -> dict[str, float]:
        sums = [self.eval_step(self.state["params"], b) for b in self.eval_data]
        total = {k: float(sum(s[k] for s in sums)) for k in sums[0]}
        return eval_summary(total["nll"], total["tokens"], total["bytes"])

    def _log_train(self, step: int, metrics, step_time: float) -> None:
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "target_tokens"}
        values.update(
            step_time=step_time,
            tokens_per_sec=self.tokens_per_step / step_time,
            model_tflops_per_sec=self.flops_per_step / step_time / 1e12,
            tokens_seen=step * self.tokens_per_step,
        )
        self.writer.write(step, values)
        self.reporter.step(step, values)

    def _log_eval(self, step: int) -> dict[str, float]:
        result = self.evaluate()
        self.writer.write(step, result)
        self.reporter.log(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def run(self) -> dict:
        """Steps start+1..train.steps; logs, evaluates and checkpoints on schedule; returns the last eval."""
        cfg = self.cfg
        try:
            if self.start >= cfg.train.steps:
                self.reporter.log(f"run already complete at step {self.start}")
                final_eval = self.evaluate()
            else:
                final_eval = self._loop()
        finally:
            self.checkpointer.wait()
            self.checkpointer.close()
            self.writer.close()
            self.reporter.close()
        corpus = self.corpus
        baseline = data_lib.unigram_bits_per_byte(corpus.train, corpus.heldout, corpus.tokenizer.token_bytes)
        return {**final_eval, "unigram_bits_per_byte": baseline, "steps": cfg.train.steps, "run_dir": str(self.run_dir)}

    def _loop(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = self.next_batch()
        train_step = self.program.train_step.lower(self.state, batch).compile()
        self.reporter.log(f"compiled the train step in {time.perf_counter() - t0:.1f}s")
        final_eval: dict[str, float] = {}
        last_time, last_step = time.perf_counter(), self.start
        for step in range(self.start + 1, cfg.train.steps + 1):
            self.state, metrics = train_step(self.state, batch)
            done = step == cfg.train.steps
            if step % cfg.train.log_every == 0 or done:
                now = time.perf_counter()
                self._log_train(step, metrics, (now - last_time) / (step - last_step))
                last_time, last_step = now, step
            else:
                self.reporter.step(step)
            if step % cfg.train.eval_every == 0 or done:
                eval_start = time.perf_counter()
                final_eval = self._log_eval(step)
                last_time += time.perf_counter() - eval_start  # evaluation stays out of the step time
            # The iterator already points past `batch`: a resume continues with the next one.
            self.checkpointer.save(step, self.state, self.iterator.get_state(), force=done)
            if not done:
                batch = self.next_batch()
        return final_eval


def train(cfg: ExperimentConfig, mesh: Mesh, rules: Rules, reporter: ConsoleReporter | None = None) -> dict:
    """Run (or resume) the experiment; returns the final eval metrics and run facts."""
    return Trainer(cfg, mesh, rules, reporter).run()

"""The training loop: build (or resume) the sharded state, step, log, evaluate, checkpoint.

It receives a Mesh and the logical-axis rules from the caller and never builds either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import Mesh

from model.flops import param_counts, train_flops_per_token
from train import data as data_lib
from train.checkpoint import Checkpointer
from train.config import ConfigError, ExperimentConfig, dump_config
from train.metrics import ConsoleReporter, MetricsWriter, eval_summary
from train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from train.sharding import Rules, batch_sharding
from train.state import abstract_model, abstract_state, init_state, state_shardings
from train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step
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


def to_device(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Each process hands over its local rows; together they form the global batch."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def train(cfg: ExperimentConfig, mesh: Mesh, rules: Rules, reporter: ConsoleReporter | None = None) -> dict:
    """Run (or resume) the experiment; returns the final eval metrics and run facts."""
    is_main = jax.process_index() == 0
    run_dir = prepare_run_dir(cfg, is_main)
    reporter = reporter or ConsoleReporter(cfg.train.steps, 0, enabled=is_main)
    corpus = load_corpus(cfg)

    model = abstract_model(cfg.model)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, decay_mask(model.logical_specs))
    shardings = state_shardings(model, tx, mesh, rules)
    batch_shard = batch_sharding(mesh, rules)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)

    latest = checkpointer.latest_step()
    if latest is None:
        state = init_state(cfg.model, model, tx, shardings, cfg.run.seed)
        data_state = None
        start = 0
    else:
        state, data_state = checkpointer.restore(latest, abstract_state(model, tx, shardings))
        start = latest
        reporter.log(f"resumed from {run_dir / 'checkpoints'} at step {latest}")

    batches = data_lib.train_batches(
        corpus.train, cfg.data.batch_size, cfg.run.seed, jax.process_index(), jax.process_count()
    ).to_iter_dataset()
    iterator = iter(batches)
    if data_state is not None:
        iterator.set_state(data_state)

    batch_axes = batch_shard.spec[0]
    step_fn = make_train_step(
        model.graphdef, tx, schedule, microbatches=cfg.train.microbatches, z_loss=cfg.train.z_loss,
        mesh=mesh, batch_axes=batch_axes,
    )
    train_step = jit_train_step(step_fn, shardings, batch_shard, mesh)
    token_bytes = jnp.asarray(corpus.tokenizer.token_bytes)
    eval_step = jit_eval_step(make_eval_step(model.graphdef, token_bytes), shardings["params"], batch_shard, mesh)
    eval_data = [
        to_device(b, batch_shard)
        for b in data_lib.eval_batches(
            corpus.heldout, cfg.data.batch_size, cfg.train.eval_batches, jax.process_index(), jax.process_count()
        )
    ]

    def evaluate(params) -> dict[str, float]:
        sums = [eval_step(params, b) for b in eval_data]
        total = {k: float(sum(s[k] for s in sums)) for k in sums[0]}
        return eval_summary(total["nll"], total["tokens"], total["bytes"])

    writer = MetricsWriter(run_dir, enabled=is_main)
    n_params = param_counts(cfg.model).total
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_step = train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    reporter.log(
        f"model {cfg.model.name}: {n_params:,} parameters | mesh {dict(mesh.shape)} | "
        f"{corpus.train.n_tokens:,} training tokens, {corpus.heldout.n_tokens:,} held-out"
    )

    t0 = time.perf_counter()
    first = to_device(next(iterator), batch_shard)
    train_step = train_step.lower(state, first).compile()
    reporter.log(f"compiled the train step in {time.perf_counter() - t0:.1f}s")

    final_eval: dict[str, float] = {}
    tokens_seen = start * tokens_per_step
    batch, last_time, last_step = first, time.perf_counter(), start
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            state, metrics = train_step(state, batch)
            tokens_seen += tokens_per_step
            done = step == cfg.train.steps
            if step % cfg.train.log_every == 0 or done:
                values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "target_tokens"}
                now = time.perf_counter()
                step_time = (now - last_time) / (step - last_step)
                last_time, last_step = now, step
                values.update(
                    step_time=step_time,
                    tokens_per_sec=tokens_per_step / step_time,
                    model_tflops_per_sec=flops_per_step / step_time / 1e12,
                    tokens_seen=tokens_seen,
                )
                writer.write(step, values)
                reporter.step(step, values)
            else:
                reporter.step(step)
            if step % cfg.train.eval_every == 0 or done:
                final_eval = evaluate(state["params"])
                writer.write(step, final_eval)
                reporter.log(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in final_eval.items()))
                last_time = time.perf_counter()  # keep eval time out of the step-time figure
            checkpointer.save(step, state, iterator.get_state(), force=done)
            if not done:
                batch = to_device(next(iterator), batch_shard)
        if start >= cfg.train.steps:
            final_eval = evaluate(state["params"])
            reporter.log(f"run already complete at step {start}; eval: {final_eval}")
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        reporter.close()

    baseline = data_lib.unigram_bits_per_byte(corpus.train, corpus.heldout, corpus.tokenizer.token_bytes)
    return {**final_eval, "unigram_bits_per_byte": baseline, "steps": cfg.train.steps, "run_dir": str(run_dir)}

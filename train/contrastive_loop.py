"""Training a dual encoder: the loop of train/loop.py (stepping, the bad-step guard, checkpoints with the
data position, stop requests) on image-text pairs, evaluated by retrieval recall and zero-shot accuracy."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh
from rich.console import Console

from model.clip_flops import clip_param_counts, clip_train_flops_per_pair
from train.checkpoint import Checkpointer
from train.config import ExperimentConfig
from train.data import corpus as data_lib
from train.data.image_text import check_same_pairs, load_image_text, read_classes
from train.embedding_eval import EmbeddingScorer, scale_and_bias
from train.loop import Trainer
from train.metrics import ConsoleReporter, MetricsWriter
from train.objectives import make_objective
from train.program import build_program
from train.run_dir import check_run_dir, write_config
from train.sharding import Rules, unsplit_dimensions


class ContrastiveTrainer(Trainer):
    """One dual-encoder experiment on one mesh (the parent's loop; its own data, evaluation and accounting)."""

    unit = "pairs"

    def __init__(self, cfg: ExperimentConfig, mesh: Mesh, rules: Rules, force: bool = False,
                 peak_flops_per_device: float | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.peak_flops = None if peak_flops_per_device is None else peak_flops_per_device * mesh.size
        self.is_main = jax.process_index() == 0
        self.console = Console()
        self.run_dir = check_run_dir(cfg, force)
        self.data = load_image_text(cfg)
        check_same_pairs(self.data)
        self.classes = read_classes(cfg.data.classes) if cfg.data.classes else None
        self.objective = make_objective(cfg)
        self.step_args = ()
        self.program = build_program(cfg, mesh, rules, self.objective)
        self.program.check_process_rows()
        model = self.program.model
        self.layout_notes = unsplit_dimensions(model.logical_specs, model.params, mesh, rules)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint)
        try:
            self._restore_or_start(None)
        except BaseException:
            self.checkpointer.close()
            raise
        if self.is_main:
            write_config(cfg, self.layout_notes)
        self.scorer = EmbeddingScorer(model.graphdef, self.program.shardings["params"], mesh, rules,
                                      cfg.data.batch_size, self.data.tokenizer, cfg.data.seq_len)
        self.unigram_bits_per_byte = None
        self.writer = MetricsWriter(self.run_dir, keep_through_step=self.start, enabled=self.is_main)
        self.reporter = ConsoleReporter(cfg.train.steps, self.start, enabled=self.is_main, console=self.console)
        self.tokens_per_step = cfg.data.batch_size  # pairs (self.unit)
        self.flops_per_step = clip_train_flops_per_pair(cfg.model, cfg.data.seq_len, cfg.data.batch_size) * cfg.data.batch_size
        self._log_start()

    def _train_iterator(self):
        rows = data_lib.train_batches(self.data.train, self.cfg.data.batch_size, jax.process_index(),
                                      jax.process_count())
        return data_lib.batch_iterator(rows, self.cfg.data.prefetch)

    def _restore_or_start(self, topk) -> None:
        latest = self.checkpointer.latest_step()
        restored = None
        if latest is not None and not self.checkpointer.holds_parameters_only(latest):
            restored = self.checkpointer.restore_latest(self.program.abstract_state(), self._print)
        self.iterator = self._train_iterator()
        if restored is None:  # parameters alone (an import) or train.init_from's, else a fresh initialisation
            self.start, self.state = 0, self.program.init_state(self._starting_params())
            return
        self.start, self.state, data_state = restored
        self.iterator.set_state(data_state)
        self._print(f"resumed from {self.run_dir / 'checkpoints'} at step {self.start}")

    def evaluate(self) -> dict[str, float]:
        params = self.state["params"]
        log_scale, bias = scale_and_bias(params)
        result = self.scorer.evaluate(params, self.data.heldout, self.cfg.train.eval_batches * self.cfg.data.batch_size,
                                      self.objective, log_scale, bias, self.classes)
        return {f"eval_{k}": v for k, v in result.items()}

    def _log_start(self) -> None:
        cfg, mesh = self.cfg, self.mesh
        counts = clip_param_counts(cfg.model)
        self.reporter.log(
            f"model {cfg.model.name}: {counts['total']:,} parameters (image tower {counts['vision']:,}, text tower "
            f"{counts['text']:,}) | mesh {dict(mesh.shape)} on {mesh.size} devices | "
            f"{len(self.data.pairs.train):,} training pairs, {len(self.data.pairs.heldout):,} held-out"
        )
        self.reporter.log(f"precision {cfg.precision.preset}: {cfg.precision.policy.describe()}")
        for note in self.layout_notes:
            self.reporter.log(f"layout: {note}")
        if self.start == 0:
            skipped = self.data.pairs.skipped
            if skipped:
                self.reporter.log("skipped data records: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
            self.writer.write(0, {"data_train_pairs": len(self.data.pairs.train),
                                  **{f"data_skipped_{k}": v for k, v in skipped.items()}})

    def _mixture_shares(self, step: int) -> dict[str, int]:
        return {}



def train_contrastive(cfg: ExperimentConfig, mesh: Mesh, rules: Rules, force: bool = False,
                      stop_requested: Callable[[], bool] = lambda: False,
                      peak_flops_per_device: float | None = None) -> dict:
    """Run (or resume) a dual encoder's experiment; returns the final eval metrics and run facts."""
    return ContrastiveTrainer(cfg, mesh, rules, force, peak_flops_per_device).run(stop_requested)

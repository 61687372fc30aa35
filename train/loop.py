"""The training loop: build (or resume) the sharded state, step, log, evaluate, checkpoint.

It receives a Mesh and the logical-axis rules from the caller and never builds either,
nor does it install signal handlers: the caller passes `stop_requested`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh
from rich.console import Console

from model.flops import param_counts, train_flops_per_token
from train.data import corpus as data_lib
from train.checkpoint import Checkpointer
from train.config import ConfigError, ExperimentConfig
from train.objectives import make_objective
from train.evaluate import PairScorer, Scorer, metrics
from train.inference import params_of_run
from train.metrics import ConsoleReporter, MetricsWriter
from train.program import build_program
from train.state import abstract_model
from train.run_dir import check_run_dir, write_config
from train.sharding import Rules, unsplit_dimensions
from train.teacher import TOPK_POSITION, load_teacher, open_topk

class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps, and the config says stop (or nothing to restore)."""

    verdict = "training diverged"  # how the command line reports it (exit code 3)


class Trainer:
    """One experiment on one mesh: state (fresh or restored), data, compiled steps, outputs."""

    unit = "tokens"  # what a step's throughput counts (tokens_per_step of them)

    def __init__(
        self, cfg: ExperimentConfig, mesh: Mesh, rules: Rules, force: bool = False,
        peak_flops_per_device: float | None = None,
    ):
        if cfg.objective == "contrastive" and type(self) is Trainer:
            raise ConfigError("a dual encoder (model.clip) trains with train.contrastive_loop (`tessera train` "
                              "chooses it)")
        self.cfg, self.mesh = cfg, mesh
        # None where the peak is ambiguous (e.g. quantized matmuls): MFU is then left out, not guessed.
        self.peak_flops = None if peak_flops_per_device is None else peak_flops_per_device * mesh.size
        self.is_main = jax.process_index() == 0
        self.console = Console()
        # Every check that can refuse the run comes before anything is written.
        self.run_dir = check_run_dir(cfg, force)
        self.corpus = data_lib.load_corpus(cfg)
        data_lib.check_same_data(self.corpus)
        self.objective = make_objective(cfg, self.corpus.tokenizer)
        self._check_data_kind()
        topk, teacher = self._open_teacher(rules)
        frozen_model, self.step_args = (teacher.model, (teacher.params,)) if teacher else (None, ())
        reference = cfg.compares_with_a_reference_run  # init_from's parameters, frozen
        if reference:  # the policy's own model: its shardings are the policy's
            frozen_model = abstract_model(cfg.model, cfg.precision.policy.model)
        # Frozen parameters (a teacher, a reference) are a step argument, never state: no gradients, no moments.
        self.program = build_program(cfg, mesh, rules, self.objective, frozen_model)
        if reference:
            self.step_args = (params_of_run(cfg.train.init_from, cfg.model, self.program.abstract_state()["params"]),)
        self.program.check_process_rows()
        model = self.program.model
        self.layout_notes = unsplit_dimensions(model.logical_specs, model.params, mesh, rules)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint)
        try:
            self._restore_or_start(topk)
        except BaseException:
            self.checkpointer.close()
            raise
        if self.is_main:
            write_config(cfg, self.layout_notes)
        self._prepare_evaluation(rules)
        self.writer = MetricsWriter(self.run_dir, keep_through_step=self.start, enabled=self.is_main)
        self.reporter = ConsoleReporter(cfg.train.steps, self.start, enabled=self.is_main, console=self.console)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * (2 if self.objective.pairwise else 1)
        self.flops_per_step = train_flops_per_token(cfg.model, cfg.data.seq_len) * self.tokens_per_step
        self._log_start()

    def _print(self, message: str) -> None:
        """Console output before the reporter exists (it needs the restored step)."""
        if self.is_main:
            self.console.print(message, highlight=False, soft_wrap=True)

    def _check_data_kind(self) -> None:
        holds_pairs = any(s.packing == "pairs" for s in self.corpus.sources)  # a mixture never mixes the two
        if holds_pairs != self.objective.pairwise:
            kinds = ("documents or chats", "preference pairs (data.source=preferences)")
            raise ConfigError(f"train.objective={self.objective.name} trains on {kinds[self.objective.pairwise]}, but "
                              f"the data holds {kinds[holds_pairs]}")

    def _open_teacher(self, rules: Rules):
        """(the teacher's top-K batches, or None; the online teacher, or None) of a distillation."""
        cfg, tokenizer = self.cfg, self.corpus.tokenizer
        if cfg.distill is not None and cfg.distill.teacher_topk:
            return open_topk(cfg, tokenizer, jax.process_index(), jax.process_count()), None
        if cfg.distill is not None:
            return None, load_teacher(cfg, self.mesh, rules, tokenizer)
        return None, None

    def _restore_or_start(self, topk) -> None:
        """The latest checkpoint's state and data position, or a fresh state at step 0."""
        cfg = self.cfg
        latest = self.checkpointer.latest_step()
        if latest is not None and self.checkpointer.holds_parameters_only(latest):
            restored = None  # parameters alone (an import): training starts from them at step 0
        else:
            restored = self.checkpointer.restore_latest(self.program.abstract_state(), self._print)
        self.iterator = topk or data_lib.batch_iterator(
            data_lib.train_batches(self.corpus.train, cfg.data.batch_size, jax.process_index(), jax.process_count(),
                                   self.objective.rows),
            cfg.data.prefetch,
        )
        if restored is None:
            self.start, self.state = 0, self.program.init_state(self._starting_params())
            return
        self.start, self.state, data_state = restored
        if (TOPK_POSITION in data_state) != (topk is not None):
            raise ConfigError(
                f"{self.run_dir} was trained from {'the teacher top-K files' if topk is None else 'the data pipeline'}"
                f"; continue it the same way (distill.teacher_topk), or use a new run.dir"
            )
        self.iterator.set_state(data_state)
        self._print(f"resumed from {self.run_dir / 'checkpoints'} at step {self.start}")

    def _starting_params(self):
        """The parameters step 0 starts from: this run directory's own when it holds parameters alone (an
        import), else train.init_from's latest, else None (a fresh initialisation)."""
        source = self.run_dir if self.checkpointer.latest_step() is not None else self.cfg.train.init_from
        if source is None:
            return None
        abstract = self.program.abstract_state()["params"]
        params = params_of_run(source, self.cfg.model, abstract)
        self._print(f"starting from the parameters of {source}")
        return params

    def _prepare_evaluation(self, rules: Rules) -> None:
        """The scorer, this process's held-out batches on the mesh, and the unigram baseline on the same targets."""
        cfg, program, tokenizer = self.cfg, self.program, self.corpus.tokenizer
        if self.objective.pairwise:
            self.scorer = PairScorer(self.objective, program.model.graphdef, program.shardings["params"], self.mesh,
                                     rules, *self.step_args)
        else:
            self.scorer = Scorer(program.model.graphdef, program.shardings["params"], tokenizer, self.mesh, rules,
                                 cfg.data.batch_size, self.objective)

        def eval_rows(process_index: int, process_count: int):
            return data_lib.eval_batches(self.corpus.heldout, cfg.data.batch_size, cfg.train.eval_batches,
                                         process_index, process_count, self.objective.rows)

        local_rows = eval_rows(jax.process_index(), jax.process_count())
        self.eval_data = [program.device_batch(b) for b in local_rows]
        if self.objective.pairwise:  # no token baseline for pairs of responses
            self.unigram_bits_per_byte = None
            return
        # The baseline is scored on exactly the targets the model is evaluated on: all processes' rows.
        self.unigram_bits_per_byte = data_lib.unigram_bits_per_byte(
            self.corpus.unigram_counts(), local_rows if jax.process_count() == 1 else eval_rows(0, 1), tokenizer.token_bytes,
        )

    def _log_start(self) -> None:
        cfg, mesh, processes = self.cfg, self.mesh, jax.process_count()
        self.reporter.log(
            f"model {cfg.model.name}: {param_counts(cfg.model).total:,} parameters | mesh {dict(mesh.shape)} on "
            f"{mesh.size} devices in {processes} process{'es' if processes > 1 else ''} | "
            f"{self.corpus.train.n_tokens:,} training tokens, {self.corpus.heldout.n_tokens:,} held-out"
        )
        self.reporter.log(f"precision {cfg.precision.preset}: {cfg.precision.policy.describe()}")
        trained, moments = self.program.trained_sizes()
        if cfg.model.lora is not None:
            self.reporter.log(f"LoRA rank {cfg.model.lora.rank} on {', '.join(cfg.model.lora.targets)}: {trained:,} "
                              f"trained parameters of {self.program.parameter_count():,}")
        self.reporter.log(f"optimizer state: {moments / 2**20:,.2f} MiB")
        for note in self.layout_notes:
            self.reporter.log(f"layout: {note}")
        if self.start == 0:
            self._log_data_facts()

    def _log_data_facts(self) -> None:
        facts = {f"data_skipped_{kind}": n for kind, n in self.corpus.skipped.items()}
        if facts:
            self.reporter.log("skipped data records: " + ", ".join(f"{k} {v}" for k, v in self.corpus.skipped.items()))
        self.writer.write(0, {"data_train_tokens": self.corpus.train.n_tokens, **facts})

    def next_batch(self, stop: bool = False) -> tuple[dict[str, jax.Array], dict]:
        """The next global batch, placed on the devices, and the data position just after it (what a
        checkpoint of the step that trains it records). `stop`: this process asks the job to stop; the flag
        rides in its rows, and the step that trains them counts the requests over all rows."""
        rows = next(self.iterator)
        count = len(next(iter(rows.values())))
        rows = {**rows, "stop": np.full((count, 1), int(stop), np.int32)}
        return self.program.device_batch(rows), self.iterator.get_state()

    def evaluate(self) -> dict[str, float]:
        """The held-out metrics, named as `tessera eval` names them with an `eval_` prefix."""
        if self.objective.pairwise:
            result = self.scorer.batches(self.state["params"], self.eval_data, self.corpus.heldout.n_rows)
            return {f"eval_{k}": v for k, v in result.items()}
        sums = self.scorer.batches(self.state["params"], self.eval_data)
        return {f"eval_{k}": v for k, v in metrics(sums).items()}

    def run(self, stop_requested: Callable[[], bool] = lambda: False) -> dict:
        """Train to cfg.train.steps, or until stop_requested() (then checkpoint and return).

        Returns the last eval metrics plus `steps` done, `run_dir`, the unigram baseline,
        and `stopped_at` when the run was asked to stop early.
        """
        result: dict = {}
        try:
            if self.start >= self.cfg.train.steps:
                self.reporter.log(f"run already complete at step {self.start}")
                result = {**self.evaluate(), "steps": self.start}
            else:
                result = self._loop(stop_requested)
        finally:
            self.checkpointer.wait()  # an async save in flight is committed before we leave
            self.checkpointer.close()
            self.writer.close()
            self.reporter.close()
        totals = {k: int(self.state["guard"][k]) for k in ("skipped_nonfinite", "skipped_spike")}
        return {**result, **totals, "unigram_bits_per_byte": self.unigram_bits_per_byte, "run_dir": str(self.run_dir)}

    def _loop(self, stop_requested: Callable[[], bool]) -> dict:
        """The host never waits for the step it has just dispatched: while step n runs, the batch of step n+1
        is read and placed on the devices and step n-1's metrics are logged and checked (so the bad-step
        guard acts one step late: the step dispatched after a bad streak is discarded by the restore). The
        host waits for a step only where it must: to evaluate, checkpoint or stop after it.

        A stop request goes into the next batch read, and the step that trains it brings back the count of
        requests over all processes' rows: every process learns of it from the same step's metrics, a step
        later, and all stop after that next step, without a collective of their own."""
        cfg = self.cfg.train
        t0 = time.perf_counter()
        batch, position = self.next_batch(stop_requested())
        train_step = self.program.train_step.lower(self.state, batch, *self.step_args).compile()
        self.reporter.log(f"compiled the train step in {time.perf_counter() - t0:.1f}s")
        result: dict = {}
        self._timer = (time.perf_counter(), self.start)  # (when, at which step) the last logged interval began
        self._stop_reported = False
        step, previous = self.start, None  # previous: (step, metrics) not yet brought to the host
        while step < cfg.steps:
            self.state, metrics = train_step(self.state, batch, *self.step_args)
            step, trained = step + 1, position  # the data position after the batch this step trains
            done = step == cfg.steps
            if not done:
                batch, position = self.next_batch(stop_requested())  # onto the devices while the step runs
            bad = previous[0] if previous is not None and self._report(*previous) else None
            previous = (step, metrics)
            stop = self._stop_reported and not done
            if bad is None and (done or stop or step % cfg.eval_every == 0 or self.checkpointer.due(step)):
                bad, previous = step if self._report(*previous) else None, None  # this step, awaited
                if bad is None:
                    if step % cfg.eval_every == 0 or done:
                        eval_start = time.perf_counter()
                        result = self._log_eval(step)
                        self._timer = (self._timer[0] + time.perf_counter() - eval_start, self._timer[1])
                    self.writer.sync()  # a bucket run directory holds the metrics up to each checkpoint
                    self.checkpointer.save(step, self.state, trained, force=done or stop)
                    if stop:
                        self.checkpointer.wait()
                        self.reporter.log(f"stopped at step {step}; checkpoint saved in {self.run_dir / 'checkpoints'}")
                        return {**result, "steps": step, "stopped_at": step}
            if bad is not None:
                step, previous = self._recover(bad), None
                self._timer = (time.perf_counter(), step)
                if done:  # no batch was read ahead of the last step; otherwise the one read ahead is untrained
                    batch, position = self.next_batch(stop_requested())
        return {**result, "steps": step}

    def _report(self, step: int, metrics: dict) -> bool:
        """Bring one step's metrics to the host, log them where due; whether the bad-step streak calls for
        train.on_bad_steps."""
        cfg = self.cfg.train
        metrics = jax.device_get(metrics)
        self._stop_reported |= bool(metrics.get("stop", 0))
        if step % cfg.log_every == 0 or step == cfg.steps:
            now, (since, since_step) = time.perf_counter(), self._timer
            self._log_train(step, metrics, (now - since) / (step - since_step))
            self._timer = (now, step)
        else:
            self.reporter.step(step)
        return int(metrics["bad_streak"]) >= cfg.max_bad_steps

    def _recover(self, step: int) -> int:
        """After max_bad_steps non-finite steps in a row: restore the last checkpoint, lower the lr."""
        cfg = self.cfg.train
        what = f"{cfg.max_bad_steps} consecutive steps with non-finite loss or gradients (at step {step})"
        if cfg.on_bad_steps == "stop":
            raise TrainingDiverged(f"{what}; stopping as train.on_bad_steps=stop")
        self.checkpointer.wait()
        # The step dispatched after the bad one ends on every device before the restore's orbax barriers,
        # which are device collectives (see Checkpointer.save).
        jax.block_until_ready(self.state)
        restored = self.checkpointer.restore_latest(self.program.abstract_state(), self.reporter.log)
        if restored is None:
            raise TrainingDiverged(f"{what} and no checkpoint to restore yet")
        back_to, state, _ = restored
        lr_scale = float(self.state["guard"]["lr_scale"]) * cfg.bad_steps_lr_factor
        # Restored weights, but the guard's lowered rate, cleared streak and run totals carry on.
        guard = {**self.state["guard"], "lr_scale": lr_scale, "bad_streak": 0,
                 "loss_ema": state["guard"]["loss_ema"], "accepted": state["guard"]["accepted"]}
        state["guard"] = jax.device_put(
            jax.tree.map(lambda new, old: jax.numpy.asarray(new, old.dtype), guard, self.state["guard"]),
            self.program.shardings["guard"],
        )
        self.state = state
        self.reporter.log(f"{what}: restored step {back_to}, learning-rate scale now {lr_scale:g}")
        self.writer.write(step, {"restored_to_step": back_to, "lr_scale": lr_scale})
        return back_to

    def _log_train(self, step: int, metrics: dict, step_time: float) -> None:
        values = {k: v.tolist() for k, v in metrics.items() if k not in ("bad_streak", "stop")}  # floats, or lists (expert load)
        values.update(
            step_time=step_time,
            tflops_per_device=self.flops_per_step / step_time / self.mesh.size / 1e12,
            **{f"{self.unit}_per_sec": self.tokens_per_step / step_time, f"{self.unit}_seen": step * self.tokens_per_step},
        )
        values.update(self._mixture_shares(step))
        if self.peak_flops:
            values["mfu"] = self.flops_per_step / step_time / self.peak_flops
        self.writer.write(step, values)
        self.reporter.step(step, values)

    def _mixture_shares(self, step: int) -> dict[str, int]:
        """With a mixture, each source's share of the rows so far, in tokens."""
        if len(self.corpus.sources) == 1:
            return {}
        rows = self.corpus.train.rows_before(step * self.cfg.data.batch_size)
        return {f"tokens_seen_{name}": n * self.cfg.data.seq_len
                for name, n in zip(self.corpus.source_names, rows.tolist(), strict=True)}

    def _log_eval(self, step: int) -> dict[str, float]:
        result = self.evaluate()
        self.writer.write(step, result)
        self.reporter.log(f"eval at step {step}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
        return result


def train(
    cfg: ExperimentConfig, mesh: Mesh, rules: Rules, force: bool = False,
    stop_requested: Callable[[], bool] = lambda: False, peak_flops_per_device: float | None = None,
) -> dict:
    """Run (or resume) the experiment; returns the final eval metrics and run facts.

    peak_flops_per_device (dense FLOP/s of one device) turns on the `mfu` metric.
    """
    return Trainer(cfg, mesh, rules, force, peak_flops_per_device).run(stop_requested)

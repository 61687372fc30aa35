"""The RL loop (`tessera rl`): per step, sample G completions for each of a batch of prompts with the current
policy, score them with the rewards on the host, run the scoring pass (old and reference log-probs, values,
advantages), then rl.epochs x rl.minibatches guarded updates. Everything random comes from the checkpointed
state (rollout keys) or from (seed, step) (prompt order, minibatch shuffles), so a resumed run repeats the
same rewards and losses bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh
from rich.console import Console

from train import rewards as reward_lib
from train.checkpoint import Checkpointer
from train.config import ConfigError, ExperimentConfig
from train.data.prepare import tokenizer_identity
from train.data.prompts import Prompt, load_prompts, step_prompts
from train.inference import load_trained, run_config
from train.loop import TrainingDiverged
from train.metrics import ConsoleReporter, MetricsWriter
from train.reward_model import RewardScorer
from train.rl_models import build_rl_models, updates_per_step
from train.rollout import RolloutSampler, global_array, rollout_keys
from train.run_dir import check_run_dir, write_config
from train.sharding import Rules
from train.tokenizer import load_tokenizer

EVAL_STREAM = 11  # the held-out rollouts' fixed key: every evaluation samples with the same randomness


class RewardsFailed(TrainingDiverged):
    """More groups failed their rewards than rl.max_reward_error_rate allows."""

    verdict = "rewards failed"


def _stats(name: str, values: np.ndarray) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return {}
    return {f"{name}_mean": float(values.mean()), f"{name}_std": float(values.std()),
            f"{name}_min": float(values.min()), f"{name}_max": float(values.max())}


class RLTrainer:
    def __init__(self, cfg: ExperimentConfig, mesh: Mesh, rules: Rules, force: bool = False):
        self.cfg, self.mesh, self.rules, rl = cfg, mesh, rules, cfg.rl
        self.is_main = jax.process_index() == 0
        self.run_dir = check_run_dir(cfg, force)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.rewards = reward_lib.parse_rewards(rl.all_rewards, self._reward_model)
        self.train_prompts, self.heldout = load_prompts(
            rl.prompts, self.tokenizer, chat=rl.chat, width=cfg.data.seq_len - rl.max_new_tokens,
            heldout=rl.heldout_prompts, seed=cfg.run.seed)
        if any(r.kind in ("answer", "similarity") for r in self.rewards) and any(
                p.answer is None for p in self.train_prompts):
            raise ConfigError(f"rl.rewards compares with each prompt's answer, but rl.prompts={rl.prompts} has prompts "
                              "without an 'answer'")
        first = self.train_prompts[0]
        reward_lib.check_rewards(self.rewards, reward_lib.Rollouts([first.text], [first.answer or "ok"],
                                                                   np.ones(1, bool), np.ones(1, int), [first.answer]))
        self.models = build_rl_models(cfg, mesh, rules, self.tokenizer)
        policy = self.models.policy
        self.sampler = RolloutSampler(cfg.model, policy.model.graphdef, policy.shardings["params"], self.tokenizer,
                                      mesh, rules, seq_len=cfg.data.seq_len, max_new_tokens=rl.max_new_tokens,
                                      temperature=rl.temperature)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint)
        try:
            self._restore_or_start()
        except BaseException:
            self.checkpointer.close()
            raise
        if self.is_main:
            write_config(cfg)
        self.writer = MetricsWriter(self.run_dir, keep_through_step=self.start, enabled=self.is_main)
        self.reporter = ConsoleReporter(cfg.train.steps, self.start, enabled=self.is_main, console=Console())
        self.reporter.log(
            f"rl {rl.algorithm}: {cfg.data.batch_size} prompts x {rl.group_size} completions of up to "
            f"{rl.max_new_tokens} tokens per step, {updates_per_step(cfg)} updates each; rewards "
            f"{', '.join(f'{r.weight:g}*{r.label}' for r in self.rewards)}; {len(self.train_prompts)} prompts, "
            f"{len(self.heldout)} held out")

    # ------------------------------------------------------------------ set-up

    def _reward_model(self, run_dir: str):
        """An rm:RUN reward: the reward model's score of each (prompt, completion), batched."""
        theirs = run_config(run_dir).data.tokenizer
        if tokenizer_identity(theirs) != tokenizer_identity(self.cfg.data.tokenizer):
            raise ConfigError(f"rm:{run_dir} was trained with tokenizer {theirs!r}, the policy uses "
                              f"{self.cfg.data.tokenizer!r}; a reward model must read the policy's tokens")
        run = load_trained(run_dir, self.mesh, self.rules)
        scorer = RewardScorer(run, self.mesh, self.rules, chat=self.cfg.rl.chat)
        return lambda r: scorer.batch(r.prompts, r.completions)

    def _restore_or_start(self) -> None:
        restored = self.checkpointer.restore_latest(self.models.abstract_state(), self._print)
        self.reward_failures = {"failed_groups": 0, "groups": 0}
        if restored is None:
            self.start, self.state = 0, self.models.init_state()
            return
        self.start, self.state, data = restored
        self.reward_failures = {k: int(data[k]) for k in self.reward_failures}
        self._print(f"resumed from {self.run_dir / 'checkpoints'} at step {self.start}")

    def _print(self, message: str) -> None:
        if self.is_main:
            Console().print(message, highlight=False, soft_wrap=True)

    # ------------------------------------------------------------------ one step

    def _rewards(self, prompts: list[Prompt], rollout, group_size: int) -> reward_lib.Scored:
        view = reward_lib.Rollouts([p.text for p in prompts], [self.sampler.text(c) for c in rollout.completions],
                                   rollout.ended, np.array([len(c) for c in rollout.completions]),
                                   [p.answer for p in prompts])
        return reward_lib.score(self.rewards, view, group_size)

    def rollout(self, step: int):
        """(prompts per row, the rollout, its scored rewards) of RL step `step` from the current state."""
        rl = self.cfg.rl
        prompts = [p for p in step_prompts(self.train_prompts, step, self.cfg.data.batch_size, self.cfg.run.seed)
                   for _ in range(rl.group_size)]
        rollout = self.sampler.sample(self.state["params"], prompts, rollout_keys(self.state["rng"], len(prompts)))
        return prompts, rollout, self._rewards(prompts, rollout, rl.group_size)

    def score(self, rollout, scored: reward_lib.Scored) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The scoring pass: per-token old log-probs, advantages (and the reference's, values, returns) on the host."""
        rows_sharding = self.models.policy.batch_sharding
        rows = {k: global_array(rows_sharding, v) for k, v in rollout.rows.items()}
        per_row = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(rows_sharding.spec[0]))
        value = self.state["value"]["params"] if "value" in self.state else None
        out, stats = self.models.programs.score(
            self.state["params"], self.models.reference, value, rows, global_array(per_row, scored.total),
            global_array(per_row, scored.failed.astype(np.float32)))
        out, stats = jax.device_get((out, stats))
        weights = rollout.rows["weights"] > 0
        gap = np.abs(out["old_logp"] - rollout.sampled_logp)[weights]
        stats = {k: float(v) for k, v in stats.items()}
        stats["logprob_gap_max"] = float(gap.max()) if gap.size else 0.0
        return {**rollout.rows, **out}, stats

    def update(self, step: int, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """rl.epochs passes over the rollout rows in rl.minibatches shuffled minibatches; their metrics merged."""
        rl, rows = self.cfg.rl, len(batch["inputs"])
        size, merged = rows // rl.minibatches, []
        for epoch in range(rl.epochs):
            order = np.random.default_rng((self.cfg.run.seed, step, epoch)).permutation(rows)
            for m in range(rl.minibatches):
                take = order[m * size:(m + 1) * size]
                mb = {k: global_array(self.models.policy.batch_sharding, v[take]) for k, v in batch.items()}
                self.state, metrics = self.models.programs.update(self.state, mb)
                merged.append(metrics)
        merged = jax.device_get(merged)
        if int(merged[-1]["bad_streak"]) >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(f"{self.cfg.train.max_bad_steps} consecutive updates with non-finite loss or "
                                   f"gradients (at step {step + 1})")
        out = {k: float(np.mean([m[k] for m in merged])) for k in merged[0] if k != "bad_streak"}
        out.update(ratio_max=float(max(m["ratio_max"] for m in merged)),
                   ratio_min=float(min(m["ratio_min"] for m in merged)))
        for k in ("skipped_nonfinite_total", "skipped_spike_total", "learning_rate"):
            out[k] = float(merged[-1][k])
        return out

    def step(self, step: int) -> dict[str, float]:
        """One RL step from the current state -> its metrics."""
        rl = self.cfg.rl
        prompts, rollout, scored = self.rollout(step)
        self._count_failures(step, prompts, scored)
        t0 = time.perf_counter()
        batch, score_stats = self.score(rollout, scored)
        metrics = self.update(step, batch)
        update_seconds = time.perf_counter() - t0
        groups = scored.total.reshape(-1, rl.group_size)
        ok = ~scored.failed.reshape(-1, rl.group_size)[:, 0]
        values = {
            **_stats("reward", np.where(scored.failed, np.nan, scored.total)),
            **{k: v for r in self.rewards for k, v in _stats(f"reward_{r.label}", scored.each[r.label]).items()},
            "zero_variance_groups": float(np.mean(groups[ok].std(axis=1) == 0)) if ok.any() else 0.0,
            "response_length": float(np.mean([len(c) for c in rollout.completions])),
            "ended_share": float(np.mean(rollout.ended)),
            **score_stats, **metrics,
            "rollout_seconds": rollout.seconds, "update_seconds": update_seconds,
            "rollout_tokens_per_sec": rollout.generated_tokens / rollout.seconds,
            "update_tokens_per_sec": rl.epochs * batch["inputs"].size / update_seconds,
            "reward_failed_groups": float(scored.failed.reshape(-1, rl.group_size)[:, 0].sum()),
        }
        return values

    def _count_failures(self, step: int, prompts, scored: reward_lib.Scored) -> None:
        for error in scored.errors:
            self.reporter.log(f"step {step + 1}: {error}; its group is skipped")
        self.reward_failures["failed_groups"] += int(scored.failed.reshape(-1, self.cfg.rl.group_size)[:, 0].sum())
        self.reward_failures["groups"] += self.cfg.data.batch_size

    def evaluate(self) -> dict[str, float]:
        """One completion per held-out prompt, with the same key at every evaluation: the rewards' means."""
        if not self.heldout:
            return {}
        key = jax.random.key_data(jax.random.split(jax.random.key(self.cfg.run.seed + EVAL_STREAM), len(self.heldout)))
        rollout = self.sampler.sample(self.state["params"], self.heldout, np.asarray(key))
        scored = self._rewards(self.heldout, rollout, 1)
        ok = ~scored.failed  # a held-out prompt whose reward failed is left out of the means, and counted
        out = {"eval_reward_mean": float(np.mean(scored.total[ok]))} if ok.any() else {}
        for r in self.rewards:
            values = scored.each[r.label][ok]
            if len(values):
                out[f"eval_reward_{r.label}_mean"] = float(np.mean(values))
        out["eval_response_length"] = float(np.mean([len(c) for c in rollout.completions]))
        return {**out, **({"eval_reward_failed": int((~ok).sum())} if not ok.all() else {})}

    # ------------------------------------------------------------------ the loop

    def run(self, stop_requested: Callable[[], bool] = lambda: False) -> dict:
        cfg, result = self.cfg, {}
        try:
            if self.start == 0:
                result = self.evaluate()
                self.writer.write(0, result)
                self._log_eval(0, result)
            step = self.start
            while step < cfg.train.steps:
                values = self.step(step)
                step += 1
                self.writer.write(step, values)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    self.reporter.step(step, values)
                else:
                    self.reporter.step(step)
                done, stop = step == cfg.train.steps, stop_requested()
                if step % cfg.train.eval_every == 0 or done:
                    result = self.evaluate()
                    self.writer.write(step, result)
                    self._log_eval(step, result)
                failed = self._failure_rate_exceeded()
                if done or stop or failed or self.checkpointer.due(step):
                    self.writer.sync()
                    self.checkpointer.save(step, self.state, {**self.reward_failures, "rl_step": step},
                                           force=done or stop or failed)
                if failed:
                    self.checkpointer.wait()
                    f = self.reward_failures
                    raise RewardsFailed(f"{f['failed_groups']} of {f['groups']} groups failed their rewards, above "
                                        f"rl.max_reward_error_rate={cfg.rl.max_reward_error_rate}; checkpoint saved "
                                        f"at step {step}")
                if stop and not done:
                    self.checkpointer.wait()
                    self.reporter.log(f"stopped at step {step}; checkpoint saved in {self.run_dir / 'checkpoints'}")
                    return {**result, "steps": step, "stopped_at": step, "run_dir": str(self.run_dir)}
            if self.start >= cfg.train.steps:
                result = self.evaluate()
        finally:
            self.checkpointer.wait()
            self.checkpointer.close()
            self.writer.close()
            self.reporter.close()
        return {**result, "steps": cfg.train.steps, "run_dir": str(self.run_dir)}

    def _failure_rate_exceeded(self) -> bool:
        f = self.reward_failures
        return f["groups"] > 0 and f["failed_groups"] / f["groups"] > self.cfg.rl.max_reward_error_rate

    def _log_eval(self, step: int, result: dict[str, float]) -> None:
        if result:
            self.reporter.log(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))


def train_rl(cfg: ExperimentConfig, mesh: Mesh, rules: Rules, force: bool = False,
             stop_requested: Callable[[], bool] = lambda: False) -> dict:
    return RLTrainer(cfg, mesh, rules, force).run(stop_requested)

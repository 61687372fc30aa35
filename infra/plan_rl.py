"""`tessera plan` for an RL config: what one RL step holds on each device, phase by phase, analytic beside
the compiler's figures for the three programs the step runs (compiled ahead of time for the target).

Resident through the whole step: the policy's state (parameters, optimizer moments, master copy), a PPO value
model's state, the frozen reference's parameters (none for the LoRA base or without KL) and a reward model's
parameters (rm: rewards). On top of them, one phase at a time:

- rollout: the KV cache of every rollout row (prompt and completion), the LM head's table gathered whole for
  the logits, and the prefill's float32 attention scores of one layer (the largest buffer it makes);
- scoring: the logits of one chunk of rows (as many rows as an update's microbatch) and their float32
  log-softmax, per model scored;
- update: one minibatch's saved activations (train/memory.py), the value model's too, and the larger of
  their backward buffers (the two backward passes run one after the other).

The compiler's figure for a phase is the resident state plus what its program allocates beyond its arguments
(temporaries, outputs not aliased to donated inputs, code), so the two columns compare like for like.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from infra.mesh import logical_rules
from infra.plan import XlaMemory, target_mesh
from infra.targets import Target
from model.memory import dtype_bytes, kv_cache_bytes
from train.config import ExperimentConfig
from train.memory import axis_shards, estimate_memory, shard_bytes
from train.rewards import reward_model_runs
from train.rl_models import build_rl_models, update_config
from train.rl_step import reference_kind
from train.rollout import RolloutSampler
from train.state import abstract_model, param_shardings
from train.tokenizer import load_tokenizer

PHASES = ("rollout", "scoring", "update")


@dataclass
class RlPlan:
    target: str
    mesh: dict[str, int]
    rollout_rows: int
    update_rows: int
    policy_state: int
    value_state: int
    reference: int
    reward_model: int
    analytic: dict[str, int]  # phase -> bytes on top of the resident state
    xla: dict[str, int | None]  # phase -> the compiler's bytes on top of the resident state (None: refused)
    device_memory_bytes: int

    @property
    def resident(self) -> int:
        return self.policy_state + self.value_state + self.reference + self.reward_model

    def total(self, phase: str, figures: dict) -> int | None:
        return None if figures[phase] is None else self.resident + figures[phase]

    @property
    def peak(self) -> int:
        return self.resident + max(self.analytic.values())

    @property
    def fits(self) -> bool:
        return all(v is not None for v in self.xla.values()) and self.resident + max(self.xla.values()) <= (
            self.device_memory_bytes)

    def to_json(self) -> dict:
        return {**asdict(self), "resident": self.resident, "peak": self.peak, "fits": self.fits}


def _beyond_arguments(compile_fn) -> int | None:
    """What a compiled program allocates beyond its arguments, or None when the compiler refuses it."""
    try:
        stats = compile_fn().memory_analysis()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None
    xla = XlaMemory(stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.alias_size_in_bytes,
                    stats.temp_size_in_bytes, stats.generated_code_size_in_bytes)
    return xla.total - xla.arguments


def _abstract(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def plan_rl(cfg: ExperimentConfig, target: Target) -> RlPlan:
    mesh, rules, rl = target_mesh(cfg, target), logical_rules(cfg), cfg.rl
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    models = build_rl_models(cfg, mesh, rules, tokenizer, load_reference=False)
    state = models.abstract_state()
    policy = models.policy
    rows, seq, m = cfg.data.batch_size * rl.group_size, cfg.data.seq_len, cfg.model
    policy_state = shard_bytes({k: v for k, v in state.items() if k != "value"})
    value_state = shard_bytes(state.get("value", {}))
    reference = shard_bytes(state["params"]) if reference_kind(cfg) == "params" else 0
    reward_model = sum(_reward_model_bytes(run, mesh, rules) for run in reward_model_runs(cfg.rl.all_rewards))

    # Analytic phases, per device.
    compute, logits_bytes = cfg.precision.policy.compute, dtype_bytes(cfg.precision.policy.logits)
    batch_shards = axis_shards(policy, "batch", rows)
    local_rows = rows // batch_shards
    vocab = m.vocab_size // axis_shards(policy, "vocab", m.vocab_size)
    kv_heads = axis_shards(policy, "kv_heads", m.kv_heads) if not m.mla else 1
    width = seq - rl.max_new_tokens
    table = vocab * m.d_model * dtype_bytes(compute)  # gathered (after the cast) for each step's logits
    heads = m.n_heads // axis_shards(policy, "heads", m.n_heads)
    prefill_scores = local_rows * heads * width * seq * 4  # one layer's float32 attention scores over the cache
    rollout = kv_cache_bytes(m, local_rows, seq, compute) // kv_heads + table + prefill_scores
    scored_models = 1 + (reference_kind(cfg) != "none")
    chunk_rows = local_rows // (rl.minibatches * cfg.train.microbatches)  # scoring runs the update's microbatches
    scoring = scored_models * chunk_rows * seq * vocab * (logits_bytes + 4)
    # Both models' saved activations (and gradient sums over microbatches) live through the backward pass; their
    # backward buffers come one after the other.
    updates = [estimate_memory(p) for p in (policy, models.value) if p is not None]
    update = sum(u.saved_activations + u.gradient_accumulator for u in updates) + max(u.peak_phase for u in updates)
    analytic = {"rollout": rollout, "scoring": scoring, "update": update}

    # The compiler's phases: the three programs, lowered on abstract arguments.
    rows_sharding = policy.batch_sharding
    per_row = NamedSharding(mesh, PartitionSpec(rows_sharding.spec[0]))
    batch = {k: _abstract((rows, seq), np.float32 if k == "weights" else np.int32, rows_sharding)
             for k in ("inputs", "targets", "positions", "segment_ids", "weights")}
    ref = state["params"] if reference_kind(cfg) == "params" else None
    value = state["value"]["params"] if "value" in state else None
    scalars = _abstract((rows,), np.float32, per_row)
    minibatch_rows = update_config(cfg).data.batch_size
    minibatch = {k: _abstract((minibatch_rows, seq), v.dtype, rows_sharding) for k, v in batch.items()}
    for k in ("old_logp", "advantages", *(("ref_logp",) if ref is not None or reference_kind(cfg) == "lora_base"
                                          else ()), *(("old_values", "returns") if value is not None else ())):
        minibatch[k] = _abstract((minibatch_rows, seq), np.float32, rows_sharding)
    sampler = RolloutSampler(m, policy.model.graphdef, policy.shardings["params"], tokenizer, mesh, rules,
                             seq_len=seq, max_new_tokens=rl.max_new_tokens, temperature=rl.temperature)
    xla = {
        "rollout": _beyond_arguments(lambda: sampler.lower(state["params"], rows).compile()),
        "scoring": _beyond_arguments(lambda: models.programs.score.lower(
            state["params"], ref, value, batch, scalars, scalars).compile()),
        "update": _beyond_arguments(lambda: models.programs.update.lower(state, minibatch).compile()),
    }
    return RlPlan(target.name, dict(mesh.shape), rows, minibatch_rows, policy_state, value_state, reference,
                  reward_model, analytic, xla, target.memory_bytes)


def _reward_model_bytes(run_dir: str, mesh, rules) -> int:
    from train.inference import run_config

    source = run_config(run_dir)
    model = abstract_model(source.model, source.precision.policy.model)
    shardings = param_shardings(model, mesh, rules)
    return shard_bytes(jax.tree.map(lambda p, s: _abstract(p.shape, p.dtype, s), model.params, shardings))


def plan_rows(plan: RlPlan) -> list[tuple[str, str]]:
    gib = lambda n: "-" if n is None else f"{n / 2**30:.3f} GiB"  # noqa: E731
    out = [
        ("mesh", " x ".join(f"{k}={v}" for k, v in plan.mesh.items())),
        ("rollout rows / update rows", f"{plan.rollout_rows} / {plan.update_rows}"),
        ("policy state", gib(plan.policy_state)),
        ("value model state", gib(plan.value_state)),
        ("reference parameters", gib(plan.reference)),
        ("reward model parameters", gib(plan.reward_model)),
        ("resident", gib(plan.resident)),
    ]
    for phase in PHASES:
        out.append((f"{phase}: analytic / XLA", f"{gib(plan.total(phase, plan.analytic))} / "
                                                 f"{gib(plan.total(phase, plan.xla))}"))
    out += [("peak (analytic)", gib(plan.peak)), ("device memory", gib(plan.device_memory_bytes)),
            ("fits (XLA)", "yes" if plan.fits else "NO")]
    return out

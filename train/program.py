"""Everything compiled for one experiment on one mesh: shapes, shardings, optimizer, jitted steps.

The loop, the benchmarks and the tests all build their training pieces here, so there is
one way to turn a config, a mesh and the rules into a runnable train step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from train.config import ConfigError, ExperimentConfig
from train.objectives import Objective, make_objective
from train.objectives.distillation import Distillation
from train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from train.sharding import Rules, batch_sharding
from train.state import (
    AbstractModel, State, abstract_model, abstract_state, init_state, param_shardings, state_shardings,
)
from train.step import jit_train_step, make_train_step


@dataclass(frozen=True)
class TrainProgram:
    cfg: ExperimentConfig
    mesh: Mesh
    rules: Rules
    model: AbstractModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: State
    batch_sharding: NamedSharding
    train_step: Any  # jitted (state, batch[, teacher params]) -> (state, metrics), state donated
    objective: Objective

    def init_state(self, params=None) -> State:
        """Step 0: fresh parameters, or `params` (e.g. another run's) with a fresh optimizer."""
        return init_state(self.cfg.model, self.cfg.precision.policy.model, self.tx, self.shardings, self.cfg.run.seed,
                          params)

    def abstract_state(self) -> State:
        """ShapeDtypeStructs carrying this mesh's shardings: the target of a (resharding) restore."""
        return abstract_state(self.model, self.tx, self.shardings)

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch as ShapeDtypeStructs: with abstract_state, enough to compile the step ahead of time.
        A pairwise objective's rows hold both responses of a pair ([batch, 2, seq_len]) and their end positions."""
        if self.objective.name == "contrastive":
            return self._abstract_pairs_batch()
        pairs = self.objective.pairwise
        shape = (self.cfg.data.batch_size, *((2,) if pairs else ()), self.cfg.data.seq_len)
        dtypes = {"inputs": np.int32, "targets": np.int32, "positions": np.int32, "segment_ids": np.int32,
                  "weights": np.float32}
        batch = {k: jax.ShapeDtypeStruct(shape, d, sharding=self.batch_sharding) for k, d in dtypes.items()}
        if pairs:
            batch["ends"] = jax.ShapeDtypeStruct(shape[:2], np.int32, sharding=self.batch_sharding)
        stop = jax.ShapeDtypeStruct((shape[0], 1), np.int32, sharding=self.batch_sharding)
        return {**batch, "stop": stop}  # the loop's stop requests (train/loop.py)

    def _abstract_pairs_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """A dual encoder's batch: uint8 images, caption tokens and their lengths (the end token last)."""
        b, vision = self.cfg.data.batch_size, self.cfg.model.clip.vision
        shapes = {"images": ((b, vision.image_size, vision.image_size, vision.channels), np.uint8),
                  "tokens": ((b, self.cfg.data.seq_len), np.int32), "lengths": ((b,), np.int32),
                  "stop": ((b, 1), np.int32)}
        return {k: jax.ShapeDtypeStruct(s, d, sharding=self.batch_sharding) for k, (s, d) in shapes.items()}

    def parameter_count(self) -> int:
        return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.model.params))

    def trained_sizes(self) -> tuple[int, int]:
        """(parameters trained, bytes of optimizer state with the master copy): what full finetuning and LoRA
        differ in."""
        state = self.abstract_state()
        trained = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.model.trainable.part(self.model.params)))
        held = [*jax.tree.leaves(state["opt_state"]), *jax.tree.leaves(state.get("master", {}))]
        return trained, sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in held)

    def check_process_rows(self) -> None:
        """Each process reads a contiguous 1/P of every global batch (train.data); the mesh must place
        exactly those rows on its devices, which fails when, say, the tensor axis spans processes."""
        count, index, batch = jax.process_count(), jax.process_index(), self.cfg.data.batch_size
        if count == 1:
            return
        shape = (batch, self.cfg.data.seq_len)
        spans = {(s[0].start or 0, batch if s[0].stop is None else s[0].stop)
                 for s in self.batch_sharding.addressable_devices_indices_map(shape).values()}
        share = (index * batch // count, (index + 1) * batch // count)
        if (min(a for a, _ in spans), max(b for _, b in spans)) != share or sum(b - a for a, b in spans) != share[1] - share[0]:
            raise ConfigError(
                f"mesh {dict(self.mesh.shape)} puts rows {sorted(spans)} of each batch on process {index}'s devices, "
                f"not its own share {share}: keep non-batch axes (tensor, dcn_tensor) within one process"
            )

    def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Each process hands over its local rows; together they form the global batch."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}


def build_program(
    cfg: ExperimentConfig, mesh: Mesh, rules: Rules, objective: Objective | None = None,
    teacher: AbstractModel | None = None,
) -> TrainProgram:
    """objective: None builds the config's own (loading its tokenizer if it needs special tokens).
    teacher: with cfg.distill, the online teacher's model (None: the batches carry its top K); with a
    preference objective, the frozen reference's (None: none, or the LoRA base)."""
    if cfg.model.weight_quant is not None and cfg.model.lora is None:
        raise ConfigError(
            f"model.weight_quant={cfg.model.weight_quant.method} marks a weight-only quantized model for serving; "
            "train (or distill, or quantization-aware train with model.qat) the float model instead, or train "
            "LoRA adapters on it (model.lora: QLoRA)"
        )
    objective = objective or make_objective(cfg)
    policy = cfg.precision.policy
    model = abstract_model(cfg.model, policy.model)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, decay_mask(model.trainable.part(model.logical_specs)), policy.optimizer_state)
    shardings = state_shardings(model, tx, mesh, rules, master=policy.master_weights)
    batches = batch_sharding(mesh, rules)
    kd = None
    if cfg.distill is not None:
        if not cfg.distill.teacher_topk and teacher is None:
            raise ConfigError("this config distills from a teacher running beside the student; its step needs the "
                              "teacher's model (train.teacher.load_teacher)")
        kd = Distillation(cfg.distill, teacher.graphdef if not cfg.distill.teacher_topk else None)
    step = make_train_step(
        model.graphdef, tx, schedule, cfg.train, mesh=mesh, rules=rules, objective=objective, moe=cfg.model.moe, kd=kd,
        trainable=model.trainable,
    )
    teacher_shardings = None if teacher is None else param_shardings(teacher, mesh, rules)
    return TrainProgram(
        cfg, mesh, rules, model, tx, schedule, shardings, batches,
        jit_train_step(step, shardings, batches, mesh, teacher_shardings), objective,
    )

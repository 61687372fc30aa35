"""Analytic per-device memory of one train step, term by term, on the program's mesh.

State sizes are exact: each parameter and optimizer leaf is divided by the shards its
sharding gives it. The step's transient memory is modelled by liveness: the residuals
every layer saves for its backward pass (model/memory.py, under the remat policy) are
live from the forward pass to the end of the backward pass, and on top of them:

- the LM head's backward: the embedding table (or untied head) gathered whole from its
  FSDP shards, split only over the vocab shards, in its stored dtype (the cast to the
  compute dtype follows the gather); the logits in the policy's logits dtype; their
  gradient in the compute dtype, for the matmuls back; and the table's float32 gradient,
  sharded like the table, one buffer for each use of it (lookup, head);
- a layer's backward: buffers the size of that layer's full activations (its
  gradients, and under remat its recomputed forward).

Under "full" remat the two phases come one after the other and the peak is the larger.
Without it, XLA's schedule overlaps the head's weight-gradient matmul and reduce-scatter
with the first layers' backward, and the compiled steps hold both at once; the model
adds them. (Checked against memory_analysis() for llama3-1b/8b on v5e and v5p at 2048
tokens per device. At a few hundred tokens per device XLA instead accumulates the tied
table's gradient whole in float32, which this model does not predict.)

Gradients do not add a term: XLA reduce-scatters each weight's gradient into the
sharded optimizer update as it is produced.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import jax
from jax.sharding import PartitionSpec

from model.attention.kernels import training_kernel
from model.memory import F32, dtype_bytes, layer_activation_bytes_per_token
from train.sharding import mesh_spec

TENSOR_SPLIT_TERMS = {"qkv": "heads", "attention_scores": "heads", "attention_output": "heads",
                      "attention_kernel_copies": "heads", "mlp": "mlp"}


@dataclass
class MemoryEstimate:
    parameters: int
    optimizer: int
    saved_activations: int
    head_phase: int  # gathered table + logits + logit gradients
    layer_phase: int  # one layer's backward buffers
    phases_overlap: bool  # False under full remat: the peak holds only the larger phase

    @property
    def peak_phase(self) -> int:
        both = self.head_phase + self.layer_phase
        return both if self.phases_overlap else max(self.head_phase, self.layer_phase)

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.saved_activations + self.peak_phase

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "peak_phase": self.peak_phase, "total": self.total}


def shard_bytes(tree) -> int:
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)
    )


def axis_shards(program, logical: str, size: int) -> int:
    spec = mesh_spec(PartitionSpec(logical), (size,), program.mesh, program.rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(program.mesh.shape[a] for a in axes)


def estimate_memory(program) -> MemoryEstimate:
    cfg, m = program.cfg, program.cfg.model
    kernel = training_kernel(m, program.mesh.devices.flat[0].platform, cfg.data.seq_len)
    state = program.abstract_state()
    params = shard_bytes(state["params"])
    optimizer = shard_bytes(state["opt_state"]) + shard_bytes(state.get("master", {}))  # the f32 master copy

    policy = cfg.precision.policy
    compute, dt = policy.compute, dtype_bytes(policy.compute)
    vocab_shards = axis_shards(program, "vocab", m.vocab_size)
    table = m.vocab_size * m.d_model // vocab_shards
    table_shards = axis_shards(program, "embed", m.d_model)
    table_grads = 2 * table // table_shards * F32  # lookup and head: one table used twice, or two tables

    batch_shards = axis_shards(program, "batch", cfg.data.batch_size // cfg.train.microbatches)
    tokens = cfg.data.batch_size // cfg.train.microbatches // batch_shards * cfg.data.seq_len

    def per_token(remat: str) -> float:
        terms = layer_activation_bytes_per_token(m, cfg.data.seq_len, compute, remat, kernel)
        split = {"heads": axis_shards(program, "heads", m.n_heads), "mlp": axis_shards(program, "mlp", m.d_ff)}
        return sum(v / split[TENSOR_SPLIT_TERMS[k]] if k in TENSOR_SPLIT_TERMS else v for k, v in terms.items())

    logits = tokens * m.vocab_size // vocab_shards
    return MemoryEstimate(
        parameters=params,
        optimizer=optimizer,
        saved_activations=int(tokens * m.n_layers * per_token(m.remat)),
        head_phase=int(table * dtype_bytes(policy.params) + logits * (dtype_bytes(policy.logits) + dt) + table_grads),
        layer_phase=int(tokens * per_token("none")),
        phases_overlap=m.remat != "full",
    )

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
  gradients, and under remat its recomputed forward), and, when the layers run as one
  scan, the float32 gradient of the whole layer stack (sharded like the stack), which the
  backward scan allocates before its first step and fills layer by layer.

Under "full" remat the two phases come one after the other and the peak is the larger.
Without it, XLA's schedule overlaps the head's weight-gradient matmul and reduce-scatter
with the first layers' backward, and the compiled steps hold both at once; the model
adds them. (Checked against memory_analysis() for llama3-1b/8b on v5e and v5p at 2048
tokens per device.)

A tied table with fewer tokens per device than its model width is the exception. There
the TPU compiler computes the head's weight gradient in one matmul rather than as a
collective matmul that reduce-scatters as it goes, and keeps it whole in float32 as the
accumulator the lookup's gradient is added to later: from the head's backward to the end,
the whole float32 gradient sits beside the table gathered in the compute dtype and the
logits. (The compiler chooses by its own cost model; the boundary at the model width is
read from llama3-1b on v5e-16, whole at 512 tokens per chip, windowed at 2048.)

Gradients add a term only with several microbatches: then the float32 sum of the
microbatches' gradients, sharded like the parameters, lives through the whole step.
Otherwise XLA reduce-scatters each weight's gradient into the sharded optimizer update as
it is produced.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import jax
from jax.sharding import PartitionSpec

from model.attention.kernels import training_kernel
from model.memory import F32, dtype_bytes, layer_activation_bytes_per_token
from train.sharding import mesh_spec

# The logical axis that splits each activation term: heads and MLP columns by the tensor axis; the model-width
# terms only where the rules split activations' model dimension (activation_embed, unsplit by default).
SPLIT_TERMS = {"qkv": "heads", "attention_scores": "heads", "attention_output": "heads",
               "attention_kernel_copies": "heads", "mlp": "mlp", "layer_input": "activation_embed",
               "norms": "activation_embed", "attention_projection": "activation_embed", "residual": "activation_embed"}


@dataclass
class MemoryEstimate:
    parameters: int
    optimizer: int
    gradient_accumulator: int  # float32 gradient sums over microbatches (0 with one microbatch)
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
        return self.parameters + self.optimizer + self.gradient_accumulator + self.saved_activations + self.peak_phase

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
        split = {"heads": axis_shards(program, "heads", m.n_heads), "mlp": axis_shards(program, "mlp", m.d_ff),
                 "activation_embed": axis_shards(program, "activation_embed", m.d_model)}
        return sum(v / split[SPLIT_TERMS[k]] if k in SPLIT_TERMS else v for k, v in terms.items())

    logits = tokens * m.vocab_size // vocab_shards
    logit_bytes = logits * (dtype_bytes(policy.logits) + dt)
    if m.tie_embeddings and tokens < m.d_model:
        head_phase = table * (F32 + dt) + logit_bytes  # the whole float32 gradient and the gathered table
    else:
        head_phase = table * dtype_bytes(policy.params) + logit_bytes + table_grads
    def float32_shards(tree) -> int:
        return sum(math.prod(p.sharding.shard_shape(p.shape)) * F32 for p in jax.tree.leaves(tree))

    stacks = [state["params"][name] for name in ("blocks", "moe_groups") if name in state["params"]]
    layer_gradients = float32_shards(stacks) if m.scan_layers else 0
    accumulator = 0
    if cfg.train.microbatches > 1:
        accumulator = float32_shards(state["params"])
    return MemoryEstimate(
        parameters=params,
        optimizer=optimizer,
        gradient_accumulator=accumulator,
        saved_activations=int(tokens * m.n_layers * per_token(m.remat)),
        head_phase=int(head_phase),
        layer_phase=int(tokens * per_token("none")) + layer_gradients,
        phases_overlap=m.remat != "full",
    )

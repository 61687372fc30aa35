"""Analytic per-device memory of a dual encoder's train step (model/clip.py), term by term, in the terms of
train/memory.py: exact state sizes from the shardings; each tower's saved activations per layer (model/memory.py,
under the remat policy, at its own sequence length and attention kernel); one layer's backward buffers (the
larger tower's) beside the float32 gradients of both layer stacks, which the backward scans allocate whole
(sharded) and keep to the update; and the loss phase: the [batch, batch] similarity logits with their softmax
and gradient (float32, rows split over the batch axes), the gathered other side's embeddings, and the token
table's float32 gradient (sharded like the table). On TPU, short sequences are padded by the layout (`tpu_padding`)."""

from __future__ import annotations

import math

import jax

from model.attention.kernels import implementation
from model.clip import vision_tower_config
from model.memory import F32, layer_activation_bytes_per_token
from train.memory import SPLIT_TERMS, MemoryEstimate, axis_shards, shard_bytes


def _float32_shards(tree) -> int:
    return sum(math.prod(p.sharding.shard_shape(p.shape)) * F32 for p in jax.tree.leaves(tree))


SEQUENCE_MINOR_FROM = 32  # tokens; see tpu_padding


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tpu_padding(length: int) -> dict[str, float]:
    """How much TPU layouts pad a layer's saved activations along a sequence of `length`, by term: arrays are
    tiled (8, 128) on their two minor dimensions. The score matrices pad queries to 8 and keys to 128, the
    MLP's hidden activations pad the sequence to 8. The model-width activations (norm inputs and statistics,
    q, k, v, residuals) are laid out with the sequence minor, padded to 128; for a very short sequence, with
    the sequence second-minor, padded to 8. Read from the compiler's memory reports (v5e) at 197, 77 and 50
    tokens (sequence minor: 256, 128, 128) and at 17 (second-minor: 24); where between 17 and 50 the compiler
    switches is not measured (SEQUENCE_MINOR_FROM is a guess). A language model's lengths are multiples of 128,
    where none of this shows. Against that reading: at B/16 widths (2+2 layers, bf16, v5e-8) the reports at 26,
    37 and 50 image tokens show the vision tower's bf16 [.., tokens, 768] activations padded to 8, not 128, while
    the estimate errs by -14%, +1% and -3%: its agreement from 37 tokens on offsets an under-count not yet found."""
    width_terms = _up(length, 128) / length if length >= SEQUENCE_MINOR_FROM else _up(length, 8) / length
    return {"attention_scores": _up(length, 8) * _up(length, 128) / length**2, "mlp": _up(length, 8) / length,
            "*": width_terms}


def estimate_clip_memory(program) -> MemoryEstimate:
    cfg, m = program.cfg, program.cfg.model
    v = m.clip.vision
    platform = program.mesh.devices.flat[0].platform
    state = program.abstract_state()
    compute = cfg.precision.policy.compute
    rows = cfg.data.batch_size // axis_shards(program, "batch", cfg.data.batch_size)
    towers = [(m, cfg.data.seq_len), (vision_tower_config(m), v.tokens)]

    def per_token(tower, length: int, remat: str) -> float:
        kernel = implementation(tower.attention, platform, length, length)
        terms = layer_activation_bytes_per_token(tower, length, compute, remat, kernel)
        split = {"heads": axis_shards(program, "heads", tower.n_heads), "mlp": axis_shards(program, "mlp", tower.d_ff),
                 "activation_embed": axis_shards(program, "activation_embed", tower.d_model)}
        padding = tpu_padding(length) if platform == "tpu" else {}
        return sum((x / split[SPLIT_TERMS[k]] if k in SPLIT_TERMS else x) * padding.get(k, padding.get("*", 1.0))
                   for k, x in terms.items())

    saved = sum(rows * length * tower.n_layers * per_token(tower, length, m.remat) for tower, length in towers)
    one_layer = max(rows * length * per_token(tower, length, "none") for tower, length in towers)
    stacks = [state["params"]["text"]["blocks"], state["params"]["vision"]["blocks"]]
    layer_gradients = _float32_shards(stacks) if m.scan_layers else 0
    batch, width = cfg.data.batch_size, m.clip.embed_dim
    similarity = 3 * rows * batch * F32 + 2 * batch * width * F32  # logits, softmax, gradient; both sides gathered
    table = m.vocab_size * m.d_model // axis_shards(program, "vocab", m.vocab_size)
    table_gradient = table // axis_shards(program, "embed", m.d_model) * F32
    return MemoryEstimate(
        parameters=shard_bytes(state["params"]),
        optimizer=shard_bytes(state["opt_state"]) + shard_bytes(state.get("master", {})),
        gradient_accumulator=0,  # one microbatch: the loss needs the whole batch
        saved_activations=int(saved),
        head_phase=int(similarity + table_gradient),
        layer_phase=int(one_layer) + layer_gradients,
        phases_overlap=m.remat != "full",
    )

"""Analytic activation and KV-cache bytes: pure functions of the model config (no tracing).

What a layer keeps for its backward pass depends on the remat policy. The counts below
are the tensors this repo's layers produce (see model/attention/, model/layers.py),
per token, as XLA keeps them after fusion:

- "none" keeps every intermediate: the f32 copies the norms make of their input and
  their outputs; q, k, v and the rotated q, k; what attention keeps (dense: the scores
  in f32 and the probabilities in the compute dtype, both growing with the sequence
  length; a flash kernel: one log-sum-exp per query and head); the attention output and projection; the MLP's hidden tensors (SwiGLU: the two input
  projections, the gate's sigmoid and SiLU, their product and the constrained copy;
  GELU: projection, activation and copy; QuickGELU also its sigmoid); and the residual sums.
- "save_dots" keeps the outputs of the weight matmuls (no batch dimension): q, k, v,
  the attention projection, the MLP input projections and output.
- "full" keeps only each layer's input.

Every policy also holds one layer's full ("none") activations while that layer's
backward runs.
"""

from __future__ import annotations

import jax.numpy as jnp

from model.config import ModelConfig
from model.flops import mlp_widths_per_token
from model.moe import capacity, expert_rows_per_token

F32 = 4


def dtype_bytes(name: str) -> int:
    return jnp.dtype(name).itemsize


# Bytes per token and head that attention keeps for its backward pass, by implementation: dense its f32
# scores and the probabilities in the compute dtype; a flash kernel one f32 log-sum-exp; cuDNN with packed
# rows one f32 statistic per (document slot, query), and a row of length L has L document slots here
# (cudnn.py), so its statistics grow with the length like dense's scores.
ATTENTION_SAVED_PER_HEAD = {
    "dense": lambda seq_len, dt: seq_len * (F32 + dt),
    "blockwise": lambda seq_len, dt: F32,
    "splash": lambda seq_len, dt: F32,
    "cudnn": lambda seq_len, dt: seq_len * F32,
}


def layer_activation_bytes_per_token(
    cfg: ModelConfig, seq_len: int, dtype: str, policy: str | None = None, kernel: str = "dense"
) -> dict[str, float]:
    """Bytes one layer keeps per token for the backward pass, by term, computing in `dtype`, under the
    remat `policy` (default: the config's), attention by `kernel` (ATTENTION_SAVED_PER_HEAD).

    Head counts and widths are the whole model's; divide by the shards that split them.
    """
    policy = policy or cfg.remat
    dt = dtype_bytes(dtype)
    d = cfg.d_model
    f = mlp_rows_per_token(cfg, seq_len) / cfg.n_layers  # averaged over dense and MoE layers
    q, kv = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    if policy == "full":
        return {"layer_input": d * dt}
    if policy == "save_dots":
        mlp_in = 2 if cfg.mlp == "swiglu" else 1
        return {
            "layer_input": d * dt,
            "qkv": (q + 2 * kv) * dt,
            "attention_projection": d * dt,
            "mlp": (mlp_in * f + d) * dt,
        }
    rope = (q + kv) * dt if cfg.position == "rope" else 0
    mlp_hidden = {"swiglu": 6, "quick_gelu": 4}.get(cfg.mlp, 3)  # QuickGELU also keeps its sigmoid
    return {
        "layer_input": d * dt,
        "norms": 2 * d * (F32 + dt) + 4 * d * F32,  # f32 input copies, outputs, and f32 statistics' operands
        "qkv": (q + 2 * kv) * dt + rope,
        "attention_scores": cfg.n_heads * ATTENTION_SAVED_PER_HEAD[kernel](seq_len, dt),
        "attention_output": q * dt,
        # splash's own residuals: q (scaled), k, v and its output in its head-major layout, beside the model's
        "attention_kernel_copies": 2 * (q + kv) * dt if kernel == "splash" else 0,
        "attention_projection": d * dt,
        "mlp": mlp_hidden * f * dt,
        "residual": d * dt,
        **capacity_dispatch_bytes_per_token(cfg, seq_len, dtype),
    }


def mlp_rows_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Hidden MLP width a token occupies, summed over layers: the capacity path fills (or leaves
    empty) num_experts * slots / seq_len expert rows per token instead of top_k."""
    width = mlp_widths_per_token(cfg)
    if cfg.moe is not None:
        width += cfg.n_moe_groups * (expert_rows_per_token(cfg, seq_len) - cfg.moe.top_k) * cfg.d_expert
    return width


def capacity_dispatch_bytes_per_token(cfg: ModelConfig, seq_len: int, dtype: str) -> dict[str, float]:
    """The capacity path's dispatch and combine masks [B, S, E, C] and the tokens in and out of the
    expert slots, per token, averaged over layers (none for dense models or the dropless path)."""
    if cfg.moe is None or cfg.moe.dispatch != "capacity":
        return {}
    dt, slots = dtype_bytes(dtype), capacity(cfg, seq_len)
    per_moe_layer = 2 * cfg.moe.num_experts * slots * dt + 2 * expert_rows_per_token(cfg, seq_len) * cfg.d_model * dt
    return {"moe_dispatch": per_moe_layer * cfg.n_moe_groups / cfg.n_layers}


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str) -> int:
    """Keys and values of every layer for one token, cached in `dtype` (the compute dtype); GQA
    stores only the kv heads, latent attention only its latent and the shared rotary key."""
    per_layer = (cfg.mla.kv_lora_rank + cfg.mla.rope_head_dim) if cfg.mla else 2 * cfg.kv_heads * cfg.dim_per_head
    return cfg.n_layers * per_layer * dtype_bytes(dtype)


def kv_cache_bytes(cfg: ModelConfig, batch: int, context: int, dtype: str) -> int:
    return batch * context * kv_cache_bytes_per_token(cfg, dtype)

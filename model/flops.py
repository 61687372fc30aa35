"""Analytic parameter and FLOP counts: pure functions of the model config (no tracing).

Convention: one multiply-add is 2 FLOPs. Attention's score and value products are
counted over the causal half of the score matrix (query t sees t+1 keys), the same
work a causal kernel that skips masked blocks would do.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token table (+ learned positions)
    head: int  # untied output projection (0 when tied)
    per_layer: int
    final_norm: int
    n_layers: int

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.per_layer * self.n_layers + self.final_norm

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q_dim, kv_dim = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    norm = d * (2 if cfg.norm == "layernorm" else 1)
    attn = d * q_dim + 2 * d * kv_dim + q_dim * d
    mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
    if cfg.use_bias:
        attn += q_dim + 2 * kv_dim + d
        mlp += f + d
    embedding = v * d + (cfg.max_seq_len * d if cfg.position == "learned" else 0)
    return ParamCounts(
        embedding=embedding,
        head=0 if cfg.tie_embeddings else d * v,
        per_layer=attn + mlp + 2 * norm,
        final_norm=norm,
        n_layers=cfg.n_layers,
    )


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights each token multiplies through: every layer's projections plus the LM head (tied or not)."""
    d, f = cfg.d_model, cfg.d_ff
    q_dim, kv_dim = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    per_layer = d * q_dim + 2 * d * kv_dim + q_dim * d + d * f * (3 if cfg.mlp == "swiglu" else 2)
    return per_layer * cfg.n_layers + d * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward QK^T and PV FLOPs per token, averaged over a causal sequence of seq_len."""
    mean_keys = (seq_len + 1) / 2
    return cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.dim_per_head * mean_keys


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 2 * matmul_params_per_token(cfg) + attention_flops_per_token(cfg, seq_len)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token: forward plus backward (twice the forward)."""
    return 3 * forward_flops_per_token(cfg, seq_len)

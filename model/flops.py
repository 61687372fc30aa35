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


def mean_keys(seq_len: int, causal: bool) -> float:
    """Keys a query attends to, averaged over the sequence: (L+1)/2 when causal, L otherwise."""
    return (seq_len + 1) / 2 if causal else float(seq_len)


def forward_flops_breakdown(cfg: ModelConfig, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Forward FLOPs per token, by term, summed over layers.

    causal=True counts the scores and values only over the keys a query may see (the
    model's work); causal=False counts the whole score matrix, which is what a dense
    attention computes before masking.
    """
    d, f, n = cfg.d_model, cfg.d_ff, cfg.n_layers
    q_dim, kv_dim = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    keys = mean_keys(seq_len, causal)
    return {
        "qkv_projection": n * 2 * d * (q_dim + 2 * kv_dim),
        "attention_scores": n * 2 * q_dim * keys,
        "attention_values": n * 2 * q_dim * keys,
        "attention_output": n * 2 * q_dim * d,
        "mlp": n * 2 * d * f * (3 if cfg.mlp == "swiglu" else 2),
        "lm_head": 2 * d * cfg.vocab_size,
    }


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward QK^T and PV FLOPs per token, averaged over a sequence of seq_len."""
    terms = forward_flops_breakdown(cfg, seq_len, causal)
    return terms["attention_scores"] + terms["attention_values"]


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    return sum(forward_flops_breakdown(cfg, seq_len, causal).values())


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token: forward plus backward (twice the forward), causal attention.

    This is the MFU numerator: it does not depend on how the step is implemented.
    """
    return 3 * forward_flops_per_token(cfg, seq_len)


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int, policy: str | None = None) -> float:
    """Forward FLOPs the remat policy runs again in the backward pass (dense attention).

    "full" reruns every layer's forward (not the LM head) except the MLP's output
    projection, whose result the backward pass never reads; "save_dots" keeps the weight
    matmuls' outputs but reruns the attention products, which have a batch dimension.
    """
    policy = policy or cfg.remat
    terms = forward_flops_breakdown(cfg, seq_len, causal=False)
    if policy == "full":
        mlp_output = cfg.n_layers * 2 * cfg.d_ff * cfg.d_model
        return sum(v for k, v in terms.items() if k != "lm_head") - mlp_output
    if policy == "save_dots":
        return terms["attention_scores"] + terms["attention_values"]
    return 0.0


def hardware_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs the train step executes per token: dense attention, plus the remat recompute."""
    return 3 * forward_flops_per_token(cfg, seq_len, causal=False) + recompute_flops_per_token(cfg, seq_len)


def prefill_flops(cfg: ModelConfig, prompt_len: int) -> float:
    """Forward FLOPs of one prompt of prompt_len tokens (causal)."""
    return prompt_len * forward_flops_per_token(cfg, prompt_len)


def decode_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """FLOPs of one decoded token attending to `context` cached positions (itself included)."""
    terms = forward_flops_breakdown(cfg, 1, causal=False)
    attention = cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.dim_per_head * context
    return sum(v for k, v in terms.items() if not k.startswith("attention_s") and k != "attention_values") + attention


def optimizer_flops_per_param() -> int:
    """Elementwise FLOPs of one update per parameter: global-norm clipping (square, sum,
    scale), the logged gradient norm (square, sum), AdamW (moments 3 + 4, bias
    corrections 2, sqrt, eps, divide, decay 2, learning rate, apply) and the guard's three
    selects (parameters, two moments). Negligible beside the matmuls once a step holds a
    few thousand tokens; counted so small steps compare fairly with the compiler's count.
    """
    return 3 + 2 + (3 + 4 + 2 + 1 + 1 + 1 + 2 + 1 + 1) + 3

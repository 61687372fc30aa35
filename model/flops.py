"""Analytic parameter and FLOP counts: pure functions of the model config (no tracing).

Convention: one multiply-add is 2 FLOPs. Attention's score and value products are
counted over the causal half of the score matrix (query t sees t+1 keys), the same
work a causal kernel that skips masked blocks would do.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.attention.blockwise import Blocks
from model.attention.splash import splash_block
from model.config import ModelConfig
from model.moe import capacity, expert_rows_per_token


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token table (+ learned positions, token types, the embedding norm of post-norm models)
    head: int  # untied output projection (0 when tied), and BERT's head transform and vocabulary bias
    dense_layer: int  # one layer with a dense MLP
    moe_layer: int  # one layer with routed experts (0 without MoE)
    moe_layer_active: int  # of which one token uses: router, its top_k experts, the shared experts
    n_dense_layers: int
    n_moe_layers: int
    final_norm: int

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.layers(self.moe_layer) + self.final_norm

    @property
    def active(self) -> int:
        """Parameters one token is multiplied through (equals total for a dense model)."""
        return self.embedding + self.head + self.layers(self.moe_layer_active) + self.final_norm

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    def layers(self, moe_layer: int) -> int:
        return self.dense_layer * self.n_dense_layers + moe_layer * self.n_moe_layers


def _mlp_matrices(cfg: ModelConfig) -> int:
    return 3 if cfg.mlp == "swiglu" else 2


def _projection_params(cfg: ModelConfig) -> int:
    """Weights of the query, key and value projections (latent attention: through its low-rank latents)."""
    d, h = cfg.d_model, cfg.n_heads
    if cfg.mla is None:
        return d * h * cfg.dim_per_head + 2 * d * cfg.kv_heads * cfg.dim_per_head
    mla = cfg.mla
    q = d * h * cfg.qk_head_dim if mla.q_lora_rank is None else mla.q_lora_rank * (d + h * cfg.qk_head_dim)
    return q + d * (mla.kv_lora_rank + mla.rope_head_dim) + mla.kv_lora_rank * h * (mla.nope_head_dim + mla.v_head_dim)


def _attention_params(cfg: ModelConfig) -> int:
    d, q_dim, kv_dim = cfg.d_model, cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    out = cfg.n_heads * cfg.v_head_dim * d
    if cfg.mla is not None:
        latent_norms = (cfg.mla.kv_lora_rank + (cfg.mla.q_lora_rank or 0)) * (2 if cfg.norm == "layernorm" else 1)
        return _projection_params(cfg) + out + latent_norms
    biases = (q_dim + 2 * kv_dim if cfg.qkv_bias else 0) + (d if cfg.attention_out_bias else 0)
    qk_norms = 2 * cfg.dim_per_head * (2 if cfg.norm == "layernorm" else 1) if cfg.qk_norm else 0
    return _projection_params(cfg) + out + biases + qk_norms


def moe_mlp_widths(cfg: ModelConfig) -> tuple[int, int, int]:
    """(routed expert width, experts a token uses, shared width) of one MoE layer."""
    moe = cfg.moe
    return cfg.d_expert, moe.top_k, moe.num_shared_experts * cfg.d_expert


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, f, v, mats = cfg.d_model, cfg.d_ff, cfg.vocab_size, _mlp_matrices(cfg)
    norm = d * (2 if cfg.norm == "layernorm" else 1)
    attn_and_norms = _attention_params(cfg) + 2 * norm
    mlp = d * f * mats + ((f + d) if cfg.mlp_bias else 0)
    moe_layer = moe_active = 0
    if cfg.moe is not None:
        fe, k, shared = moe_mlp_widths(cfg)
        router, experts = d * cfg.moe.num_experts, cfg.moe.num_experts * d * fe * mats
        moe_layer = attn_and_norms + router + experts + d * shared * mats
        moe_active = attn_and_norms + router + k * d * fe * mats + d * shared * mats
    post_norm = cfg.norm_position == "post"
    embedding = v * d + (cfg.max_seq_len * d if cfg.position == "learned" else 0) + cfg.token_types * d
    embedding += norm if post_norm else 0  # post-norm models normalise the embeddings
    head = (0 if cfg.tie_embeddings else d * v) + ((d * d + d + norm + v) if cfg.head_transform else 0)
    return ParamCounts(
        embedding=embedding,
        head=head,
        dense_layer=attn_and_norms + mlp,
        moe_layer=moe_layer,
        moe_layer_active=moe_active,
        n_dense_layers=cfg.n_dense_layers,
        n_moe_layers=cfg.n_moe_groups,
        final_norm=0 if post_norm else norm,
    )


def mean_keys(seq_len: int, causal: bool, window: int | None = None) -> float:
    """Keys a query attends to, averaged over the sequence: (L+1)/2 when causal, L otherwise; with a sliding
    window w, query i sees min(i + 1, w)."""
    if not causal:
        return float(seq_len)
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def kernel_keys(cfg: ModelConfig, seq_len: int, kernel: str) -> float:
    """Keys per query whose scores the attention implementation computes, averaged over the sequence: dense
    computes every one; the flash kernels skip whole key blocks above the causal diagonal or out of the
    window (blockwise at model.attention_block, splash at its own block), and compute padding rows and keys
    up to whole blocks; cuDNN's tiles are small enough to count as the keys the mask allows."""
    if kernel == "dense":
        return float(seq_len)
    if kernel == "cudnn":
        return mean_keys(seq_len, cfg.causal, cfg.sliding_window)
    block = min(cfg.attention_block, seq_len) if kernel == "blockwise" else splash_block(seq_len)
    count = -(-seq_len // block)
    blocks = Blocks(block, block, count, count, cfg.causal, cfg.sliding_window, 0, 1.0)
    return blocks.computed_fraction() * (count * block) ** 2 / seq_len  # padded scores over the real queries


def mlp_widths_per_token(cfg: ModelConfig) -> float:
    """Hidden MLP width one token goes through, summed over layers (routed experts: the top_k it uses)."""
    width = cfg.n_dense_layers * cfg.d_ff
    if cfg.moe is not None:
        fe, k, shared = moe_mlp_widths(cfg)
        width += cfg.n_moe_groups * (k * fe + shared)
    return width


def forward_flops_breakdown(cfg: ModelConfig, seq_len: int, causal: bool | None = None,
                            keys: float | None = None) -> dict[str, float]:
    """Forward FLOPs per token, by term, summed over layers; MoE layers count the experts a token uses.

    causal (default: the architecture's) counts the scores and values only over the keys a
    query may see, the model's work; causal=False counts the whole score matrix, which is
    what a dense attention computes before masking; `keys` gives the keys per query outright
    (an implementation's, `kernel_keys`).
    """
    d, n, h = cfg.d_model, cfg.n_layers, cfg.n_heads
    if keys is None:
        keys = mean_keys(seq_len, cfg.causal if causal is None else causal, cfg.sliding_window)
    terms = {
        "qkv_projection": n * 2 * _projection_params(cfg),
        "attention_scores": n * 2 * h * cfg.qk_head_dim * keys,
        "attention_values": n * 2 * h * cfg.v_head_dim * keys,
        "attention_output": n * 2 * h * cfg.v_head_dim * d,
        "mlp": 2 * d * mlp_widths_per_token(cfg) * _mlp_matrices(cfg),
        "lm_head": 2 * d * cfg.vocab_size + (2 * d * d if cfg.head_transform else 0),
    }
    if cfg.moe is not None:
        terms["router"] = cfg.n_moe_groups * 2 * d * cfg.moe.num_experts
    return terms


def _capacity_terms(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token per MoE layer that only the capacity path spends."""
    fe, k, _ = moe_mlp_widths(cfg)
    e, d, slots = cfg.moe.num_experts, cfg.d_model, capacity(cfg, seq_len)
    return {
        "idle_slots": (expert_rows_per_token(cfg, seq_len) - k) * 2 * d * fe * _mlp_matrices(cfg),  # rows beyond k
        "dispatch": 2 * e * slots * d,  # tokens into slots
        "combine": 2 * e * slots * d,  # slots back to tokens
        "dispatch_mask": 2 * k * e * slots,
        "combine_mask": 2 * 2 * k * e * slots,  # the mask times the routing weights
    }


# Forward + backward multiples of each capacity term: the masks are built from integer
# slot assignments, so nothing differentiates the dispatch mask; the combine mask carries
# the routing weights' gradient.
CAPACITY_TRAIN_MULTIPLE = {"idle_slots": 3, "dispatch": 2, "combine": 3, "dispatch_mask": 1, "combine_mask": 2}


def capacity_dispatch_flops_per_token(cfg: ModelConfig, seq_len: int, train: bool = False) -> float:
    """FLOPs the capacity path adds per token (forward, or forward + backward): experts run on every
    slot, filled or not, and the one-hot dispatch and combine einsums. Zero for dense models and
    the dropless path."""
    if cfg.moe is None or cfg.moe.dispatch != "capacity":
        return 0.0
    terms = _capacity_terms(cfg, seq_len)
    per_layer = sum(v * (CAPACITY_TRAIN_MULTIPLE[k] if train else 1) for k, v in terms.items())
    return cfg.n_moe_groups * per_layer


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return sum(forward_flops_breakdown(cfg, seq_len).values())


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token: forward plus backward (twice the forward), with attention
    over the keys each query may see and only the experts each token uses.

    This is the MFU numerator: it does not depend on how the step is implemented.
    """
    return 3 * forward_flops_per_token(cfg, seq_len)


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int, policy: str | None = None, kernel: str = "dense") -> float:
    """Forward FLOPs the remat policy runs again in the backward pass, attention by `kernel`.

    "full" reruns every layer's forward (not the LM head) except the MLP's output
    projection, whose result the backward pass never reads; "save_dots" keeps the weight
    matmuls' outputs but reruns the attention products, which have a batch dimension.
    """
    policy = policy or cfg.remat
    terms = forward_flops_breakdown(cfg, seq_len, keys=kernel_keys(cfg, seq_len, kernel))
    if policy == "full":
        mlp_output = 2 * mlp_widths_per_token(cfg) * cfg.d_model
        rerun = sum(v for k, v in terms.items() if k != "lm_head") - mlp_output
        return rerun + capacity_dispatch_flops_per_token(cfg, seq_len)
    if policy == "save_dots":
        return terms["attention_scores"] + terms["attention_values"]
    return 0.0


# Matmuls of one training step's attention, in units of the forward score (QK^T) and value (PV) products:
# dense autodiff adds dQ, dK and dP, dV; a flash backward also recomputes the scores from the log-sum-exp;
# splash's backward is two kernels (dK and dV, then dQ), each recomputing the scores and dP.
ATTENTION_TRAIN_UNITS = {"dense": (3, 3), "blockwise": (4, 3), "cudnn": (4, 3), "splash": (5, 4)}
ATTENTION_PRODUCTS = ("attention_scores", "attention_values")


def _attention_rerun(cfg: ModelConfig, terms: dict[str, float]) -> float:
    """The attention products' share of the remat recompute: both rematerialising policies rerun them."""
    return sum(terms[k] for k in ATTENTION_PRODUCTS) if cfg.remat in ("full", "save_dots") else 0.0


def attention_train_flops_per_token(cfg: ModelConfig, seq_len: int, kernel: str = "dense") -> float:
    """The attention products' share of `hardware_flops_per_token`: forward, backward and remat recompute of the
    score and value products, as `kernel` computes them (what a Pallas kernel adds to XLA's count)."""
    terms = forward_flops_breakdown(cfg, seq_len, keys=kernel_keys(cfg, seq_len, kernel))
    scores, values = ATTENTION_TRAIN_UNITS[kernel]
    return scores * terms["attention_scores"] + values * terms["attention_values"] + _attention_rerun(cfg, terms)


def hardware_flops_per_token(cfg: ModelConfig, seq_len: int, kernel: str = "dense") -> float:
    """FLOPs the train step executes per token: attention as `kernel` computes it (the keys it visits, and a
    flash kernel's recomputed scores), the capacity path's idle slots and dispatch, plus the remat recompute."""
    terms = forward_flops_breakdown(cfg, seq_len, keys=kernel_keys(cfg, seq_len, kernel))
    scores, values = ATTENTION_TRAIN_UNITS[kernel]
    rest = sum(v for k, v in terms.items() if k not in ATTENTION_PRODUCTS)
    return (3 * rest + scores * terms["attention_scores"] + values * terms["attention_values"]
            + recompute_flops_per_token(cfg, seq_len, kernel=kernel)
            + capacity_dispatch_flops_per_token(cfg, seq_len, train=True))


def prefill_flops(cfg: ModelConfig, prompt_len: int) -> float:
    """Forward FLOPs of one prompt of prompt_len tokens (causal)."""
    return prompt_len * forward_flops_per_token(cfg, prompt_len)


def decode_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """FLOPs of one decoded token attending to `context` cached positions (itself included)."""
    terms = forward_flops_breakdown(cfg, 1, causal=False)
    attention = cfg.n_layers * 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * context
    return sum(v for k, v in terms.items() if k not in ATTENTION_PRODUCTS) + attention


def optimizer_flops_per_param() -> int:
    """Elementwise FLOPs of one update per parameter: global-norm clipping (square, sum,
    scale), the logged gradient norm (square, sum), AdamW (moments 3 + 4, bias
    corrections 2, sqrt, eps, divide, decay 2, learning rate, apply) and the guard's three
    selects (parameters, two moments). Negligible beside the matmuls once a step holds a
    few thousand tokens; counted so small steps compare fairly with the compiler's count.
    """
    return 3 + 2 + (3 + 4 + 2 + 1 + 1 + 1 + 2 + 1 + 1) + 3

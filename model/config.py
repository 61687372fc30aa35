"""The model's schema: every shape and switch a model needs, validated at load; the names of its logical
axes; and the model's side of a precision policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "save_dots"]
AttentionImpl = Literal["auto", "dense", "blockwise", "splash", "cudnn"]

# The logical axis names the modules give their parameters' and activations' dimensions. Which mesh
# axes split each is decided outside the model (infra/mesh.py's rules table, which a config can override).
LOGICAL_AXES = (
    "batch", "length", "embed", "activation_embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "expert",
)


@dataclass(frozen=True)
class Precision:
    """The model's side of a precision policy (the train config's `precision` section chooses it):
    parameters are stored in `params`, matmuls run in `compute`, the LM head writes `logits`, and
    the backward pass produces gradients in `grads` (None: each in its parameter's dtype). Norm
    statistics, softmax and the loss are float32 under every policy. Plain names, no jax: configs
    load without it."""

    params: str = "float32"
    compute: str = "float32"
    logits: str = "float32"
    grads: str | None = None


class MoeConfig(BaseModel):
    """Mixture-of-experts feed-forward layers (Mixtral, DeepSeek and Switch are settings of these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_experts: int = Field(8, ge=2, description="routed experts per MoE layer")
    top_k: int = Field(2, ge=1, description="experts each token is sent to")
    d_expert: int | None = Field(None, ge=1, description="hidden width of one expert; None means model.d_ff")
    num_shared_experts: int = Field(0, ge=0, description="always-on experts (DeepSeek), each d_expert wide")
    score: Literal["softmax", "sigmoid"] = Field("softmax", description="how router logits become expert scores")
    renormalize: bool = Field(True, description="rescale the chosen experts' scores to sum to 1")
    router_jitter: float = Field(0.0, ge=0, lt=1, description="training only: router input scaled by U(1-j, 1+j)")
    dispatch: Literal["dropless", "capacity"] = Field(
        "dropless", description="dropless: grouped matmul over exactly the routed tokens; capacity: fixed slots per expert"
    )
    capacity_factor: float = Field(1.25, gt=0, description="capacity path: slots per expert = factor*tokens*top_k/experts")
    aux_loss_coef: float = Field(0.01, ge=0, description="load-balancing loss (Switch/GShard form)")
    z_loss_coef: float = Field(0.001, ge=0, description="router z-loss: mean logsumexp(router logits)^2")
    first_dense_layers: int = Field(0, ge=0, description="leading layers that keep a dense MLP")
    every: int = Field(1, ge=1, description="after the dense lead, every n-th layer is MoE (the others dense)")


class MlaConfig(BaseModel):
    """Multi-head latent attention (DeepSeek-V2): keys and values come from one low-rank latent per token.

    Each head's query/key is a `nope_head_dim` part without positions plus a `rope_head_dim`
    part with rotary positions; the rotary key part is one vector shared by all heads.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_lora_rank: int = Field(512, ge=1, description="width of the key/value latent (what a KV cache would hold)")
    q_lora_rank: int | None = Field(None, ge=1, description="None: queries projected directly from the input")
    nope_head_dim: int = Field(128, ge=1, description="per-head query/key width without positions")
    rope_head_dim: int = Field(64, ge=2, description="per-head query/key width with rotary positions (the key part shared)")
    v_head_dim: int = Field(128, ge=1, description="per-head value width")


QuantRole = Literal["attention", "mlp", "experts", "lm_head"]
QUANT_ROLES: tuple[str, ...] = get_args(QuantRole)


class QatConfig(BaseModel):
    """Quantization-aware training: the chosen matmuls run on quantized operands (through qwix), so the
    weights learn to live with the rounding. Scales are per channel, from each operand's absolute max."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["int8", "fp8"] = Field(
        "int8", description="int8: weights and activations int8; fp8: e4m3 forward, e5m2 gradients"
    )
    layers: tuple[QuantRole, ...] = Field(
        ("attention", "mlp"),
        description="matmuls to quantize; the rest (by default the LM head) stay in the compute dtype. "
        "Embeddings are lookups and the MoE router always runs in float32: neither is ever quantized",
    )


class WeightQuantConfig(BaseModel):
    """Post-training weight-only quantization for serving: weights stored as int8/int4 with scales,
    dequantized inside each matmul. Set by `tessera quantize`; a model with it is not trained further."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["int8-weight-only", "int4-weight-only"] = Field(description="the storage type of the weights")
    group_size: int | None = Field(
        None, ge=1, description="None: one scale per output channel; else per group of this many input rows"
    )
    layers: tuple[QuantRole, ...] = Field(("attention", "mlp", "experts"), description="weights to quantize")

    @property
    def qtype(self) -> str:
        return "int8" if self.method == "int8-weight-only" else "int4"


class LoraConfig(BaseModel):
    """Low-rank adapters (model/lora.py): the base weights stay frozen, only the adapters learn."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, description="rank r of each adapter (A: inputs x r, B: r x outputs)")
    alpha: float = Field(16.0, gt=0, description="the adapters' output is scaled by alpha / rank")
    targets: tuple[QuantRole, ...] = Field(
        ("attention", "mlp"), min_length=1, description="weights to adapt, by role: attention, mlp, experts, lm_head"
    )


class RopeScaling(BaseModel):
    """Llama 3.1's stretch of the rotary frequencies to a longer context: wavelengths shorter than the original
    context / high_freq_factor are kept, those longer than original context / low_freq_factor are divided by
    `factor`, and the band between is interpolated smoothly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["llama3"] = Field("llama3", description="the scaling rule (only Llama 3.1's so far)")
    factor: float = Field(8.0, ge=1, description="how much the long wavelengths are stretched")
    low_freq_factor: float = Field(1.0, gt=0, description="wavelengths above original/low_freq_factor are stretched")
    high_freq_factor: float = Field(4.0, gt=0, description="wavelengths below original/high_freq_factor are kept")
    original_max_seq_len: int = Field(8192, ge=1, description="the context the frequencies were trained for")

    @model_validator(mode="after")
    def _check_band(self) -> "RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                f"model.rope_scaling.low_freq_factor={self.low_freq_factor}"
            )
        return self


class VisionConfig(BaseModel):
    """A dual encoder's image tower (a vision transformer): the image cut into patches, each flattened and
    projected (one matmul), a class token and learned positions added, a norm, pre-norm blocks with bidirectional
    attention, and a final norm. Norm, MLP activation and biases follow the text tower's settings (model.*)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(224, ge=1, description="images are resized to image_size x image_size pixels")
    patch_size: int = Field(16, ge=1, description="side of the square patches (image_size must be a multiple)")
    channels: int = Field(3, ge=1, le=4, description="colour channels read from each image (3: RGB, 1: grey)")
    n_layers: int = Field(12, ge=1, description="transformer blocks of the image tower")
    d_model: int = Field(768, ge=1, description="width of the image tower's residual stream")
    n_heads: int = Field(12, ge=1, description="attention heads of the image tower")
    d_ff: int = Field(3072, ge=1, description="hidden width of the image tower's MLP")
    pooling: Literal["class", "mean"] = Field(
        "class", description="class: the class token's final state (CLIP); mean: the mean over patches (no class token)"
    )
    # Pixels in [0, 1] are normalised per channel, (x - mean) / std, before the patch embedding. 0.5 and 0.5 map
    # them to [-1, 1]; an imported CLIP keeps the statistics its image processor used (OpenAI's for CLIP).
    pixel_mean: tuple[float, ...] = Field((0.5,), description="per-channel mean subtracted (one value: every channel)")
    pixel_std: tuple[float, ...] = Field((0.5,), description="per-channel standard deviation divided by")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.channels

    @property
    def tokens(self) -> int:
        """Sequence length of the image tower: the patches, and the class token if it has one."""
        return self.patches + (self.pooling == "class")

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.clip.vision.image_size={self.image_size} is not a multiple of model.clip.vision.patch_size="
                f"{self.patch_size}; images are cut into whole patches (e.g. image_size="
                f"{max(self.patch_size, self.image_size // self.patch_size * self.patch_size)})"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"model.clip.vision.d_model={self.d_model} must be divisible by model.clip.vision.n_heads="
                             f"{self.n_heads}")
        for name, values in (("pixel_mean", self.pixel_mean), ("pixel_std", self.pixel_std)):
            if len(values) not in (1, self.channels):
                raise ValueError(f"model.clip.vision.{name} has {len(values)} values; give one, or one per channel "
                                 f"(model.clip.vision.channels={self.channels})")
        if min(self.pixel_std) <= 0:
            raise ValueError(f"model.clip.vision.pixel_std={list(self.pixel_std)} must be positive")
        return self


class ClipConfig(BaseModel):
    """A CLIP-style dual encoder: the model's own transformer settings describe the text tower (pooled at each
    caption's end token), `vision` the image tower; both are projected to `embed_dim` and L2-normalised, and a
    learned temperature (with a bias for the sigmoid loss) scales their cosine similarities."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embed_dim: int = Field(512, ge=1, description="width of the shared image-text embedding space")
    vision: VisionConfig = Field(default_factory=VisionConfig, description="the image tower")
    loss: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="softmax: CLIP's symmetric InfoNCE over the global batch; sigmoid: SigLIP's pairwise "
        "loss (adds a learned bias)"
    )


class ModelConfig(BaseModel):
    """A transformer's shape and switches: GPT-2, Llama, BERT and the MoE models are settings of them.

    It holds no dtypes: the precision policy (model.precision.Precision) is chosen by the
    experiment and applied when the model is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("custom", description="the preset's name (set by `model: NAME`)")
    architecture: Literal["decoder", "encoder"] = Field(
        "decoder", description="decoder: causal attention (next-token); encoder: bidirectional (masked-token)"
    )
    n_layers: int = Field(4, ge=1, description="transformer blocks")
    d_model: int = Field(256, ge=1, description="width of the residual stream")
    n_heads: int = Field(4, ge=1, description="attention (query) heads")
    n_kv_heads: int | None = Field(None, ge=1, description="None means n_heads (plain multi-head attention)")
    head_dim: int | None = Field(None, ge=1, description="None means d_model // n_heads")
    d_ff: int = Field(1024, ge=1, description="hidden width of the dense MLP")
    vocab_size: int = Field(512, ge=2, description="rows of the embedding table; at least the tokenizer's tokens")
    max_seq_len: int = Field(1024, ge=1, description="the longest context (learned positions have this many rows)")

    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="RMSNorm (Llama) or LayerNorm (GPT-2, BERT)")
    norm_eps: float = Field(1e-5, gt=0, description="added to the variance in every norm")
    norm_position: Literal["pre", "post"] = Field(
        "pre", description="pre: x + f(norm(x)) and a final norm (GPT-2, Llama); post: norm(x + f(x)), with the "
        "embeddings normalised and no final norm (BERT)"
    )
    mlp: Literal["swiglu", "gelu", "gelu_exact", "quick_gelu"] = Field(
        "swiglu", description="SwiGLU (three matrices, Llama), or two with GELU: tanh-approximated (GPT-2), exact "
        "erf (BERT), or x*sigmoid(1.702x) (OpenAI CLIP's QuickGELU)"
    )
    position: Literal["rope", "learned"] = Field("rope", description="rotary positions, or a learned table")
    rope_theta: float = Field(10000.0, gt=0, description="base of the rotary frequencies")
    rope_scaling: RopeScaling | None = Field(None, description="None: the plain frequencies; else Llama 3.1's stretch")
    qk_norm: bool = Field(False, description="normalise each query and key head (model.norm's kind) before the "
                          "rotation (Qwen3)")
    token_types: int = Field(0, ge=0, description="rows of a token-type table added to the embeddings (BERT: 2); "
                             "every token is type 0")
    tie_embeddings: bool = Field(False, description="the LM head is the embedding table")
    qkv_bias: bool = Field(False, description="biases on the query, key and value projections (GPT-2, BERT, Qwen2)")
    attention_out_bias: bool = Field(False, description="a bias on the attention output projection (GPT-2, BERT)")
    mlp_bias: bool = Field(False, description="biases on the MLP's matrices (GPT-2, BERT)")
    head_transform: bool = Field(
        False, description="encoders: dense -> GELU -> LayerNorm before the tied head, and a bias on the vocabulary "
        "(BERT's masked-LM head)"
    )

    attention: AttentionImpl = Field(
        "auto", description="the attention implementation: auto (TPU splash, GPU blockwise, CPU dense or blockwise "
        "by length), dense (the reference), blockwise (flash-style, plain JAX), splash (TPU), cudnn (GPU)"
    )
    attention_block: int = Field(512, ge=16, description="blockwise attention's query and key block length")
    sliding_window: int | None = Field(
        None, ge=1, description="decoders: each token attends to at most this many latest tokens, itself included "
        "(Mistral); None: the whole context"
    )
    remat: RematPolicy = Field(
        "none", description="what a layer saves for the backward pass: everything, only the matmul outputs, or its input"
    )
    scan_layers: bool = Field(True, description="run the stacked layers in one lax.scan (false: a Python loop)")
    init_std: float = Field(0.02, gt=0, description="standard deviation of the normal initialisation")
    moe: MoeConfig | None = Field(None, description="None: every layer has a dense MLP")
    mla: MlaConfig | None = Field(None, description="None: grouped-query attention; else latent attention")
    qat: QatConfig | None = Field(None, description="quantization-aware training of the dense matmuls")
    weight_quant: WeightQuantConfig | None = Field(None, description="weight-only quantized (serving) model")
    lora: LoraConfig | None = Field(None, description="low-rank adapters: only they are trained (on a weight-only "
                                    "quantized base: QLoRA)")
    score_head: bool = Field(False, description="a scalar score per sequence, read at its end token (reward and "
                             "value models), beside the LM head")
    clip: ClipConfig | None = Field(None, description="a CLIP-style dual encoder: this transformer is its text tower "
                                    "(no LM head), beside the image tower described here")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of queries and keys (what the scores contract over)."""
        return self.mla.nope_head_dim + self.mla.rope_head_dim if self.mla else self.dim_per_head

    @property
    def v_head_dim(self) -> int:
        return self.mla.v_head_dim if self.mla else self.dim_per_head

    @property
    def causal(self) -> bool:
        return self.architecture == "decoder"

    @property
    def d_expert(self) -> int:
        return (self.moe.d_expert or self.d_ff) if self.moe else self.d_ff

    @property
    def n_dense_lead(self) -> int:
        """Layers before the first MoE group (all of them without MoE)."""
        return self.moe.first_dense_layers if self.moe else self.n_layers

    @property
    def n_moe_groups(self) -> int:
        """Repeats of (every-1 dense layers, then one MoE layer) after the dense lead."""
        return (self.n_layers - self.moe.first_dense_layers) // self.moe.every if self.moe else 0

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_groups

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.kv_heads} "
                "(each key/value head serves a whole group of query heads)"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}, "
                "or set model.head_dim explicitly"
            )
        if self.head_transform and self.causal:
            raise ValueError("model.head_transform is BERT's masked-LM head; a decoder has a plain LM head")
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError("model.rope_scaling stretches rotary positions; it needs model.position='rope'")
        if self.qk_norm and self.mla is not None:
            raise ValueError("model.qk_norm normalises grouped-query heads; latent attention (model.mla) has its own norms")
        if self.sliding_window is not None and not self.causal:
            raise ValueError("model.sliding_window limits how far back a decoder looks; an encoder has no window")
        if self.mla is not None and (self.position != "rope" or self.mla.rope_head_dim % 2):
            raise ValueError("model.mla needs model.position='rope' and an even model.mla.rope_head_dim")
        if self.mla is None and self.position == "rope" and self.dim_per_head % 2:
            raise ValueError(f"rotary positions need an even head dimension, got {self.dim_per_head}")
        if self.moe is not None:
            self._check_moe(self.moe)
        if self.clip is not None:
            self._check_clip()
        if self.qat is not None and "experts" in self.qat.layers:
            raise ValueError(
                "model.qat.layers may not include 'experts': the routed experts' grouped matmul (ragged_dot) has no "
                "quantized-training path here; quantize attention, mlp and lm_head"
            )
        if self.lora is not None and "lm_head" in self.lora.targets and self.tie_embeddings:
            raise ValueError("model.lora.targets includes 'lm_head', but with model.tie_embeddings the head is the "
                             "embedding table; drop 'lm_head' or untie the embeddings")
        if self.qat is not None and self.weight_quant is not None:
            raise ValueError("model.qat and model.weight_quant exclude each other: a weight-quantized model is for serving")
        if self.weight_quant is not None and "lm_head" in self.weight_quant.layers and self.tie_embeddings:
            raise ValueError(
                "model.weight_quant.layers includes 'lm_head', but with model.tie_embeddings the head is the "
                "embedding table, a lookup that is not quantized; drop 'lm_head'"
            )
        return self

    def _check_clip(self) -> None:
        others = {"moe": self.moe, "mla": self.mla, "lora": self.lora, "qat": self.qat,
                  "weight_quant": self.weight_quant, "score_head": self.score_head or None,
                  "head_transform": self.head_transform or None}
        if set_ := [k for k, v in others.items() if v is not None]:
            raise ValueError(f"model.clip (a dual encoder) does not combine with model.{set_[0]}; drop one of them")
        if self.norm_position != "pre":
            raise ValueError("model.clip's towers are pre-norm; set model.norm_position=pre")

    def _check_moe(self, moe: MoeConfig) -> None:
        if moe.top_k > moe.num_experts:
            raise ValueError(
                f"model.moe.top_k={moe.top_k} exceeds model.moe.num_experts={moe.num_experts}; "
                "a token can be sent to at most every expert once"
            )
        rest = self.n_layers - moe.first_dense_layers
        if rest <= 0 or rest % moe.every:
            raise ValueError(
                f"model.n_layers={self.n_layers} minus model.moe.first_dense_layers={moe.first_dense_layers} "
                f"must be a positive multiple of model.moe.every={moe.every}"
            )
        if self.mlp_bias:
            raise ValueError("model.mlp_bias is not supported with model.moe (experts have no biases); set it false")

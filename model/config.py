"""The model's schema: every shape and switch a decoder needs, validated at load."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "save_dots"]


class ModelConfig(BaseModel):
    """A decoder-only transformer. GPT-2 and Llama are two settings of the same switches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    n_layers: int = Field(4, ge=1)
    d_model: int = Field(256, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="None means n_heads (plain multi-head attention)")
    head_dim: int | None = Field(None, ge=1, description="None means d_model // n_heads")
    d_ff: int = Field(1024, ge=1)
    vocab_size: int = Field(512, ge=2)
    max_seq_len: int = Field(1024, ge=1)

    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = Field(1e-5, gt=0)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = Field(10000.0, gt=0)
    tie_embeddings: bool = False
    use_bias: bool = False

    param_dtype: DType = "float32"
    dtype: DType = "float32"
    remat: RematPolicy = "none"
    scan_layers: bool = True
    init_std: float = Field(0.02, gt=0)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

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
        if self.position == "rope" and self.dim_per_head % 2:
            raise ValueError(f"rotary positions need an even head dimension, got {self.dim_per_head}")
        return self

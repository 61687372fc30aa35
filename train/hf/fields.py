"""What every Hugging Face architecture shares: the class table, the refusal error, the `Architecture` record
(train/hf/architectures.py lists them), and the config.json fields common to the decoders."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model.config import ModelConfig, RopeScaling
from train.config import ConfigError
from train.hf import mapping as m

# The class each model_type is read as and written as.
HF_CLASSES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM",
    "clip": "CLIPModel",
}


class HfFormatError(ConfigError):
    """A Hugging Face config or checkpoint Tessera cannot represent exactly; the message names the field."""


def refuse(field: str, value: Any, why: str) -> HfFormatError:
    return HfFormatError(f"config.json {field}={value!r} is not supported: {why}")


@dataclass(frozen=True)
class Stack:
    path: str  # the stacked module in Tessera's parameter tree ("" for the model's own parameters)
    hf_layers: tuple[int, ...] | None  # the HF layer index of each stacked position; None: not stacked
    moe: bool = False
    tower: str = ""  # a dual encoder's "text" or "vision" tower


def transformer_stacks(cfg: ModelConfig) -> list[Stack]:
    """Where each HF layer of a transformer lives: the dense lead in `blocks`, then per MoE group its every-1 dense
    layers and the MoE layer (`moe_groups`), each stacked over groups."""
    out = [Stack("blocks", tuple(range(cfg.n_dense_lead)))] if cfg.n_dense_lead else []
    if cfg.n_moe_groups:
        every, lead, groups = cfg.moe.every, cfg.n_dense_lead, range(cfg.n_moe_groups)
        out += [Stack(f"moe_groups/dense/{j}", tuple(lead + g * every + j for g in groups)) for j in range(every - 1)]
        out.append(Stack("moe_groups/moe", tuple(lead + g * every + every - 1 for g in groups), moe=True))
    return out


@dataclass(frozen=True)
class Architecture:
    model_type: str
    prefix: str  # the base model's prefix in a task model's checkpoint
    probe: str  # a tensor every checkpoint of it has (without prefix): tells which prefix a file uses
    read_config: Callable[[dict], dict]  # config.json -> ModelConfig fields
    write_config: Callable[[ModelConfig], dict]  # the inverse; refuses what the class cannot express
    global_rules: Callable[[ModelConfig], list[m.Rule]]
    layer_rules: Callable[[ModelConfig, Stack, str], list[m.Rule]]  # (cfg, the layer's stack, expert layout)
    ignored: str = r"$^"  # tensors a checkpoint may hold that carry nothing Tessera uses (buffers, unused heads)
    expert_layouts: tuple[str, ...] = ()  # MoE: layouts the reader accepts, the first one written
    stacks: Callable[[ModelConfig], list[Stack]] = transformer_stacks

    @property
    def hf_class(self) -> str:
        return HF_CLASSES[self.model_type]

    def is_ignored(self, name: str) -> bool:
        return re.search(self.ignored, name) is not None


# ---------------------------------------------------------------- config fields


def required(hf: dict, field: str):
    if hf.get(field) is None:
        raise HfFormatError(f"config.json has no {field}; it is needed to build the model")
    return hf[field]


def rope_fields(hf: dict) -> dict:
    """rope_theta and rope_scaling, from either spelling: 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": None}
    if kind != "llama3":
        raise refuse("rope_scaling.rope_type", kind, "only 'default' and 'llama3' rotary scaling are implemented")
    return {"rope_theta": float(theta), "rope_scaling": RopeScaling(
        factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
        high_freq_factor=scaling["high_freq_factor"], original_max_seq_len=scaling["original_max_position_embeddings"],
    )}


def rope_out(cfg: ModelConfig) -> dict:
    """Written in the 4.x spelling, which 5.x reads too."""
    s = cfg.rope_scaling
    scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len,
    }
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling}


def no_dropout(hf: dict, field: str) -> None:
    if hf.get(field):
        raise refuse(field, hf[field], "Tessera trains without dropout; set it to 0.0")


def decoder_fields(hf: dict, tie_default: bool) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", hf["hidden_act"], "these decoders are built with SwiGLU (silu)")
    no_dropout(hf, "attention_dropout")
    d, h = required(hf, "hidden_size"), required(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or d // h
    return {
        "architecture": "decoder", "n_layers": required(hf, "num_hidden_layers"), "d_model": d, "n_heads": h,
        "n_kv_heads": hf.get("num_key_value_heads") or h, "head_dim": None if head_dim * h == d else head_dim,
        "d_ff": required(hf, "intermediate_size"), "vocab_size": required(hf, "vocab_size"),
        "max_seq_len": required(hf, "max_position_embeddings"), "norm": "rmsnorm", "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "mlp": "swiglu", "position": "rope", "tie_embeddings": bool(hf.get("tie_word_embeddings", tie_default)),
        **rope_fields(hf),
    }


def decoder_config(cfg: ModelConfig, arch: str, extra: dict) -> dict:
    """A decoder's config.json; refuses the features the class lacks (checked by each class before this)."""
    if cfg.architecture != "decoder" or cfg.position != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
        raise HfFormatError(f"{HF_CLASSES[arch]} needs a rotary, RMSNorm, SwiGLU decoder; this model is "
                            f"a {cfg.architecture} with {cfg.position} positions, {cfg.norm} and {cfg.mlp}")
    if cfg.norm_position != "pre" or cfg.token_types or cfg.mla is not None:
        raise HfFormatError(f"{HF_CLASSES[arch]} cannot express post-norm blocks, token types or "
                            "latent attention")
    return {
        "architectures": [HF_CLASSES[arch]], "model_type": arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        **rope_out(cfg), **extra,
    }


def lacks(cfg: ModelConfig, arch: str, **features: bool) -> None:
    """Refuse the first feature set in `cfg` that the class has no place for."""
    for name, present in features.items():
        if present:
            raise HfFormatError(f"{HF_CLASSES[arch]} has no {name}; this model has it (model.{name})")

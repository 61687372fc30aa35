"""The Hugging Face architectures Tessera reads and writes: per class, how its config.json maps onto a
ModelConfig and back, and the table of tensor rules (train/hf/mapping.py) for its weights.

Names use `{p}` for the base model's prefix (`model.`, `transformer.`, `bert.`; empty in checkpoints saved from
the bare base model), `{i}` for the HF layer index and `{e}` for an expert.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model.config import ModelConfig, MoeConfig, RopeScaling
from train.config import ConfigError
from train.hf import mapping as m


class HfFormatError(ConfigError):
    """A Hugging Face config or checkpoint Tessera cannot represent exactly; the message names the field."""


def refuse(field: str, value: Any, why: str) -> HfFormatError:
    return HfFormatError(f"config.json {field}={value!r} is not supported: {why}")


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    model_type: str
    prefix: str  # the base model's prefix in a task model's checkpoint
    probe: str  # a tensor every checkpoint of it has (without prefix): tells which prefix a file uses
    read_config: Callable[[dict], dict]  # config.json -> ModelConfig fields
    write_config: Callable[[ModelConfig], dict]  # the inverse; refuses what the class cannot express
    global_rules: Callable[[ModelConfig], list[m.Rule]]
    layer_rules: Callable[[ModelConfig, bool, str], list[m.Rule]]  # (cfg, MoE layer?, expert layout)
    ignored: str = r"$^"  # tensors a checkpoint may hold that carry nothing Tessera uses (buffers, unused heads)
    expert_layouts: tuple[str, ...] = ()  # MoE: layouts the reader accepts, the first one written

    def is_ignored(self, name: str) -> bool:
        return re.search(self.ignored, name) is not None


# ---------------------------------------------------------------- config fields


def _get(hf: dict, field: str):
    if hf.get(field) is None:
        raise HfFormatError(f"config.json has no {field}; it is needed to build the model")
    return hf[field]


def _rope(hf: dict) -> dict:
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


def _rope_out(cfg: ModelConfig) -> dict:
    """Written in the 4.x spelling, which 5.x reads too."""
    s = cfg.rope_scaling
    scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len,
    }
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling}


def _no_dropout(hf: dict, field: str) -> None:
    if hf.get(field):
        raise refuse(field, hf[field], "Tessera trains without dropout; set it to 0.0")


def _decoder(hf: dict, tie_default: bool) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", hf["hidden_act"], "these decoders are built with SwiGLU (silu)")
    _no_dropout(hf, "attention_dropout")
    d, h = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or d // h
    return {
        "architecture": "decoder", "n_layers": _get(hf, "num_hidden_layers"), "d_model": d, "n_heads": h,
        "n_kv_heads": hf.get("num_key_value_heads") or h, "head_dim": None if head_dim * h == d else head_dim,
        "d_ff": _get(hf, "intermediate_size"), "vocab_size": _get(hf, "vocab_size"),
        "max_seq_len": _get(hf, "max_position_embeddings"), "norm": "rmsnorm", "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "mlp": "swiglu", "position": "rope", "tie_embeddings": bool(hf.get("tie_word_embeddings", tie_default)),
        **_rope(hf),
    }


def _decoder_out(cfg: ModelConfig, arch: str, extra: dict) -> dict:
    """A decoder's config.json; refuses the features the class lacks (checked by each class before this)."""
    if cfg.architecture != "decoder" or cfg.position != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
        raise HfFormatError(f"{ARCHITECTURES[arch].hf_class} needs a rotary, RMSNorm, SwiGLU decoder; this model is "
                            f"a {cfg.architecture} with {cfg.position} positions, {cfg.norm} and {cfg.mlp}")
    if cfg.norm_position != "pre" or cfg.token_types or cfg.mla is not None:
        raise HfFormatError(f"{ARCHITECTURES[arch].hf_class} cannot express post-norm blocks, token types or "
                            "latent attention")
    return {
        "architectures": [ARCHITECTURES[arch].hf_class], "model_type": ARCHITECTURES[arch].model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        **_rope_out(cfg), **extra,
    }


def _lacks(cfg: ModelConfig, arch: str, **features: bool) -> None:
    """Refuse the first feature set in `cfg` that the class has no place for."""
    for name, present in features.items():
        if present:
            raise HfFormatError(f"{ARCHITECTURES[arch].hf_class} has no {name}; this model has it (model.{name})")


# ---------------------------------------------------------------- the Llama family


def _llama_like_globals(cfg: ModelConfig) -> list[m.Rule]:
    rules = [m.same("embed/table", "{p}embed_tokens.weight"), m.same("final_norm/scale", "{p}norm.weight")]
    return rules if cfg.tie_embeddings else rules + [m.transposed("head", "lm_head.weight")]


def _llama_like_layer(cfg: ModelConfig, moe: bool, layout: str) -> list[m.Rule]:
    h, kv, hd = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    a = "{p}layers.{i}.self_attn."
    rules = [
        m.same("attn_norm/scale", "{p}layers.{i}.input_layernorm.weight"),
        m.same("mlp_norm/scale", "{p}layers.{i}.post_attention_layernorm.weight"),
        m.heads_in("attn/wq", a + "q_proj.weight", h, hd),
        m.heads_in("attn/wk", a + "k_proj.weight", kv, hd),
        m.heads_in("attn/wv", a + "v_proj.weight", kv, hd),
        m.heads_out("attn/wo", a + "o_proj.weight", h, hd),
    ]
    if cfg.qkv_bias:
        rules += [m.head_bias("attn/bq", a + "q_proj.bias", h, hd), m.head_bias("attn/bk", a + "k_proj.bias", kv, hd),
                  m.head_bias("attn/bv", a + "v_proj.bias", kv, hd)]
    if cfg.attention_out_bias:
        rules.append(m.same("attn/bo", a + "o_proj.bias"))
    if cfg.qk_norm:
        rules += [m.same("attn/q_norm/scale", a + "q_norm.weight"), m.same("attn/k_norm/scale", a + "k_norm.weight")]
    if not moe:
        return rules + [m.transposed("mlp/wg", "{p}layers.{i}.mlp.gate_proj.weight"),
                        m.transposed("mlp/wi", "{p}layers.{i}.mlp.up_proj.weight"),
                        m.transposed("mlp/wo", "{p}layers.{i}.mlp.down_proj.weight")]
    if layout == "per-expert":  # Mixtral as published: block_sparse_moe.experts.E.w1 (gate), w3 (up), w2 (down)
        x = "{p}layers.{i}.block_sparse_moe."
        return rules + [m.transposed("mlp/router", x + "gate.weight"),
                        m.experts_each("mlp/wg", x + "experts.{e}.w1.weight"),
                        m.experts_each("mlp/wi", x + "experts.{e}.w3.weight"),
                        m.experts_each("mlp/wo", x + "experts.{e}.w2.weight")]
    x = "{p}layers.{i}.mlp."  # the fused layout of transformers 5 (gate rows first in gate_up_proj)
    return rules + [m.transposed("mlp/router", x + "gate.weight"),
                    m.experts_fused_gate_up(("mlp/wg", "mlp/wi"), x + "experts.gate_up_proj"),
                    m.experts_fused_down("mlp/wo", x + "experts.down_proj")]


def _llama_read(hf: dict) -> dict:
    if hf.get("mlp_bias"):
        raise refuse("mlp_bias", True, "Tessera's SwiGLU has no bias on its gate projection")
    bias = bool(hf.get("attention_bias"))
    return {**_decoder(hf, False), "qkv_bias": bias, "attention_out_bias": bias}


def _llama_write(cfg: ModelConfig) -> dict:
    _lacks(cfg, "llama", sliding_window=cfg.sliding_window is not None, qk_norm=cfg.qk_norm, moe=cfg.moe is not None,
           mlp_bias=cfg.mlp_bias)
    if cfg.qkv_bias != cfg.attention_out_bias:
        raise HfFormatError("LlamaForCausalLM has one attention_bias for q, k, v and o; model.qkv_bias and "
                            "model.attention_out_bias differ (Qwen2ForCausalLM has q/k/v biases alone)")
    return _decoder_out(cfg, "llama", {"attention_bias": cfg.qkv_bias, "mlp_bias": False})


def _mistral_read(hf: dict) -> dict:
    return {**_decoder(hf, False), "sliding_window": hf.get("sliding_window")}


def _mistral_write(cfg: ModelConfig) -> dict:
    _lacks(cfg, "mistral", qk_norm=cfg.qk_norm, moe=cfg.moe is not None, qkv_bias=cfg.qkv_bias,
           attention_out_bias=cfg.attention_out_bias, mlp_bias=cfg.mlp_bias)
    return _decoder_out(cfg, "mistral", {"sliding_window": cfg.sliding_window})


def _qwen_window(hf: dict) -> None:
    if hf.get("use_sliding_window"):
        raise refuse("use_sliding_window", True, "Qwen's per-layer sliding windows are not implemented")


def _qwen2_read(hf: dict) -> dict:
    _qwen_window(hf)
    return {**_decoder(hf, False), "qkv_bias": True}


def _qwen2_write(cfg: ModelConfig) -> dict:
    _lacks(cfg, "qwen2", sliding_window=cfg.sliding_window is not None, qk_norm=cfg.qk_norm, moe=cfg.moe is not None,
           attention_out_bias=cfg.attention_out_bias, mlp_bias=cfg.mlp_bias)
    if not cfg.qkv_bias:
        raise HfFormatError("Qwen2ForCausalLM always has q/k/v biases; this model has none (export it as Llama)")
    return _decoder_out(cfg, "qwen2", {"use_sliding_window": False})


def _qwen3_read(hf: dict) -> dict:
    _qwen_window(hf)
    bias = bool(hf.get("attention_bias"))
    return {**_decoder(hf, False), "qk_norm": True, "qkv_bias": bias, "attention_out_bias": bias}


def _qwen3_write(cfg: ModelConfig) -> dict:
    _lacks(cfg, "qwen3", sliding_window=cfg.sliding_window is not None, moe=cfg.moe is not None, mlp_bias=cfg.mlp_bias)
    if not cfg.qk_norm or cfg.qkv_bias != cfg.attention_out_bias:
        raise HfFormatError("Qwen3ForCausalLM needs model.qk_norm and one attention bias switch for q, k, v and o")
    return _decoder_out(cfg, "qwen3", {"attention_bias": cfg.qkv_bias, "use_sliding_window": False})


def _mixtral_read(hf: dict) -> dict:
    _no_dropout(hf, "router_jitter_noise")
    moe = MoeConfig(num_experts=_get(hf, "num_local_experts"), top_k=_get(hf, "num_experts_per_tok"),
                    score="softmax", renormalize=True, dispatch="dropless",
                    aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    return {**_decoder(hf, False), "sliding_window": hf.get("sliding_window"), "moe": moe}


def _mixtral_write(cfg: ModelConfig) -> dict:
    _lacks(cfg, "mixtral", qk_norm=cfg.qk_norm, qkv_bias=cfg.qkv_bias, attention_out_bias=cfg.attention_out_bias)
    moe = cfg.moe
    if moe is None or moe.every != 1 or moe.first_dense_layers or moe.num_shared_experts or moe.score != "softmax" \
            or not moe.renormalize or moe.d_expert not in (None, cfg.d_ff):
        raise HfFormatError("MixtralForCausalLM needs every layer MoE with softmax top-k routing renormalised over "
                            "the chosen experts, no shared experts and experts model.d_ff wide")
    return _decoder_out(cfg, "mixtral", {
        "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "sliding_window": cfg.sliding_window,
        "router_aux_loss_coef": moe.aux_loss_coef, "router_jitter_noise": 0.0, "output_router_logits": False,
    })


# ---------------------------------------------------------------- GPT-2


def _gpt2_read(hf: dict) -> dict:
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise refuse("activation_function", hf["activation_function"], "GPT-2 here uses the tanh GELU (gelu_new)")
    for field, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(field, ok) != ok:
            raise refuse(field, hf[field], f"only {ok} is implemented")
    if hf.get("tie_word_embeddings") is False:
        raise refuse("tie_word_embeddings", False, "GPT-2's LM head is its embedding table")
    d = _get(hf, "n_embd")
    return {
        "architecture": "decoder", "n_layers": _get(hf, "n_layer"), "d_model": d, "n_heads": _get(hf, "n_head"),
        "d_ff": hf.get("n_inner") or 4 * d, "vocab_size": _get(hf, "vocab_size"), "max_seq_len": _get(hf, "n_positions"),
        "norm": "layernorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "mlp": "gelu", "position": "learned",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "qkv_bias": True, "attention_out_bias": True,
        "mlp_bias": True,
    }


def _gpt2_write(cfg: ModelConfig) -> dict:
    if (cfg.architecture, cfg.position, cfg.norm, cfg.mlp, cfg.norm_position) != \
            ("decoder", "learned", "layernorm", "gelu", "pre") or not cfg.tie_embeddings:
        raise HfFormatError("GPT2LMHeadModel needs a pre-LayerNorm decoder with learned positions, the tanh GELU "
                            "and tied embeddings")
    _lacks(cfg, "gpt2", sliding_window=cfg.sliding_window is not None, qk_norm=cfg.qk_norm, moe=cfg.moe is not None,
           n_kv_heads=cfg.kv_heads != cfg.n_heads, head_dim=cfg.dim_per_head * cfg.n_heads != cfg.d_model,
           token_types=bool(cfg.token_types))
    if not (cfg.qkv_bias and cfg.attention_out_bias and cfg.mlp_bias):
        raise HfFormatError("GPT2LMHeadModel has biases on every projection; set model.qkv_bias, "
                            "model.attention_out_bias and model.mlp_bias")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
        "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new", "tie_word_embeddings": True,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }


def _gpt2_globals(cfg: ModelConfig) -> list[m.Rule]:
    return [m.same("embed/table", "{p}wte.weight"), m.same("pos_embed", "{p}wpe.weight"),
            m.same("final_norm/scale", "{p}ln_f.weight"), m.same("final_norm/bias", "{p}ln_f.bias")]


def _gpt2_layer(cfg: ModelConfig, moe: bool, layout: str) -> list[m.Rule]:
    h, hd, x = cfg.n_heads, cfg.dim_per_head, "{p}h.{i}."
    return [  # Conv1D weights are stored [in, out] already: no transposes
        m.same("attn_norm/scale", x + "ln_1.weight"), m.same("attn_norm/bias", x + "ln_1.bias"),
        m.fused_qkv(("attn/wq", "attn/wk", "attn/wv"), x + "attn.c_attn.weight", h, hd, bias=False),
        m.fused_qkv(("attn/bq", "attn/bk", "attn/bv"), x + "attn.c_attn.bias", h, hd, bias=True),
        m.conv1d_out("attn/wo", x + "attn.c_proj.weight", h, hd), m.same("attn/bo", x + "attn.c_proj.bias"),
        m.same("mlp_norm/scale", x + "ln_2.weight"), m.same("mlp_norm/bias", x + "ln_2.bias"),
        m.same("mlp/wi", x + "mlp.c_fc.weight"), m.same("mlp/bi", x + "mlp.c_fc.bias"),
        m.same("mlp/wo", x + "mlp.c_proj.weight"), m.same("mlp/bo", x + "mlp.c_proj.bias"),
    ]


# ---------------------------------------------------------------- BERT


def _bert_read(hf: dict) -> dict:
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new"):
        raise refuse("hidden_act", act, "BERT here uses the exact GELU ('gelu') or the tanh one ('gelu_new')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise refuse("position_embedding_type", hf["position_embedding_type"], "only absolute positions")
    if hf.get("is_decoder"):
        raise refuse("is_decoder", True, "BERT is read as a masked-LM encoder")
    if hf.get("tie_word_embeddings") is False:
        raise refuse("tie_word_embeddings", False, "BERT's masked-LM decoder is its embedding table")
    return {
        "architecture": "encoder", "n_layers": _get(hf, "num_hidden_layers"), "d_model": _get(hf, "hidden_size"),
        "n_heads": _get(hf, "num_attention_heads"), "d_ff": _get(hf, "intermediate_size"),
        "vocab_size": _get(hf, "vocab_size"), "max_seq_len": _get(hf, "max_position_embeddings"),
        "norm": "layernorm", "norm_eps": hf.get("layer_norm_eps", 1e-12), "norm_position": "post",
        "mlp": "gelu_exact" if act == "gelu" else "gelu", "position": "learned",
        "token_types": hf.get("type_vocab_size", 2), "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "qkv_bias": True, "attention_out_bias": True, "mlp_bias": True, "head_transform": True,
    }


def _bert_write(cfg: ModelConfig) -> dict:
    if (cfg.architecture, cfg.position, cfg.norm, cfg.norm_position) != ("encoder", "learned", "layernorm", "post") \
            or cfg.mlp == "swiglu" or not (cfg.head_transform and cfg.tie_embeddings):
        raise HfFormatError("BertForMaskedLM needs a post-LayerNorm encoder with learned positions, a GELU MLP and "
                            "the masked-LM head transform on tied embeddings")
    _lacks(cfg, "bert", moe=cfg.moe is not None, n_kv_heads=cfg.kv_heads != cfg.n_heads,
           head_dim=cfg.dim_per_head * cfg.n_heads != cfg.d_model, qk_norm=cfg.qk_norm,
           sliding_window=cfg.sliding_window is not None)
    if not cfg.token_types:
        raise HfFormatError("BertForMaskedLM adds a token-type embedding to every token; set model.token_types "
                            "(2 in BERT)")
    if not (cfg.qkv_bias and cfg.attention_out_bias and cfg.mlp_bias):
        raise HfFormatError("BertForMaskedLM has biases on every projection; set model.qkv_bias, "
                            "model.attention_out_bias and model.mlp_bias")
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len, "layer_norm_eps": cfg.norm_eps,
        "hidden_act": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new", "type_vocab_size": cfg.token_types,
        "position_embedding_type": "absolute", "tie_word_embeddings": True, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def _bert_globals(cfg: ModelConfig) -> list[m.Rule]:
    e, t = "{p}embeddings.", "cls.predictions.transform."
    rules = [
        m.same("embed/table", e + "word_embeddings.weight"), m.same("pos_embed", e + "position_embeddings.weight"),
        m.same("embed_norm/scale", e + "LayerNorm.weight"), m.same("embed_norm/bias", e + "LayerNorm.bias"),
        m.transposed("head_transform/w", t + "dense.weight"), m.same("head_transform/b", t + "dense.bias"),
        m.same("head_transform/norm/scale", t + "LayerNorm.weight"),
        m.same("head_transform/norm/bias", t + "LayerNorm.bias"), m.same("head_bias", "cls.predictions.bias"),
    ]
    return rules + ([m.same("token_type_embed", e + "token_type_embeddings.weight")] if cfg.token_types else [])


def _bert_layer(cfg: ModelConfig, moe: bool, layout: str) -> list[m.Rule]:
    h, hd = cfg.n_heads, cfg.dim_per_head
    x, a = "{p}encoder.layer.{i}.", "{p}encoder.layer.{i}.attention."
    return [
        m.heads_in("attn/wq", a + "self.query.weight", h, hd), m.head_bias("attn/bq", a + "self.query.bias", h, hd),
        m.heads_in("attn/wk", a + "self.key.weight", h, hd), m.head_bias("attn/bk", a + "self.key.bias", h, hd),
        m.heads_in("attn/wv", a + "self.value.weight", h, hd), m.head_bias("attn/bv", a + "self.value.bias", h, hd),
        m.heads_out("attn/wo", a + "output.dense.weight", h, hd), m.same("attn/bo", a + "output.dense.bias"),
        m.same("attn_norm/scale", a + "output.LayerNorm.weight"), m.same("attn_norm/bias", a + "output.LayerNorm.bias"),
        m.transposed("mlp/wi", x + "intermediate.dense.weight"), m.same("mlp/bi", x + "intermediate.dense.bias"),
        m.transposed("mlp/wo", x + "output.dense.weight"), m.same("mlp/bo", x + "output.dense.bias"),
        m.same("mlp_norm/scale", x + "output.LayerNorm.weight"), m.same("mlp_norm/bias", x + "output.LayerNorm.bias"),
    ]


_DECODER_BUFFERS = r"rotary_emb\.inv_freq$"
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaForCausalLM", "llama", "model.", "embed_tokens.weight", _llama_read, _llama_write,
                          _llama_like_globals, _llama_like_layer, _DECODER_BUFFERS),
    "mistral": Architecture("MistralForCausalLM", "mistral", "model.", "embed_tokens.weight", _mistral_read,
                            _mistral_write, _llama_like_globals, _llama_like_layer, _DECODER_BUFFERS),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2", "model.", "embed_tokens.weight", _qwen2_read, _qwen2_write,
                          _llama_like_globals, _llama_like_layer, _DECODER_BUFFERS),
    "qwen3": Architecture("Qwen3ForCausalLM", "qwen3", "model.", "embed_tokens.weight", _qwen3_read, _qwen3_write,
                          _llama_like_globals, _llama_like_layer, _DECODER_BUFFERS),
    "mixtral": Architecture("MixtralForCausalLM", "mixtral", "model.", "embed_tokens.weight", _mixtral_read,
                            _mixtral_write, _llama_like_globals, _llama_like_layer, _DECODER_BUFFERS,
                            expert_layouts=("per-expert", "fused")),
    # Old GPT-2 files keep the causal-mask buffers; the LM head is the tied embedding table.
    "gpt2": Architecture("GPT2LMHeadModel", "gpt2", "transformer.", "wte.weight", _gpt2_read, _gpt2_write,
                         _gpt2_globals, _gpt2_layer, r"\.attn\.(masked_)?bias$|^lm_head\.weight$"),
    # Pre-training checkpoints also hold the pooler and next-sentence head; the decoder is the tied table.
    "bert": Architecture("BertForMaskedLM", "bert", "bert.", "embeddings.word_embeddings.weight", _bert_read,
                         _bert_write, _bert_globals, _bert_layer,
                         r"pooler\.|seq_relationship|position_ids$|^cls\.predictions\.decoder\.(weight|bias)$"),
}


def architecture_of_config(hf: dict) -> Architecture:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise refuse("model_type", model_type, f"Tessera reads {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def architecture_for(cfg: ModelConfig) -> Architecture:
    """The HF class that expresses this model: decided by its features, as the import set them."""
    if cfg.architecture == "encoder":
        return ARCHITECTURES["bert"]
    if cfg.position == "learned":
        return ARCHITECTURES["gpt2"]
    if cfg.moe is not None:
        return ARCHITECTURES["mixtral"]
    if cfg.qk_norm:
        return ARCHITECTURES["qwen3"]
    if cfg.qkv_bias and not cfg.attention_out_bias:
        return ARCHITECTURES["qwen2"]
    if cfg.sliding_window is not None:
        return ARCHITECTURES["mistral"]
    return ARCHITECTURES["llama"]

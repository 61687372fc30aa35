"""The Llama family on Hugging Face: Llama, Mistral, Qwen2, Qwen3 and Mixtral share one tensor layout (Mixtral's
MLP is experts); each class differs in its config fields and which options it can express."""

from __future__ import annotations

from model.config import ModelConfig, MoeConfig
from train.hf import mapping as m
from train.hf.fields import HfFormatError, Stack, decoder_config, decoder_fields, lacks, no_dropout, refuse, required

def global_rules(cfg: ModelConfig) -> list[m.Rule]:
    rules = [m.same("embed/table", "{p}embed_tokens.weight"), m.same("final_norm/scale", "{p}norm.weight")]
    return rules if cfg.tie_embeddings else rules + [m.transposed("head", "lm_head.weight")]


def layer_rules(cfg: ModelConfig, stack: Stack, layout: str) -> list[m.Rule]:
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
    if not stack.moe:
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


def read_llama(hf: dict) -> dict:
    if hf.get("mlp_bias"):
        raise refuse("mlp_bias", True, "Tessera's SwiGLU has no bias on its gate projection")
    bias = bool(hf.get("attention_bias"))
    return {**decoder_fields(hf, False), "qkv_bias": bias, "attention_out_bias": bias}


def write_llama(cfg: ModelConfig) -> dict:
    lacks(cfg, "llama", sliding_window=cfg.sliding_window is not None, qk_norm=cfg.qk_norm, moe=cfg.moe is not None,
           mlp_bias=cfg.mlp_bias)
    if cfg.qkv_bias != cfg.attention_out_bias:
        raise HfFormatError("LlamaForCausalLM has one attention_bias for q, k, v and o; model.qkv_bias and "
                            "model.attention_out_bias differ (Qwen2ForCausalLM has q/k/v biases alone)")
    return decoder_config(cfg, "llama", {"attention_bias": cfg.qkv_bias, "mlp_bias": False})


def read_mistral(hf: dict) -> dict:
    return {**decoder_fields(hf, False), "sliding_window": hf.get("sliding_window")}


def write_mistral(cfg: ModelConfig) -> dict:
    lacks(cfg, "mistral", qk_norm=cfg.qk_norm, moe=cfg.moe is not None, qkv_bias=cfg.qkv_bias,
           attention_out_bias=cfg.attention_out_bias, mlp_bias=cfg.mlp_bias)
    return decoder_config(cfg, "mistral", {"sliding_window": cfg.sliding_window})


def _no_qwen_window(hf: dict) -> None:
    if hf.get("use_sliding_window"):
        raise refuse("use_sliding_window", True, "Qwen's per-layer sliding windows are not implemented")


def read_qwen2(hf: dict) -> dict:
    _no_qwen_window(hf)
    return {**decoder_fields(hf, False), "qkv_bias": True}


def write_qwen2(cfg: ModelConfig) -> dict:
    lacks(cfg, "qwen2", sliding_window=cfg.sliding_window is not None, qk_norm=cfg.qk_norm, moe=cfg.moe is not None,
           attention_out_bias=cfg.attention_out_bias, mlp_bias=cfg.mlp_bias)
    if not cfg.qkv_bias:
        raise HfFormatError("Qwen2ForCausalLM always has q/k/v biases; this model has none (export it as Llama)")
    return decoder_config(cfg, "qwen2", {"use_sliding_window": False})


def read_qwen3(hf: dict) -> dict:
    _no_qwen_window(hf)
    bias = bool(hf.get("attention_bias"))
    return {**decoder_fields(hf, False), "qk_norm": True, "qkv_bias": bias, "attention_out_bias": bias}


def write_qwen3(cfg: ModelConfig) -> dict:
    lacks(cfg, "qwen3", sliding_window=cfg.sliding_window is not None, moe=cfg.moe is not None, mlp_bias=cfg.mlp_bias)
    if not cfg.qk_norm or cfg.qkv_bias != cfg.attention_out_bias:
        raise HfFormatError("Qwen3ForCausalLM needs model.qk_norm and one attention bias switch for q, k, v and o")
    return decoder_config(cfg, "qwen3", {"attention_bias": cfg.qkv_bias, "use_sliding_window": False})


def read_mixtral(hf: dict) -> dict:
    no_dropout(hf, "router_jitter_noise")
    moe = MoeConfig(num_experts=required(hf, "num_local_experts"), top_k=required(hf, "num_experts_per_tok"),
                    score="softmax", renormalize=True, dispatch="dropless",
                    aux_loss_coef=hf.get("router_aux_loss_coef", 0.001))
    return {**decoder_fields(hf, False), "sliding_window": hf.get("sliding_window"), "moe": moe}


def write_mixtral(cfg: ModelConfig) -> dict:
    lacks(cfg, "mixtral", qk_norm=cfg.qk_norm, qkv_bias=cfg.qkv_bias, attention_out_bias=cfg.attention_out_bias)
    moe = cfg.moe
    if moe is None or moe.every != 1 or moe.first_dense_layers or moe.num_shared_experts or moe.score != "softmax" \
            or not moe.renormalize or moe.d_expert not in (None, cfg.d_ff):
        raise HfFormatError("MixtralForCausalLM needs every layer MoE with softmax top-k routing renormalised over "
                            "the chosen experts, no shared experts and experts model.d_ff wide")
    return decoder_config(cfg, "mixtral", {
        "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "sliding_window": cfg.sliding_window,
        "router_aux_loss_coef": moe.aux_loss_coef, "router_jitter_noise": 0.0, "output_router_logits": False,
    })

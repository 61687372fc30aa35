"""The Hugging Face architectures Tessera reads and writes: per class, how its config.json maps onto a
ModelConfig and back, and the table of tensor rules (train/hf/mapping.py) for its weights. The Llama family is in
train/hf/llama_family.py; GPT-2 and BERT are here, with the registry.

Names use `{p}` for the base model's prefix (`model.`, `transformer.`, `bert.`; empty in checkpoints saved from
the bare base model), `{i}` for the HF layer index and `{e}` for an expert.
"""

from __future__ import annotations

from model.config import ModelConfig
from train.hf import llama_family as llama
from train.hf import mapping as m
from train.hf.fields import Architecture, HfFormatError, Stack, lacks, no_dropout, refuse, required

__all__ = ["ARCHITECTURES", "Architecture", "HfFormatError", "architecture_for", "architecture_of_config"]


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
    d = required(hf, "n_embd")
    return {
        "architecture": "decoder", "n_layers": required(hf, "n_layer"), "d_model": d, "n_heads": required(hf, "n_head"),
        "d_ff": hf.get("n_inner") or 4 * d, "vocab_size": required(hf, "vocab_size"), "max_seq_len": required(hf, "n_positions"),
        "norm": "layernorm", "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "mlp": "gelu", "position": "learned",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "qkv_bias": True, "attention_out_bias": True,
        "mlp_bias": True,
    }


def _gpt2_write(cfg: ModelConfig) -> dict:
    if (cfg.architecture, cfg.position, cfg.norm, cfg.mlp, cfg.norm_position) != \
            ("decoder", "learned", "layernorm", "gelu", "pre") or not cfg.tie_embeddings:
        raise HfFormatError("GPT2LMHeadModel needs a pre-LayerNorm decoder with learned positions, the tanh GELU "
                            "and tied embeddings")
    lacks(cfg, "gpt2", sliding_window=cfg.sliding_window is not None, qk_norm=cfg.qk_norm, moe=cfg.moe is not None,
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


def _gpt2_layer(cfg: ModelConfig, stack: Stack, layout: str) -> list[m.Rule]:
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
        "architecture": "encoder", "n_layers": required(hf, "num_hidden_layers"), "d_model": required(hf, "hidden_size"),
        "n_heads": required(hf, "num_attention_heads"), "d_ff": required(hf, "intermediate_size"),
        "vocab_size": required(hf, "vocab_size"), "max_seq_len": required(hf, "max_position_embeddings"),
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
    lacks(cfg, "bert", moe=cfg.moe is not None, n_kv_heads=cfg.kv_heads != cfg.n_heads,
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


def biased_block(h: int, hd: int, q: str, k: str, v: str, out: str, attn_norm: str, fc1: str, fc2: str,
                 mlp_norm: str) -> list[m.Rule]:
    """A block with a bias on every projection and LayerNorms (BERT, CLIP): each argument names an HF module,
    whose `.weight` and `.bias` map onto Tessera's."""
    return [
        m.heads_in("attn/wq", q + ".weight", h, hd), m.head_bias("attn/bq", q + ".bias", h, hd),
        m.heads_in("attn/wk", k + ".weight", h, hd), m.head_bias("attn/bk", k + ".bias", h, hd),
        m.heads_in("attn/wv", v + ".weight", h, hd), m.head_bias("attn/bv", v + ".bias", h, hd),
        m.heads_out("attn/wo", out + ".weight", h, hd), m.same("attn/bo", out + ".bias"),
        m.same("attn_norm/scale", attn_norm + ".weight"), m.same("attn_norm/bias", attn_norm + ".bias"),
        m.transposed("mlp/wi", fc1 + ".weight"), m.same("mlp/bi", fc1 + ".bias"),
        m.transposed("mlp/wo", fc2 + ".weight"), m.same("mlp/bo", fc2 + ".bias"),
        m.same("mlp_norm/scale", mlp_norm + ".weight"), m.same("mlp_norm/bias", mlp_norm + ".bias"),
    ]


def _bert_layer(cfg: ModelConfig, stack: Stack, layout: str) -> list[m.Rule]:
    x, a = "{p}encoder.layer.{i}.", "{p}encoder.layer.{i}.attention."
    return biased_block(cfg.n_heads, cfg.dim_per_head, a + "self.query", a + "self.key", a + "self.value",
                        a + "output.dense", a + "output.LayerNorm", x + "intermediate.dense", x + "output.dense",
                        x + "output.LayerNorm")


# ---------------------------------------------------------------- CLIP

# CLIPImageProcessor's defaults: OpenAI's per-channel statistics of its training images.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CLIP_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact"}


def _clip_tower(hf: dict) -> dict:
    no_dropout(hf, "attention_dropout")
    no_dropout(hf, "dropout")
    return {"n_layers": required(hf, "num_hidden_layers"), "d_model": required(hf, "hidden_size"),
            "n_heads": required(hf, "num_attention_heads"), "d_ff": required(hf, "intermediate_size")}


def _clip_read(hf: dict) -> dict:
    text, vision = required(hf, "text_config"), required(hf, "vision_config")
    acts = {t: c.get("hidden_act", "quick_gelu") for t, c in (("text_config", text), ("vision_config", vision))}
    eps = {t: c.get("layer_norm_eps", 1e-5) for t, c in (("text_config", text), ("vision_config", vision))}
    for field, values in (("hidden_act", acts), ("layer_norm_eps", eps)):
        if len(set(values.values())) > 1:
            raise refuse(f"vision_config.{field}", values["vision_config"], f"Tessera's towers share one {field}; "
                         f"text_config has {values['text_config']!r}")
    if acts["text_config"] not in _CLIP_ACTIVATIONS:
        raise refuse("text_config.hidden_act", acts["text_config"], "CLIP here uses quick_gelu or the exact gelu")
    if text.get("eos_token_id") == 2:
        # transformers then pools at the largest token id (checkpoints from before eos_token_id was kept), which
        # is the end token only in CLIP's own vocabulary; Tessera pools at the end token.
        raise refuse("text_config.eos_token_id", 2, "set it to the end token's id (49407 in OpenAI's vocabulary)")
    return {
        **_clip_tower(text), "architecture": "decoder", "vocab_size": required(text, "vocab_size"),
        "max_seq_len": required(text, "max_position_embeddings"), "norm": "layernorm",
        "norm_eps": eps["text_config"], "mlp": _CLIP_ACTIVATIONS[acts["text_config"]], "position": "learned",
        "qkv_bias": True, "attention_out_bias": True, "mlp_bias": True,
        "clip": {"embed_dim": required(hf, "projection_dim"), "vision": {
            **_clip_tower(vision), "image_size": required(vision, "image_size"),
            "patch_size": required(vision, "patch_size"), "channels": vision.get("num_channels", 3),
            "pooling": "class"}},  # pixel statistics: preprocessor_config.json's (read_clip_image_processor)
    }


def _clip_write(cfg: ModelConfig) -> dict:
    clip = cfg.clip
    if clip is None:
        raise HfFormatError("CLIPModel is a dual encoder; this model has no model.clip")
    if clip.loss != "softmax" or clip.vision.pooling != "class":
        raise HfFormatError("CLIPModel trains with the softmax loss and reads the image tower's class token; this model "
                            f"has model.clip.loss={clip.loss} and model.clip.vision.pooling={clip.vision.pooling}")
    if (cfg.position, cfg.norm, cfg.norm_position) != ("learned", "layernorm", "pre") or \
            cfg.mlp not in _CLIP_ACTIVATIONS.values() or not (cfg.qkv_bias and cfg.attention_out_bias and cfg.mlp_bias):
        raise HfFormatError("CLIPModel needs pre-LayerNorm towers with learned positions, biases on every projection "
                            "and QuickGELU or the exact GELU")
    lacks(cfg, "clip", moe=cfg.moe is not None, n_kv_heads=cfg.kv_heads != cfg.n_heads, qk_norm=cfg.qk_norm,
           head_dim=cfg.dim_per_head * cfg.n_heads != cfg.d_model, sliding_window=cfg.sliding_window is not None)
    act = {v: k for k, v in _CLIP_ACTIVATIONS.items()}[cfg.mlp]
    v = clip.vision
    common = {"hidden_act": act, "layer_norm_eps": cfg.norm_eps, "attention_dropout": 0.0, "dropout": 0.0,
              "projection_dim": clip.embed_dim}
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": clip.embed_dim,
        "text_config": {**common, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
                        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
                        "num_attention_heads": cfg.n_heads, "max_position_embeddings": cfg.max_seq_len},
        "vision_config": {**common, "hidden_size": v.d_model, "intermediate_size": v.d_ff,
                          "num_hidden_layers": v.n_layers, "num_attention_heads": v.n_heads,
                          "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.channels},
    }


def clip_image_processor(cfg: ModelConfig) -> dict:
    """preprocessor_config.json for transformers' CLIPImageProcessor: what Tessera's pipeline does to a square image
    (bicubic resize to image_size, pixels / 255, per-channel normalisation)."""
    v = cfg.clip.vision
    per_channel = [list(x) * (v.channels // len(x)) for x in (v.pixel_mean, v.pixel_std)]
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": v.image_size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": v.image_size, "width": v.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": per_channel[0],
            "image_std": per_channel[1], "do_convert_rgb": v.channels == 3}


def read_clip_image_processor(processor: dict | None) -> dict:
    """The vision fields an image processor's config sets (None: CLIPImageProcessor's defaults, OpenAI's)."""
    processor = processor or {}
    if processor.get("do_normalize", True) is False or processor.get("do_rescale", True) is False:
        raise refuse("preprocessor_config.json do_normalize/do_rescale", False,
                     "Tessera rescales pixels to [0, 1] and normalises them")
    return {"pixel_mean": tuple(processor.get("image_mean", OPENAI_CLIP_MEAN)),
            "pixel_std": tuple(processor.get("image_std", OPENAI_CLIP_STD))}


def _clip_globals(cfg: ModelConfig) -> list[m.Rule]:
    t, v, vision = "text_model.", "vision_model.", cfg.clip.vision
    return [
        m.same("text/embed/table", t + "embeddings.token_embedding.weight"),
        m.same("text/pos_embed", t + "embeddings.position_embedding.weight"),
        m.same("text/final_norm/scale", t + "final_layer_norm.weight"),
        m.same("text/final_norm/bias", t + "final_layer_norm.bias"),
        m.same("vision/class_token", v + "embeddings.class_embedding"),
        m.patch_conv("vision/patch_embed", v + "embeddings.patch_embedding.weight", vision.patch_size, vision.channels),
        m.same("vision/pos_embed", v + "embeddings.position_embedding.weight"),
        m.same("vision/pre_norm/scale", v + "pre_layrnorm.weight"), m.same("vision/pre_norm/bias", v + "pre_layrnorm.bias"),
        m.same("vision/final_norm/scale", v + "post_layernorm.weight"),
        m.same("vision/final_norm/bias", v + "post_layernorm.bias"),
        m.transposed("text_proj", "text_projection.weight"), m.transposed("image_proj", "visual_projection.weight"),
        m.same("log_scale", "logit_scale"),
    ]


def _clip_stacks(cfg: ModelConfig) -> list[Stack]:
    return [Stack("text/blocks", tuple(range(cfg.n_layers)), tower="text"),
            Stack("vision/blocks", tuple(range(cfg.clip.vision.n_layers)), tower="vision")]


def _clip_layer(cfg: ModelConfig, stack: Stack, layout: str) -> list[m.Rule]:
    tower = cfg.clip.vision if stack.tower == "vision" else cfg
    x = f"{stack.tower}_model.encoder.layers.{{i}}."
    a = x + "self_attn."
    return biased_block(tower.n_heads, tower.d_model // tower.n_heads, a + "q_proj", a + "k_proj", a + "v_proj",
                        a + "out_proj", x + "layer_norm1", x + "mlp.fc1", x + "mlp.fc2", x + "layer_norm2")


_DECODER_BUFFERS = r"rotary_emb\.inv_freq$"
ARCHITECTURES: dict[str, Architecture] = {
    **{name: Architecture(name, "model.", "embed_tokens.weight", getattr(llama, f"read_{name}"),
                          getattr(llama, f"write_{name}"), llama.global_rules, llama.layer_rules, _DECODER_BUFFERS,
                          expert_layouts=("per-expert", "fused") if name == "mixtral" else ())
       for name in ("llama", "mistral", "qwen2", "qwen3", "mixtral")},
    # Old GPT-2 files keep the causal-mask buffers; the LM head is the tied embedding table.
    "gpt2": Architecture("gpt2", "transformer.", "wte.weight", _gpt2_read, _gpt2_write, _gpt2_globals, _gpt2_layer,
                         r"\.attn\.(masked_)?bias$|^lm_head\.weight$"),
    # Pre-training checkpoints also hold the pooler and next-sentence head; the decoder is the tied table.
    "bert": Architecture("bert", "bert.", "embeddings.word_embeddings.weight", _bert_read, _bert_write,
                         _bert_globals, _bert_layer,
                         r"pooler\.|seq_relationship|position_ids$|^cls\.predictions\.decoder\.(weight|bias)$"),
    # Older files keep the position-id buffers.
    "clip": Architecture("clip", "", "text_model.embeddings.token_embedding.weight", _clip_read, _clip_write,
                         _clip_globals, _clip_layer, r"position_ids$", stacks=_clip_stacks),
}


def architecture_of_config(hf: dict) -> Architecture:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise refuse("model_type", model_type, f"Tessera reads {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def architecture_for(cfg: ModelConfig) -> Architecture:
    """The HF class that expresses this model: decided by its features, as the import set them."""
    if cfg.clip is not None:
        return ARCHITECTURES["clip"]
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

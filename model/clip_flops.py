"""Parameter and FLOP counts of a dual encoder (model/clip.py), from its config: each tower is counted with
model/flops.py's per-token terms (the text tower causal, the image tower bidirectional), plus the patch
embedding, the projections and the [batch, batch] similarity of the contrastive loss."""

from __future__ import annotations

from model.clip import vision_tower_config
from model.config import ModelConfig
from model.flops import forward_flops_breakdown, kernel_keys, param_counts


def _tower_without_head(cfg: ModelConfig) -> ModelConfig:
    return cfg.model_copy(update={"tie_embeddings": True, "head_transform": False})


def clip_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of each part: the text tower (token table, positions, layers, final norm), the image tower
    (patch embedding, class token, positions, input norm, layers, final norm), projections and logit scale."""
    v, e = cfg.clip.vision, cfg.clip.embed_dim
    text = param_counts(_tower_without_head(cfg)).total
    tower = param_counts(vision_tower_config(cfg))
    norm = 2 if cfg.norm == "layernorm" else 1
    vision = (v.patch_dim * v.d_model + (v.d_model if v.pooling == "class" else 0) + v.tokens * v.d_model
              + 2 * norm * v.d_model + tower.layers(0))
    projections = (cfg.d_model + v.d_model) * e
    scalars = 2 if cfg.clip.loss == "sigmoid" else 1
    return {"text": text, "vision": vision, "projections": projections, "scalars": scalars,
            "total": text + vision + projections + scalars}


def clip_forward_flops_breakdown(cfg: ModelConfig, seq_len: int, batch: int, kernel: str | None = None) -> dict[str, float]:
    """Forward FLOPs per image-text pair, by term. kernel=None: the model's work (causal text attention over the
    keys each query may see); a kernel name: what that attention implementation computes (dense: every key)."""
    v, e = cfg.clip.vision, cfg.clip.embed_dim
    vision_cfg = vision_tower_config(cfg)
    text_keys = None if kernel is None else kernel_keys(cfg, seq_len, kernel)
    vision_keys = None if kernel is None else kernel_keys(vision_cfg, v.tokens, kernel)
    text = forward_flops_breakdown(cfg, seq_len, keys=text_keys)
    vision = forward_flops_breakdown(vision_cfg, v.tokens, keys=vision_keys)
    terms = {f"text_{k}": n * seq_len for k, n in text.items() if k != "lm_head"}
    terms.update({f"vision_{k}": n * v.tokens for k, n in vision.items() if k != "lm_head"})
    terms["patch_embedding"] = 2 * v.patch_dim * v.d_model * v.patches
    terms["projections"] = 2 * (cfg.d_model + v.d_model) * e
    terms["similarity"] = 2 * e * batch  # this pair's row of the [batch, batch] logits
    return terms


def clip_train_flops_per_pair(cfg: ModelConfig, seq_len: int, batch: int, kernel: str | None = None) -> float:
    """FLOPs of one pair in a training step: forward plus backward (twice the forward). The MFU numerator with
    kernel=None."""
    return 3 * sum(clip_forward_flops_breakdown(cfg, seq_len, batch, kernel).values())

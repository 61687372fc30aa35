"""The evaluator of dual encoders: embeddings of held-out images and captions on the mesh, then on the host
the contrastive loss of whole batches, retrieval recall@k in both directions, and zero-shot classification
(each image given the class whose prompt's embedding is nearest). Training evaluates with it every
train.eval_every steps and at the end; `tessera eval --zero-shot` and `tessera embed` use it on any run.

Recall counts a retrieved caption (image -> text) or image (text -> image) as correct when its caption is the
query's own caption text: synthetic and class-captioned data repeat captions, and two pairs with the same
caption are equally right answers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.data.image_text import PairRows, tokenized_captions
from train.objectives.contrastive import Contrastive
from train.sharding import Rules, activation_rules, batch_sharding, replicated
from train.tokenizer import Tokenizer

RECALL_AT = (1, 5)


class EmbeddingScorer:
    """Jitted image and text encoders of one dual encoder's parameters on a mesh, batch_size rows per call."""

    def __init__(self, graphdef: nnx.GraphDef, param_shardings, mesh, rules: Rules, batch_size: int,
                 tokenizer: Tokenizer, seq_len: int):
        self.batch_size, self.tokenizer, self.seq_len = batch_size, tokenizer, seq_len
        rows = batch_sharding(mesh, rules)

        def images(params, pixels):
            with activation_rules(mesh, rules):
                return nnx.merge(graphdef, params).encode_images(pixels)

        def texts(params, tokens, lengths):
            with activation_rules(mesh, rules):
                return nnx.merge(graphdef, params).encode_texts(tokens, lengths)

        out = replicated(mesh)
        self._images = jax.jit(images, in_shardings=(param_shardings, rows), out_shardings=out)
        self._texts = jax.jit(texts, in_shardings=(param_shardings, rows, rows), out_shardings=out)

    def _batched(self, encode, params, *arrays: np.ndarray) -> np.ndarray:
        """Embeddings [n, embed_dim] of n rows, batch_size at a time (the last batch filled with its last row)."""
        n, out = len(arrays[0]), []
        for first in range(0, n, self.batch_size):
            index = np.minimum(np.arange(first, first + self.batch_size), n - 1)
            out.append(np.asarray(encode(params, *(a[index] for a in arrays)))[: n - first])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def embed_images(self, params, pixels: np.ndarray) -> np.ndarray:
        """uint8 images [n, H, W, C] -> L2-normalised embeddings [n, embed_dim]."""
        return self._batched(self._images, params, pixels)

    def embed_texts(self, params, texts: list[str]) -> np.ndarray:
        tokens, lengths = tokenized_captions(self.tokenizer, texts, self.seq_len)
        return self._batched(self._texts, params, tokens, lengths)

    def class_embeddings(self, params, prompts: list[list[str]]) -> np.ndarray:
        """One embedding per class: the normalised mean of its prompts' embeddings (prompt ensembling)."""
        flat = self.embed_texts(params, [p for class_prompts in prompts for p in class_prompts])
        per_class = flat.reshape(len(prompts), -1, flat.shape[-1]).mean(axis=1)
        return per_class / np.linalg.norm(per_class, axis=1, keepdims=True)

    def evaluate(self, params, rows: PairRows, max_pairs: int, objective: Contrastive, log_scale, bias=None,
                 classes: tuple[list[str], list[list[str]]] | None = None) -> dict[str, float]:
        """Metrics on the first max_pairs held-out pairs (see the module's docstring)."""
        n = min(rows.n_rows, max_pairs)
        batches = [rows.rows(np.arange(first, min(first + self.batch_size, n))) for first in range(0, n, self.batch_size)]
        pixels = np.concatenate([b["images"] for b in batches])
        captions = [rows.pairs[i].text for i in range(n)]
        image_emb, text_emb = self.embed_images(params, pixels), self.embed_texts(params, captions)
        full = [(s, s + self.batch_size) for s in range(0, n - self.batch_size + 1, self.batch_size)] or [(0, n)]
        losses = [float(objective.loss(image_emb[a:b], text_emb[a:b], log_scale, bias)[0]) for a, b in full]
        result = {"loss": float(np.mean(losses)), "retrieval_pairs": n,
                  **retrieval_recall(image_emb, text_emb, caption_ids(captions))}
        if classes is not None:
            names, prompts = classes
            labels = [rows.pairs[i].label for i in range(n)]
            known = np.array([label in names for label in labels])
            if known.any():
                truth = np.array([names.index(label) for label, k in zip(labels, known) if k])
                predicted = zero_shot_predictions(image_emb[known], self.class_embeddings(params, prompts))
                result.update(zero_shot_accuracy=float(np.mean(predicted == truth)), zero_shot_images=int(known.sum()),
                              zero_shot_classes=len(names))
        return result


def caption_ids(captions: list[str]) -> np.ndarray:
    """Each caption's index among the distinct captions: pairs with equal ids are interchangeable answers."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(c, len(index)) for c in captions])


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """recall@k both ways: the share of queries with a right answer among their k most similar candidates."""
    sims = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T
    result = {}
    for name, scores in (("image_to_text", sims), ("text_to_image", sims.T)):
        ranked = np.argsort(-scores, axis=1, kind="stable")
        right = ids[ranked] == ids[:, None]
        for k in RECALL_AT:
            result[f"{name}_recall_at_{k}"] = float(np.mean(right[:, :k].any(axis=1)))
    return result


def zero_shot_predictions(image_emb: np.ndarray, prompt_emb: np.ndarray) -> np.ndarray:
    """The class of each image: the prompt with the highest cosine similarity (embeddings are normalised)."""
    return np.argmax(np.asarray(image_emb, np.float64) @ np.asarray(prompt_emb, np.float64).T, axis=1)


def scale_and_bias(params) -> tuple[jax.Array, jax.Array | None]:
    """The learned logit scale (log) and bias (None without one) from a dual encoder's parameter tree."""
    return jnp.asarray(params["log_scale"]), None if "logit_bias" not in params else jnp.asarray(params["logit_bias"])

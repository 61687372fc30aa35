"""The per-pair numbers of a batch of preference pairs, from one forward pass over both responses: a reward
model's scores, or a policy's (and its reference's) summed response log-probs; then the pairwise objective's
loss and metrics on them (train/objectives/pairwise.py). The train step and the evaluation share this.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model import lora
from train.objectives.cross_entropy import token_nll


def _flat(batch):
    """[pairs, 2, length] fields -> [2 * pairs, length] rows (chosen, rejected, chosen, ...)."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items() if k != "ends"}


def response_log_probs(graphdef, params, rows, key=None):
    """Each row's summed log-prob of its weighted targets [rows], and the model's MoE aux."""
    model = nnx.merge(graphdef, params)
    logits, aux = model.forward(rows["inputs"], rows["positions"], rows["segment_ids"], key)
    nll, _ = token_nll(logits, rows["targets"])
    return -jnp.sum(nll * rows["weights"], axis=-1), aux


def without_adapters(params):
    """The parameters with every LoRA adapter's B zeroed: the base model, the reference of LoRA finetuning."""
    def zero(path, value):
        names = [str(getattr(k, "key", k)) for k in path]
        return jnp.zeros_like(value) if lora.is_adapter(tuple(names)) and names[-1] == "b" else value

    return jax.tree_util.tree_map_with_path(zero, params)


def pair_terms(objective, graphdef, params, batch, reference_params=None, key=None):
    """(loss per pair [pairs], metrics per pair, MoE aux) of a batch of pairs."""
    rows = _flat(batch)
    pairs = batch["inputs"].shape[0]
    if objective.name == "reward":
        model = nnx.merge(graphdef, params)
        x, aux, _ = model.hidden(rows["inputs"], rows["positions"], rows["segment_ids"], key)
        scores = model.scores(x, batch["ends"].reshape(-1)).reshape(pairs, 2)
        loss, metrics = objective.per_pair(scores[:, 0], scores[:, 1])
        return loss, metrics, aux
    logp, aux = response_log_probs(graphdef, params, rows, key)
    logp = logp.reshape(pairs, 2)
    tokens = jnp.maximum(jnp.sum(rows["weights"], axis=-1).reshape(pairs, 2), 1.0)
    ref = [None, None]
    if objective.needs_reference:
        ref_params = without_adapters(params) if reference_params is None else reference_params
        ref_logp, _ = response_log_probs(graphdef, jax.lax.stop_gradient(ref_params), rows)
        ref = list(jax.lax.stop_gradient(ref_logp).reshape(pairs, 2).T)
    loss, metrics = objective.per_pair(logp[:, 0], logp[:, 1], ref[0], ref[1], tokens[:, 0], tokens[:, 1])
    return loss, metrics, aux

"""Mixture-of-experts feed-forward layer: a router picks top-k experts per token.

Two ways to run the chosen experts, the same math when nothing is dropped:

- "dropless": the (token, expert) pairs are sorted by expert and every expert's MLP runs
  as one grouped matmul (`jax.lax.ragged_dot`), then the results are put back in token
  order. No token is ever dropped; the work is exactly top_k expert MLPs per token. On a
  mesh each device sorts only its own tokens; where experts are split, it gathers its
  expert group's tokens, runs only the pairs routed to its own experts, and a
  reduce-scatter returns the outputs.
- "capacity" (GShard/Switch): each expert has a fixed number of slots per sequence;
  tokens take slots in priority order (every token's first choice in sequence order,
  then the second choices, ...). A choice that finds its expert full is dropped: it adds
  nothing and the token goes on through the residual. Dispatch and combine are einsums
  whose expert dimension carries the logical axis "expert", so on a mesh with an
  `expert` axis the compiler exchanges tokens between devices (all-to-all).

The router runs in float32. Its auxiliary losses (load balancing and z-loss) and load
statistics are returned beside the output; padding tokens (segment id 0) take no part.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from model.config import ModelConfig
from model import lora
from model.layers import Mlp, constrain, logical_param, logical_sharding, matmul_param, mlp_activation, normal
from model.precision import Numerics

EXPERT_HIDDEN_AXES = ("expert", "batch", None, "mlp")
EXPERT_TOKEN_AXES = ("expert", "batch", None, "activation_embed")


def route(logits: jax.Array, top_k: int, score: str, renormalize: bool):
    """Router logits [..., E] -> (weights [..., k] f32, experts [..., k] int32, probabilities [..., E] f32).

    The probabilities are what the load-balancing loss averages: softmax of the logits,
    or for sigmoid scoring the scores normalised to sum to one.
    """
    logits = logits.astype(jnp.float32)
    if score == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
        probs = scores
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    weights, experts = jax.lax.top_k(scores, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def expert_fractions(experts: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """Fraction of the valid (token, choice) pairs sent to each expert: [E], sums to 1."""
    counts = jnp.sum(jax.nn.one_hot(experts, num_experts) * valid[..., None, None], axis=tuple(range(experts.ndim)))
    return counts / jnp.maximum(jnp.sum(valid) * experts.shape[-1], 1.0)


def load_balancing_loss(probs: jax.Array, experts: jax.Array, valid: jax.Array) -> jax.Array:
    """Switch/GShard auxiliary loss: E * sum_e (fraction routed to e) * (mean router probability of e).

    Equals 1 when routing is perfectly balanced, and grows as load concentrates on the
    experts the router favours.
    """
    num_experts = probs.shape[-1]
    n = jnp.maximum(jnp.sum(valid), 1.0)
    mean_prob = jnp.sum(probs * valid[..., None], axis=tuple(range(probs.ndim - 1))) / n
    return num_experts * jnp.sum(expert_fractions(experts, valid, num_experts) * mean_prob)


def router_z_loss(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean squared log-partition of the router logits (ST-MoE): keeps them from growing."""
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.square(log_z) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def capacity(cfg: ModelConfig, seq_len: int) -> int:
    """Slots per expert per sequence: ceil(factor * seq_len * top_k / experts), at most seq_len."""
    moe = cfg.moe
    return max(1, min(seq_len, math.ceil(moe.capacity_factor * seq_len * moe.top_k / moe.num_experts)))


def expert_rows_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Expert MLP rows computed per token in one MoE layer: top_k when dropless; every slot,
    filled or not, on the capacity path."""
    if cfg.moe.dispatch == "dropless":
        return cfg.moe.top_k
    return cfg.moe.num_experts * capacity(cfg, seq_len) / seq_len


def capacity_slots(experts: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """For experts [B, S, k]: each choice's slot in its expert's buffer, [B, S, k] int32.

    Priority is choice-major: all first choices in sequence order, then all second
    choices, and so on. Padding tokens take no slot.
    """
    b, s, k = experts.shape
    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32) * valid[..., None, None].astype(jnp.int32)
    by_priority = onehot.transpose(0, 2, 1, 3).reshape(b, k * s, num_experts)
    taken_before = (jnp.cumsum(by_priority, axis=1) - by_priority).reshape(b, k, s, num_experts).transpose(0, 2, 1, 3)
    return jnp.sum(taken_before * onehot, axis=-1)


def dropless_experts(x, weights, experts, wi, wg, wo, kind: str = "gelu"):
    """x [T, d]; weights, experts [T, k]; expert weights [E, ...] -> [T, d].

    An expert index of E or more (another device's expert) is sorted last, outside every
    group; its weight must be zero.
    """
    t, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=wi.shape[0]).astype(jnp.int32)
    xs = x[order // k]
    h = jax.lax.ragged_dot(xs, wi, group_sizes)
    h = mlp_activation(h, jax.lax.ragged_dot(xs, wg, group_sizes) if wg is not None else None, kind)
    ys = jax.lax.ragged_dot(h, wo, group_sizes)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


def _mesh_axes(spec_entry) -> tuple[str, ...]:
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def dropless_on_mesh(x, weights, experts, wi, wg, wo, kind: str = "gelu"):
    """The dropless path on the caller's mesh, or None when not tracing on one.

    x [B, S, d] is split over the batch's mesh axes; under `shard_map` each device sorts
    and runs only its own tokens (a global sort of sharded tokens would gather them all).
    Expert weights enter whole along those axes (gathered like any FSDP weight) except
    along the expert axes, where each device keeps its own experts: it gathers its expert
    group's tokens, runs the pairs routed to its experts, and the partial outputs are
    summed back onto the devices that own the tokens (reduce-scatter).
    """
    b, s, d = x.shape
    token_sharding = logical_sharding(("batch",), (b,))
    if token_sharding is None:
        return None
    mesh, token_axes = token_sharding.mesh, _mesh_axes(token_sharding.spec[0])
    expert_axes = _mesh_axes(logical_sharding(("expert",), (wi.shape[0],)).spec[0])
    gathered = tuple(a for a in expert_axes if a in token_axes)  # token shards an expert group exchanges

    def local(x, weights, experts, wi, wg, wo):
        first = jax.lax.axis_index(expert_axes) * wi.shape[0] if expert_axes else 0
        if gathered:
            x, weights, experts = (jax.lax.all_gather(a, gathered, tiled=True) for a in (x, weights, experts))
        mine = (experts >= first) & (experts < first + wi.shape[0])
        y = dropless_experts(x, weights * mine, jnp.where(mine, experts - first, wi.shape[0]), wi, wg, wo, kind)
        if gathered:
            y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
        others = tuple(a for a in expert_axes if a not in gathered)  # tokens replicated there: add the parts
        return jax.lax.psum(y, others) if others else y

    tokens, experts_spec = PartitionSpec(token_axes or None), PartitionSpec(expert_axes or None)
    run = jax.shard_map(
        local, mesh=mesh, in_specs=(tokens,) * 3 + (experts_spec,) * 3, out_specs=tokens,
        axis_names=set(token_axes) | set(expert_axes),
    )
    flat = (x.reshape(b * s, d), weights.reshape(b * s, -1), experts.reshape(b * s, -1))
    return run(*flat, wi, wg, wo).reshape(b, s, d)


def capacity_experts(x, weights, experts, valid, wi, wg, wo, slots: int, kind: str = "gelu"):
    """x [B, S, d]; weights, experts [B, S, k] -> ([B, S, d], kept [B, S, k] bool)."""
    num_experts = wi.shape[0]
    position = capacity_slots(experts, valid, num_experts)
    kept = (position < slots) & valid[..., None]
    choice = jax.nn.one_hot(experts, num_experts, dtype=x.dtype) * kept[..., None].astype(x.dtype)  # [B,S,k,E]
    slot = jax.nn.one_hot(position, slots, dtype=x.dtype)  # [B,S,k,C]
    dispatch = jnp.einsum("bske,bskc->bsec", choice, slot)
    combine = jnp.einsum("bske,bskc,bsk->bsec", choice, slot, weights.astype(x.dtype))
    xin = constrain(jnp.einsum("bsec,bsd->ebcd", dispatch, x), EXPERT_TOKEN_AXES)
    h = jnp.einsum("ebcd,edf->ebcf", xin, wi)
    h = mlp_activation(h, jnp.einsum("ebcd,edf->ebcf", xin, wg) if wg is not None else None, kind)
    h = constrain(h, EXPERT_HIDDEN_AXES)
    y = constrain(jnp.einsum("ebcf,efd->ebcd", h, wo), EXPERT_TOKEN_AXES)
    return jnp.einsum("bsec,ebcd->bsd", combine, y), kept


class MoeMlp(nnx.Module):
    """Routed experts (plus optional shared experts) in place of a dense MLP."""

    def __init__(self, cfg: ModelConfig, numerics: Numerics, rngs: nnx.Rngs):
        moe = cfg.moe
        self.cfg = cfg
        self.numerics = numerics
        d, f, e, p = cfg.d_model, cfg.d_expert, moe.num_experts, numerics.params
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        init = normal(cfg.init_std)
        self.router = logical_param(rngs, init, (d, e), p, ("embed", None))
        self.wi = matmul_param(numerics, rngs, init, (e, d, f), ("expert", "embed", "mlp"), "experts")
        self.wg = (
            matmul_param(numerics, rngs, init, (e, d, f), ("expert", "embed", "mlp"), "experts")
            if cfg.mlp == "swiglu"
            else None
        )
        self.wo = matmul_param(numerics, rngs, normal(out_std), (e, f, d), ("expert", "mlp", "embed"), "experts")
        self.shared = Mlp(cfg, numerics, rngs, d_ff=moe.num_shared_experts * f) if moe.num_shared_experts else None
        lora.attach(self, ("wi", "wg", "wo"), cfg.lora, p, rngs)

    def _weight(self, name: str) -> jax.Array:
        """An expert weight in the compute dtype, adapted whole (W + A·B·alpha/rank) when it has an adapter: the
        grouped matmul takes whole weights."""
        w, adapter = self.numerics.weight(getattr(self, name)), lora.adapter(self, name)
        return w if adapter is None else adapter.adapted(w)

    def __call__(self, x: jax.Array, valid: jax.Array, key: jax.Array | None = None):
        """x [B, S, d], valid [B, S] bool -> (y [B, S, d], aux).

        aux: load-balancing loss, router z-loss, per-expert load [E], dropped fraction.
        `key` turns on router jitter (training).
        """
        moe, n = self.cfg.moe, self.numerics
        router_in = x.astype(jnp.float32)
        if key is not None and moe.router_jitter > 0:
            router_in = router_in * jax.random.uniform(key, x.shape, jnp.float32, 1 - moe.router_jitter, 1 + moe.router_jitter)
        logits = router_in @ n.weight(self.router, jnp.float32)  # routing decisions stay in float32
        weights, experts, probs = route(logits, moe.top_k, moe.score, moe.renormalize)
        weights = weights * valid[..., None]
        wi, wo = self._weight("wi"), self._weight("wo")
        wg = self._weight("wg") if self.wg is not None else None
        if moe.dispatch == "dropless":
            y = dropless_on_mesh(x, weights, experts, wi, wg, wo, self.cfg.mlp)
            if y is None:
                b, s, d = x.shape
                y = dropless_experts(x.reshape(b * s, d), weights.reshape(b * s, -1), experts.reshape(b * s, -1),
                                     wi, wg, wo, self.cfg.mlp).reshape(b, s, d)
            dropped = jnp.zeros((), jnp.float32)
        else:
            y, kept = capacity_experts(x, weights, experts, valid, wi, wg, wo, capacity(self.cfg, x.shape[1]),
                                        self.cfg.mlp)
            n_choices = jnp.maximum(jnp.sum(valid) * moe.top_k, 1.0)
            dropped = 1.0 - jnp.sum(kept) / n_choices
        if self.shared is not None:
            y = y + self.shared(x)
        aux = {
            "moe_aux_loss": load_balancing_loss(probs, experts, valid),
            "moe_z_loss": router_z_loss(logits, valid),
            "moe_expert_load": expert_fractions(experts, valid, moe.num_experts),
            "moe_dropped_fraction": dropped,
        }
        return y, aux

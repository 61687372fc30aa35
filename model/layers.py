"""Building blocks shared by every transformer: parameters with logical axes, embeddings, norms, MLPs."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from model import lora
from model.config import LOGICAL_AXES, ModelConfig
from model.precision import Numerics, quantize_weight


def logical_param(rngs: nnx.Rngs | None, init, shape, dtype, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter annotated with logical axis names.

    The names say what each dimension *is* ("embed", "mlp", ...); which mesh axis
    shards it is decided outside the model by the logical-axis rules. Eager sharding
    is off because the model never sees a mesh.
    """
    assert len(axes) == len(shape) and all(a is None or a in LOGICAL_AXES for a in axes), (axes, shape)
    value = init(rngs.params(), shape, dtype) if rngs is not None else init(shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def matmul_param(
    numerics: Numerics, rngs: nnx.Rngs, init, shape, axes: tuple[str | None, ...], role: str,
    contract: int = 1, outputs: int = 1,
) -> nnx.Param:
    """A weight that a matmul contracts over its `contract` axes before the trailing `outputs` axes.

    That metadata lets quantization find the channels; a weight-only quantized model
    (numerics.weight_quant covering `role`) holds the quantized weight itself.
    """
    param = logical_param(rngs, init, shape, numerics.params, axes)
    param.set_metadata("quant", (role, contract, outputs))
    wq = numerics.weight_quant
    if wq is not None and role in wq.layers:
        param.set_value(quantize_weight(param.get_value(), contract, outputs, wq))
    return param


# Set by whoever traces the model on a mesh: maps (logical axes, shape) to a sharding.
_activation_sharding: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(to_sharding: Callable) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to `to_sharding(axes, shape)`."""
    token = _activation_sharding.set(to_sharding)
    try:
        yield
    finally:
        _activation_sharding.reset(token)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Name an activation's dimensions so the rules can shard it; a no-op outside `activation_sharding`.

    Without these hints XLA propagates shardings from the parameters alone and may, for
    example, gather the whole batch to contract a model-sharded LM head.
    """
    sharding = logical_sharding(axes, x.shape)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def logical_sharding(axes: tuple[str | None, ...], shape: tuple[int, ...]):
    """The sharding the rules give an activation with these logical axes; None outside `activation_sharding`."""
    to_sharding = _activation_sharding.get()
    return None if to_sharding is None else to_sharding(axes, shape)


def tracing_platform() -> str:
    """The platform the model is being traced for: the mesh's devices' (a TPU topology's when compiling for
    TPU from a CPU host), else the default backend."""
    sharding = logical_sharding((None,), (1,))
    return sharding.mesh.devices.flat[0].platform if sharding is not None else jax.default_backend()


def normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


def ones(shape, dtype):
    return jnp.ones(shape, dtype)


def zeros(shape, dtype):
    return jnp.zeros(shape, dtype)


class Norm(nnx.Module):
    """RMSNorm (Llama) or LayerNorm (GPT-2); statistics always in float32."""

    def __init__(self, cfg: ModelConfig, numerics: Numerics, size: int | None = None, axis: str | None = "embed"):
        """Over the model dimension by default; `size` and `axis` for other widths (e.g. a latent)."""
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.numerics = numerics
        size = size or cfg.d_model
        self.scale = logical_param(None, ones, (size,), numerics.params, (axis,))
        self.bias = logical_param(None, zeros, (size,), numerics.params, (axis,)) if cfg.norm == "layernorm" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        x = x * self.numerics.weight(self.scale, jnp.float32)
        if self.bias is not None:
            x = x + self.numerics.weight(self.bias, jnp.float32)
        return x.astype(self.numerics.compute)


def mlp_activation(h: jax.Array, gate: jax.Array | None, kind: str) -> jax.Array:
    """SwiGLU when a gate projection is given (silu(gate) * h); else GELU, tanh-approximated or exact, or
    CLIP's QuickGELU (`kind`)."""
    if gate is not None:
        return jax.nn.silu(gate) * h
    if kind == "quick_gelu":
        return h * jax.nn.sigmoid(1.702 * h)
    return jax.nn.gelu(h, approximate=kind != "gelu_exact")


class Mlp(nnx.Module):
    """Feed-forward block: GELU (GPT-2) or SwiGLU (Llama)."""

    def __init__(self, cfg: ModelConfig, numerics: Numerics, rngs: nnx.Rngs, d_ff: int | None = None):
        self.kind = cfg.mlp
        self.numerics = numerics
        d, f, p = cfg.d_model, d_ff or cfg.d_ff, numerics.params
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # keeps the residual stream's variance flat in depth
        init = normal(cfg.init_std)
        self.wi = matmul_param(numerics, rngs, init, (d, f), ("embed", "mlp"), "mlp")
        self.wg = matmul_param(numerics, rngs, init, (d, f), ("embed", "mlp"), "mlp") if cfg.mlp == "swiglu" else None
        self.wo = matmul_param(numerics, rngs, normal(out_std), (f, d), ("mlp", "embed"), "mlp")
        self.bi = logical_param(None, zeros, (f,), p, ("mlp",)) if cfg.mlp_bias else None
        self.bo = logical_param(None, zeros, (d,), p, ("embed",)) if cfg.mlp_bias else None
        lora.attach(self, ("wi", "wg", "wo"), cfg.lora, p, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, a = self.numerics, lambda name: lora.adapter(self, name)  # noqa: E731
        h = n.matmul("bld,df->blf", x, self.wi, "mlp", lora=a("wi"))
        if self.bi is not None:
            h = h + n.weight(self.bi)
        gate = n.matmul("bld,df->blf", x, self.wg, "mlp", lora=a("wg")) if self.wg is not None else None
        h = constrain(mlp_activation(h, gate, self.kind), ("batch", "length", "mlp"))
        y = n.matmul("blf,fd->bld", h, self.wo, "mlp", lora=a("wo"))
        if self.bo is not None:
            y = y + n.weight(self.bo)
        return y


class HeadTransform(nnx.Module):
    """BERT's masked-LM head before the tied output matrix: dense -> GELU -> LayerNorm, each token alone."""

    def __init__(self, cfg: ModelConfig, numerics: Numerics, rngs: nnx.Rngs):
        self.kind = cfg.mlp
        self.numerics = numerics
        self.w = matmul_param(numerics, rngs, normal(cfg.init_std), (cfg.d_model, cfg.d_model), ("embed", None), "mlp")
        self.b = logical_param(None, zeros, (cfg.d_model,), numerics.params, (None,))
        self.norm = Norm(cfg, numerics)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.numerics.matmul("bld,de->ble", x, self.w, "mlp") + self.numerics.weight(self.b)
        return self.norm(mlp_activation(h, None, self.kind))


class Embed(nnx.Module):
    """Token embedding; also the output projection when embeddings are tied."""

    def __init__(self, cfg: ModelConfig, numerics: Numerics, rngs: nnx.Rngs):
        self.numerics = numerics
        self.table = logical_param(
            rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), numerics.params, ("vocab", "embed")
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.numerics.lookup(self.table, tokens)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding table (tied LM head), accumulated in the logits dtype."""
        return self.numerics.matmul("bld,vd->blv", x, self.table, "lm_head", self.numerics.logits)

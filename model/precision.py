"""Numbers in the model: the precision policy's casts, quantization-aware matmuls, weight-only weights.

Every weight reaches the math through one `Numerics`, so the policy applies uniformly:
- `weight(param)`: the parameter in the compute dtype; its gradient leaves the backward pass in
  the policy's gradient dtype (the cast's own VJP sets it).
- `matmul(spec, x, param, role)`: an einsum of activations with a weight. It runs on quantized
  operands (qwix's quantized-training dot) when QAT covers the role, and dequantizes inside
  the matmul (qwix) when the weight is stored quantized (weight-only serving).

Quantizable weights carry `quant=(role, contracted axes, output axes)` metadata (`matmul_param`),
counted from the end so a stacked "layers" axis in front changes nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from qwix._src.core import dot_general_qt

from model.config import LoraConfig, ModelConfig, Precision, QatConfig, WeightQuantConfig

QTYPES = {"int8": jnp.int8, "int4": jnp.int4}


class QuantizationError(ValueError):
    """A weight cannot be quantized as asked; the message names the weight and why."""


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def cast_with_grad(w: jax.Array, compute, grad) -> jax.Array:
    """w in the compute dtype; the gradient comes back to w in `grad`."""
    return w.astype(compute)


def _cast_fwd(w, compute, grad):
    return w.astype(compute), None


def _cast_bwd(compute, grad, _, g):
    return (g.astype(grad),)


cast_with_grad.defvjp(_cast_fwd, _cast_bwd)


def qat_config(dtype: str) -> dot_general_qt.DotGeneralQtConfig:
    """int8: both operands int8 with per-channel absmax scales; gradients pass straight through in
    float. fp8: e4m3 operands forward, e5m2 incoming gradients backward (the usual fp8 training split)."""
    if dtype == "int8":
        return dot_general_qt.DotGeneralQtConfig(lhs_qtype=jnp.int8, rhs_qtype=jnp.int8, use_original_residuals=True)
    return dot_general_qt.DotGeneralQtConfig(
        lhs_qtype=jnp.float8_e4m3fn, rhs_qtype=jnp.float8_e4m3fn,
        dlhs_grad_qtype=jnp.float8_e5m2, drhs_grad_qtype=jnp.float8_e5m2,
    )


def qat_einsum(spec: str, x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
    config = qat_config(dtype)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        # Both operands get the same quantization, so einsum may swap them freely.
        return dot_general_qt.dot_general_qt(lhs, rhs, dimension_numbers, config)

    # einsum caches its jit on the dot_general it is given; a fresh closure per call must not be jitted.
    with jax.disable_jit():
        return jnp.einsum(spec, x, w, _dot_general=dot_general)


@dataclass(frozen=True)
class Numerics:
    """Everything about numbers one model's modules share: the precision policy's dtypes, and how its
    matmuls are quantized (QAT while training, weight-only for serving)."""

    params: Any
    compute: Any
    grads: Any | None  # None: each gradient in its parameter's dtype
    logits: Any
    qat: QatConfig | None
    weight_quant: WeightQuantConfig | None
    lora: LoraConfig | None = None

    @classmethod
    def of(cls, cfg: ModelConfig, precision: Precision = Precision()) -> "Numerics":
        grads = jnp.dtype(precision.grads) if precision.grads else None
        return cls(jnp.dtype(precision.params), jnp.dtype(precision.compute), grads, jnp.dtype(precision.logits),
                   cfg.qat, cfg.weight_quant, cfg.lora)

    def weight(self, param: nnx.Variable, dtype=None) -> jax.Array:
        """The parameter in `dtype` (default the compute dtype), its gradient in the policy's."""
        dtype = jnp.dtype(dtype or self.compute)
        value = param.get_value()
        if isinstance(value, qwix.QArray):
            return qwix.dequantize(value).astype(dtype)
        if self.grads is None or self.grads == value.dtype:
            return value.astype(dtype)  # its gradient comes back in the parameter's dtype by itself
        return cast_with_grad(value, dtype, self.grads)

    def lookup(self, param: nnx.Variable, ids: jax.Array) -> jax.Array:
        """Rows of a table (embeddings) in the compute dtype: gathered first, so only they are cast,
        unless the policy asks for the table's gradient in another dtype than its own."""
        value = param.get_value()
        if self.grads is not None and self.grads != value.dtype:
            return jnp.take(self.weight(param), ids, axis=0)
        return jnp.take(value, ids, axis=0).astype(self.compute)

    def matmul(self, spec: str, x: jax.Array, param: nnx.Variable, role: str, out_dtype=None, lora=None) -> jax.Array:
        """einsum(spec, x, weight) in the compute dtype (or `out_dtype`, accumulated in it), plus the low-rank
        adapter's (x·A)·B·alpha/rank when the weight has one (`lora`, model/lora.py)."""
        y = self._matmul(spec, x, param, role, out_dtype)
        return y if lora is None else y + lora.delta(spec, x, self.compute).astype(y.dtype)

    def _matmul(self, spec: str, x: jax.Array, param: nnx.Variable, role: str, out_dtype=None) -> jax.Array:
        out_dtype = out_dtype or self.compute
        value = param.get_value()
        if isinstance(value, qwix.QArray):
            return qwix.einsum(spec, x, value).astype(out_dtype)
        w = self.weight(param)
        if self.qat is not None and role in self.qat.layers:
            return qat_einsum(spec, x, w, self.qat.dtype).astype(out_dtype)
        if out_dtype == self.compute:
            return jnp.einsum(spec, x, w)
        return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)


# ------------------------------------------------------------ weight-only quantization (serving)


def quantize_weight(w: jax.Array, contract: int, outputs: int, cfg: WeightQuantConfig, name: str = "weight"):
    """w -> qwix QArray: int8/int4 values with one scale per output channel (and per leading stacked
    axis), or per group of `cfg.group_size` consecutive inputs of each output channel.

    Inputs are the contracted axes read as one (outer, inner): groups tile the inner axis,
    or, when a group spans several inner rows (e.g. whole heads of an output projection),
    the outer one.
    """
    nd = w.ndim
    contracted = list(range(nd - outputs - contract, nd - outputs))
    channelwise = [a for a in range(nd) if a not in contracted]
    tiled = {}
    g = cfg.group_size
    if g is not None:
        inner, outer = contracted[-1], contracted[:-1]
        if w.shape[inner] % g == 0:
            tiled, channelwise = {inner: g}, channelwise + outer
        elif len(outer) == 1 and g % w.shape[inner] == 0 and w.shape[outer[0]] % (g // w.shape[inner]) == 0:
            tiled = {outer[0]: g // w.shape[inner]}  # the inner axis shares the group's scale
        else:
            widths = " x ".join(str(w.shape[a]) for a in contracted)
            raise QuantizationError(
                f"{cfg.method} groups of {g} inputs do not tile {name}'s contracted axes ({widths}); "
                "choose a group size that divides them, or none for per-channel scales"
            )
    return qwix.quantize(w, QTYPES[cfg.qtype], channelwise_axes=tuple(channelwise), tiled_axes=tiled,
                         scale_dtype=jnp.float32)


def quantized_bytes(value) -> int:
    """Storage bytes of one parameter: int4 values count half a byte."""
    if isinstance(value, qwix.QArray):
        bits = jnp.iinfo(value.qvalue.dtype).bits
        return value.qvalue.size * bits // 8 + sum(x.size * x.dtype.itemsize for x in (value.scale, value.zero_point)
                                                   if x is not None)
    return value.size * jnp.dtype(value.dtype).itemsize

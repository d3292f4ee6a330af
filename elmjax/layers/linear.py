"""A bias-optional dense layer whose kernel is stored [in, out] with logical axis names, and
an optional LoRA/DoRA adapter (elmjax/layers/adapters.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax.layers.init import param


class Linear(nnx.Module):
    """`y = x @ kernel (+ bias)`; the matmul runs in `compute_dtype` with float32 accumulation.

    With a 16-bit compute dtype the product is returned in that dtype directly (the MXU /
    tensor cores still accumulate in float32): a float32 result that is cast down at once
    would make the backward pass carry float32 cotangents, [batch, seq, out] buffers twice
    the size. An adapter adds its term to the float32 product, so it keeps one.
    `output_dtype` overrides the result's dtype (the output head returns float32 logits).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        init: tuple,
        logical_axes: tuple,
        use_bias: bool,
        compute_dtype,
        param_dtype,
        output_dtype=None,
    ):
        self.compute_dtype = compute_dtype
        self.output_dtype = jnp.dtype(compute_dtype if output_dtype is None else output_dtype)
        self.logical_axes = tuple(logical_axes)
        self.adapter = nnx.data(None)  # a LowRank module when adapters target this layer (adapters.attach)
        self.kernel = param((in_features, out_features), param_dtype, logical_axes, init)  # [in, out]
        self.bias = param((out_features,), param_dtype, (logical_axes[1],), ("zeros",)) if use_bias else None

    def cast_before_use(self) -> dict:
        """{parameter path: dtype} this layer casts before any use (elmjax/layers/scan.py
        stacks them so); an adapter uses the kernel as stored."""
        if self.adapter is not None:
            return {}
        return {("kernel",): self.compute_dtype, **({("bias",): self.compute_dtype} if self.bias is not None else {})}

    def __call__(self, x):
        kernel = self.kernel[...].astype(self.compute_dtype)
        wide = self.adapter is not None or max(jnp.dtype(self.compute_dtype).itemsize, self.output_dtype.itemsize) >= 4
        y = jax.lax.dot_general(
            x.astype(self.compute_dtype),
            kernel,
            (((x.ndim - 1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32 if wide else None,
        )
        if self.adapter is not None:
            y = self.adapter.linear(x.astype(self.compute_dtype), kernel, y)
        y = y.astype(self.output_dtype)
        if self.bias is not None:  # in the compute dtype, as stacked (cast_before_use); y keeps its dtype
            y = y + self.bias[...].astype(self.compute_dtype)
        return y

"""The SwiGLU feed-forward block with OpenELM's fused input projection."""
from __future__ import annotations

import jax
from flax import nnx

from elmjax.layers.linear import Linear


class SwiGLU(nnx.Module):
    """`proj_2(silu(gate) * up)` where `proj_1(x) = [gate | up]` (the gate is the FIRST half)."""

    def __init__(self, model_dim: int, ffn_dim: int, *, init, use_bias, compute_dtype, param_dtype):
        common = dict(use_bias=use_bias, compute_dtype=compute_dtype, param_dtype=param_dtype)
        self.proj_1 = Linear(
            model_dim, 2 * ffn_dim, init=init.linear(model_dim), logical_axes=("embed", "mlp"), **common
        )
        self.proj_2 = Linear(
            ffn_dim, model_dim, init=init.output_projection(), logical_axes=("mlp", "embed"), **common
        )

    def __call__(self, x):
        gate, up = jax.numpy.split(self.proj_1(x), 2, axis=-1)  # each [batch, seq, ffn_dim]
        return self.proj_2(jax.nn.silu(gate) * up)

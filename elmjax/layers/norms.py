"""Normalisation layers, computed in float32 and cast back to the input dtype."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from elmjax.layers.init import param


class RMSNorm(nnx.Module):
    """`x / sqrt(mean(x^2) + eps) * weight` over the last axis (SPEC §1: weight after cast)."""

    def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param((dim,), param_dtype, ("norm",), ("ones",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return normed.astype(x.dtype) * self.weight[...].astype(x.dtype)


class LayerNorm(nnx.Module):
    """Mean-centred normalisation with weight and optional bias (BTLM's norm)."""

    def __init__(self, dim: int, eps: float, use_bias: bool = True, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param((dim,), param_dtype, ("norm",), ("ones",))
        self.bias = param((dim,), param_dtype, ("norm",), ("zeros",)) if use_bias else None

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        out = (centred * jnp.reciprocal(jnp.sqrt(variance + self.eps))).astype(x.dtype)
        out = out * self.weight[...].astype(x.dtype)
        if self.bias is not None:
            out = out + self.bias[...].astype(x.dtype)
        return out


def make_norm(norm_type: str, dim: int, eps: float, use_bias: bool, param_dtype=jnp.float32):
    """The norm layer a config names (`model.norm_type`)."""
    if norm_type == "rms_norm":
        return RMSNorm(dim, eps, param_dtype)
    if norm_type == "layer_norm":
        return LayerNorm(dim, eps, use_bias, param_dtype)
    raise ValueError(f"unknown norm_type {norm_type!r}; allowed: rms_norm, layer_norm")

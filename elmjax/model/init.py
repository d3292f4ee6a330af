"""Parameter creation with logical axis names, and the initialisation schemes.

Every parameter carries logical axis names (`vocab, embed, heads, mlp, norm, ...`); the
sharding rules in the config map them to mesh axes (elmjax/sharding.py). Creating a model
needs no mesh: the train step places parameters by these names.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(value, logical_axes: tuple) -> nnx.Param:
    """An `nnx.Param` annotated with `logical_axes` (one name, or None, per dimension)."""
    return nnx.Param(value, sharding_names=tuple(logical_axes), eager_sharding=False)


def normal(key, shape, std: float, dtype=jnp.float32):
    """Plain (untruncated) normal N(0, std^2)."""
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class OpenELMInit:
    """OpenELM's from-scratch initialisation (SPEC §1).

    Linear weights ~ N(0, in_features^-0.5); embedding ~ N(0, d^-0.5); the residual-stream
    output projections (`out_proj`, `proj_2`) ~ N(0, d^-0.5 * (2 * num_layers)^-0.5).
    """

    def __init__(self, model_dim: int, num_layers: int):
        self.model_dim = model_dim
        self.num_layers = num_layers

    def embedding_std(self) -> float:
        return self.model_dim**-0.5

    def linear_std(self, in_features: int) -> float:
        return in_features**-0.5

    def output_projection_std(self) -> float:
        return self.model_dim**-0.5 * (2 * self.num_layers) ** -0.5


def make_init(scheme: str, model_dim: int, num_layers: int):
    """The initialiser a config names (`model.init_scheme`)."""
    if scheme == "openelm":
        return OpenELMInit(model_dim, num_layers)
    raise ValueError(f"unknown init_scheme {scheme!r}; allowed: openelm")

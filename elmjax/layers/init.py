"""Parameter creation with logical axis names and initialisation rules, and their values.

Modules declare parameters abstractly: shape, dtype, logical axis names (`vocab, embed,
heads, mlp, norm, ...`, mapped to mesh axes by the config's rules) and an init rule such as
`("normal", std)`. `materialize` then draws every value on the host with numpy from
(seed, parameter path). That makes the initial weights identical on every mesh shape,
backend and process count, compiles nothing (XLA:CPU takes minutes to compile hundreds of
threefry draws), and sends each device only its own shard.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elmjax.tree import path_name


def param(shape, dtype, logical_axes: tuple, init: tuple, kind=nnx.Param) -> nnx.Param:
    """A parameter placeholder of `shape`, annotated with `logical_axes` and its `init` rule.

    `init` is `("normal", std)`, `("truncated_normal", std, bound)` (N(0, std^2) cut at
    +-bound standard deviations), `("uniform", bound)` (U(-bound, bound)), `("ones",)` or
    `("zeros",)`. The value is zeros until `materialize` draws it; modules are built under
    `nnx.eval_shape`, so nothing is allocated. `kind`: the nnx.Param subclass to create
    (adapters use their own, elmjax/layers/adapters.py).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    return kind(
        jnp.zeros(shape, dtype), out_sharding=tuple(logical_axes), eager_sharding=False, init=tuple(init)
    )


def host_value(path: str, shape, dtype, init: tuple, seed: int) -> np.ndarray:
    """The initial value of the parameter at `path`, drawn from (seed, path) on the host."""
    kind = init[0]
    if kind == "ones":
        return np.ones(shape, dtype)
    if kind == "zeros":
        return np.zeros(shape, dtype)
    if kind == "normal":  # plain, untruncated N(0, std^2)
        rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(init[1])).astype(dtype)
    if kind == "uniform":
        rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
        bound = np.float32(init[1])
        return rng.uniform(-bound, bound, shape).astype(np.float32).astype(dtype)
    if kind == "truncated_normal":  # N(0, std^2) restricted to [-bound * std, bound * std]
        rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
        return (_truncated_standard_normal(rng, shape, float(init[2])) * np.float32(init[1])).astype(dtype)
    raise ValueError(f"unknown init rule {init!r} for parameter {path}")


def _truncated_standard_normal(rng, shape, bound: float) -> np.ndarray:
    """float32 standard normal draws of `shape` restricted to [-bound, bound].

    Rejection: draws outside are redrawn until none is left (4.6% of them per round at
    bound 2), so the values follow the truncated density exactly, as torch's
    `trunc_normal_(std=s, a=-bound*s, b=bound*s)` (what Cerebras' BTLM init uses) does up to
    the random stream.
    """
    if bound <= 0:
        raise ValueError(f"truncated_normal bound must be > 0 standard deviations, got {bound}")
    values = rng.standard_normal(shape, dtype=np.float32)
    outside = np.abs(values) > bound
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()), dtype=np.float32)
        outside = np.abs(values) > bound
    return values


def materialize(abstract_module: nnx.Module, seed: int, param_sharding=None) -> nnx.Module:
    """Gives every parameter of an abstract module its initial value.

    Args:
      abstract_module: a module built under `nnx.eval_shape` with `param` placeholders.
      seed: initialisation seed.
      param_sharding: optional `fn(logical_axes) -> jax.sharding.Sharding`; each device then
        receives only its shard (`jax.make_array_from_callback`), also across processes.
    """
    graphdef, state = nnx.split(abstract_module)
    for path, variable in nnx.to_flat_state(state):
        name = path_name(path)
        metadata = variable.get_metadata()
        if "init" not in metadata:
            raise ValueError(f"parameter {name} has no init rule; create it with elmjax.layers.init.param")
        shape, dtype = variable.shape, np.dtype(variable.dtype)
        value = host_value(name, shape, dtype, metadata["init"], seed)
        if param_sharding is None:
            variable.set_value(jax.device_put(value))
        else:
            sharding = param_sharding(metadata["out_sharding"])
            variable.set_value(jax.make_array_from_callback(shape, sharding, lambda index, v=value: v[index]))
    return nnx.merge(graphdef, state)


class InitRules:
    """Init rules (elmjax/layers/init.py) for the parameters a block creates.

    The default is OpenELM's scheme (SPEC §1): linear weights ~ N(0, in^-0.5), embedding
    ~ N(0, d^-0.5), residual-stream output projections ~ N(0, d^-0.5 * (2 * layers)^-0.5).
    """

    def __init__(self, model_dim: int, num_layers: int):
        self.model_dim = model_dim
        self.num_layers = num_layers

    def embedding(self) -> tuple:
        return ("normal", self.model_dim**-0.5)

    def linear(self, in_features: int) -> tuple:
        return ("normal", in_features**-0.5)

    def output_projection(self) -> tuple:
        return ("normal", self.model_dim**-0.5 * (2 * self.num_layers) ** -0.5)

    def output_head(self, in_features: int) -> tuple:
        """The untied output projection (logits); a linear layer by default."""
        return self.linear(in_features)

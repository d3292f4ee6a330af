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


def param(shape, dtype, logical_axes: tuple, init: tuple) -> nnx.Param:
    """A parameter placeholder of `shape`, annotated with `logical_axes` and its `init` rule.

    `init` is `("normal", std)`, `("truncated_normal", std, cutoff)` (cut at +-cutoff * std),
    `("ones",)` or `("zeros",)`. The value is zeros until
    `materialize` draws it; modules are built under `nnx.eval_shape`, so nothing is allocated.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    return nnx.Param(
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
    if kind == "truncated_normal":  # N(0, std^2) restricted to [-cutoff*std, cutoff*std]
        std, cutoff = float(init[1]), float(init[2])
        rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
        value = rng.standard_normal(shape, dtype=np.float32)
        # Redrawing the values outside the cut (0.27% of them at 3 sigma) samples the
        # truncated distribution exactly, like torch.nn.init.trunc_normal_.
        outside = np.abs(value) > cutoff
        while outside.any():
            value[outside] = rng.standard_normal(int(outside.sum()), dtype=np.float32)
            outside = np.abs(value) > cutoff
        return (value * np.float32(std)).astype(dtype)
    raise ValueError(f"unknown init rule {init!r} for parameter {path}")


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

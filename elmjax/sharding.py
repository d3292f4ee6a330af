"""Logical-axis sharding: model code names logical axes, a rules table maps them to the mesh.

`use_rules(mesh, rules)` activates a mesh and rules table; inside it `constrain(x, axes)`
applies `with_sharding_constraint` by logical name. Outside it `constrain` does nothing, so
models run unchanged on one device.
"""
from __future__ import annotations

import contextlib
import threading

import jax
from jax.sharding import NamedSharding, PartitionSpec

_active = threading.local()


def logical_to_spec(logical_axes, rules) -> PartitionSpec:
    """PartitionSpec for `logical_axes` under `rules` ((logical, mesh axes) pairs).

    A mesh axis is used at most once per array: a later dimension that maps to an axis
    already taken stays replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_rules(mesh, rules):
    """Makes `constrain` shard activations on `mesh` by `rules` within the block."""
    previous = getattr(_active, "value", None)
    _active.value = (mesh, tuple(rules))
    try:
        yield
    finally:
        _active.value = previous


def constrain(x, logical_axes):
    """`with_sharding_constraint` of `x` by logical axis names, if rules are active."""
    active = getattr(_active, "value", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))

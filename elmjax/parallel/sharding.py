"""Logical-axis sharding: model code names logical axes, a rules table maps them to the mesh.

`use_rules(mesh, rules)` activates a mesh and rules table; inside it `constrain(x, axes)`
applies `with_sharding_constraint` by logical name. Outside it `constrain` does nothing, so
models run unchanged on one device.
"""
from __future__ import annotations

import contextlib
import threading

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from elmjax.tree import unflatten
from elmjax.validation import ConfigError

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


def active_rules():
    """The (mesh, rules) set by the innermost `use_rules`, or None outside one."""
    return getattr(_active, "value", None)


def constrain(x, logical_axes, *, fit: bool = False):
    """`with_sharding_constraint` of `x` by logical axis names, if rules are active. `fit`:
    dimensions the mesh axes do not divide stay replicated (`fit_spec_to_shape`), as the
    parameters themselves are placed."""
    active = active_rules()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical_axes, rules)
    if fit:
        spec = fit_spec_to_shape(spec, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ---------------------------------------------------------------------------------------------
# Meshes and parameter placement (the train step's side of the rules table).

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def resolve_mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
    """Axis sizes for `num_devices` devices; the one axis set to -1 takes what is left.

    Raises ValueError naming the `mesh.*` fields when the sizes cannot cover the devices.
    """
    sizes = {name: int(mesh_config[name]) for name in MESH_AXES}
    fixed = 1
    for name, size in sizes.items():
        if size != -1:
            fixed *= size
    free = [name for name, size in sizes.items() if size == -1]
    if free:
        if num_devices % fixed:
            raise _mesh_error(
                f"the fixed axis sizes {sizes} multiply to {fixed}, which does not "
                f"divide the {num_devices} devices; change mesh.data/fsdp/tensor/expert"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise _mesh_error(
            f"axis sizes {sizes} multiply to {fixed} but there are {num_devices} "
            "devices; make mesh.data/fsdp/tensor/expert multiply to the device count, or set one to -1"
        )
    return sizes


def _mesh_error(message: str) -> ValueError:
    return ConfigError("mesh", message)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor, expert), all `AxisType.Auto`.

    Sizes come from `config.mesh` (-1 = the devices left over). `devices` defaults to every
    device of every process, so the same call works on one host and across processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def fit_spec_to_shape(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
    """`spec` with every dimension whose size its mesh axes do not divide left replicated.

    E.g. 3 kv heads on a tensor axis of 2 stay whole on every device instead of failing.
    """
    fitted = []
    for index, size in enumerate(shape):
        axes = spec[index] if index < len(spec) else None
        if axes is None:
            fitted.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        ways = 1
        for name in names:
            ways *= mesh.shape[name]
        fitted.append(axes if size % ways == 0 else None)
    return PartitionSpec(*fitted)


def param_shardings(param_state, mesh: Mesh, rules):
    """Pure dict of `NamedSharding`s for an (abstract) `nnx.State` of parameters.

    Logical names map through `rules` (`logical_to_spec`); a dimension the mesh cannot split
    evenly is replicated (`fit_spec_to_shape`).
    """
    from flax import nnx

    flat = {}
    for path, variable in nnx.to_flat_state(param_state):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        spec = fit_spec_to_shape(logical_to_spec(names, rules), variable.shape, mesh)
        flat[path] = NamedSharding(mesh, spec)
    return unflatten(flat)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a [batch, seq] input: batch by the `batch` rule, seq by the `seq` rule."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh` (scalars, step counters)."""
    return NamedSharding(mesh, PartitionSpec())

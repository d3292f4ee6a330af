"""Expert parallelism: an MoE layer per shard in `shard_map`, tokens sent to their experts.

The experts' leading axis carries the logical name `expert`; the rules table maps it to mesh
axes (`expert` by default), so each device holds E / ep experts, ep the product of those axes'
sizes. Tokens stay sharded as activations are everywhere (`batch` over data, fsdp and expert):
each device routes its own tokens, sends every token-expert assignment to the device that
holds the expert (all-to-all over the expert axes), runs its local experts on what it
received, and sends the results back, where they are combined.

Nothing is dropped. A device may receive any number of rows up to the worst case (every
token of every peer choosing this device's experts), so receive buffers are sized for it:
a device's T tokens send at most T * min(k, E / ep) assignments to one destination.

`exchange(..., dispatch)`:
- `dense`: one fixed-size slot block per destination ([ep, T * min(k, E/ep), d]) moved with
  `all_to_all`. Works everywhere, XLA:CPU included; the buffers are ep times the local
  assignments, mostly padding, which the grouped matmul skips (tiled) or masks.
- `ragged`: `ragged_all_to_all` sends only the real rows, into a worst-case receive buffer.
  For GPU and TPU (XLA:CPU in jax 0.10.2 does not implement it).
- `auto`: dense on CPU, ragged elsewhere.

When the rules also split the experts' inner (`mlp`) dimension (tensor parallelism), each
device computes partial outputs for its slice and they are summed over those axes at the end.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from elmjax.parallel.sharding import fit_spec_to_shape, logical_to_spec

DISPATCH_IMPLS = ("auto", "dense", "ragged")
TOKEN_AXES = ("batch", "seq", None)  # [batch, seq, d]: the feature dim stays whole per device
GATE_UP_AXES = ("expert", None, None, "mlp")  # [E, d, 2, I]; d is gathered for the layer
DOWN_AXES = ("expert", "mlp", None)  # [E, I, d]


@dataclasses.dataclass(frozen=True)
class ExpertAxis:
    """The mesh axes the experts are split over, as collectives name them, and their size."""

    names: tuple[str, ...]
    size: int

    @property
    def name(self):
        """The axis name for jax.lax collectives (a tuple when several mesh axes)."""
        return self.names[0] if len(self.names) == 1 else self.names


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def resolve_dispatch(dispatch: str) -> str:
    """The all-to-all `auto` stands for on the default backend."""
    if dispatch != "auto":
        return dispatch
    return "dense" if jax.default_backend() == "cpu" else "ragged"


def shard_mapped(body, mesh, rules, x, weights, experts, gate_up, down):
    """Runs `body(x [T, d], weights [T, k], experts [T, k], gate_up, down, axis)` per shard.

    x [batch, seq, d], weights/experts [batch, seq, k] are split like activations; gate_up
    [E, d, 2, I] and down [E, I, d] by the `expert` (and `mlp`) rules, gathered along d. The
    body gets this device's tokens flattened, its experts and the `ExpertAxis`, and returns
    float32 [T, d]. Returns [batch, seq, d] in x's dtype.
    """
    token_spec = fit_spec_to_shape(logical_to_spec(TOKEN_AXES, rules), x.shape, mesh)
    gate_up_spec = fit_spec_to_shape(logical_to_spec(GATE_UP_AXES, rules), gate_up.shape, mesh)
    down_spec = fit_spec_to_shape(logical_to_spec(DOWN_AXES, rules), down.shape, mesh)
    expert_names = _axes(gate_up_spec[0])
    if _axes(down_spec[0]) != expert_names:
        raise ValueError(f"expert kernels split differently over the mesh: {gate_up_spec} vs {down_spec}")
    inner_names = _axes(gate_up_spec[3]) if _axes(gate_up_spec[3]) == _axes(down_spec[1]) else ()
    if not inner_names:  # split one and not the other: keep both whole
        gate_up_spec = PartitionSpec(gate_up_spec[0], None, None, None)
        down_spec = PartitionSpec(down_spec[0], None, None)
    axis = ExpertAxis(expert_names, math.prod(mesh.shape[name] for name in expert_names))
    routing_spec = PartitionSpec(token_spec[0], token_spec[1], None)

    def local(x, weights, experts, gate_up, down):
        batch, seq, model_dim = x.shape
        flat = lambda a: a.reshape(batch * seq, *a.shape[2:])  # noqa: E731
        out = body(flat(x), flat(weights), flat(experts), gate_up, down, axis)  # [T, d] float32
        if inner_names:  # each device summed its slice of the experts' inner dimension
            out = jax.lax.psum(out, inner_names[0] if len(inner_names) == 1 else inner_names)
        return out.reshape(batch, seq, model_dim).astype(x.dtype)

    # check_vma=False: ragged_all_to_all and the Pallas grouped matmul do not track varying
    # manual axes.
    return jax.shard_map(
        local, mesh=mesh, in_specs=(token_spec, routing_spec, routing_spec, gate_up_spec, down_spec),
        out_specs=token_spec, check_vma=False,
    )(x, weights, experts, gate_up, down)


def exchange(compute, x, experts, axis: ExpertAxis, num_local: int, dispatch: str):
    """Expert outputs [T * k, d] (assignment order, float32) for this device's tokens.

    x [T, d]; experts [T, k] global expert ids (expert e lives on device e // num_local of
    the expert axis); `compute(rows [R, d], local_expert [R]) -> [R, d]` runs this device's
    experts on received rows (local id `num_local` marks padding).
    """
    dispatch = resolve_dispatch(dispatch)
    if dispatch == "dense":
        return _dense(compute, x, experts, axis, num_local)
    if dispatch == "ragged":
        return _ragged(compute, x, experts, axis, num_local)
    raise ValueError(f"model.moe_dispatch={dispatch!r}; allowed: {', '.join(DISPATCH_IMPLS)}")


def _sorted_assignments(experts, num_local: int, ep: int):
    """The T * k assignments of experts [T, k] sorted by expert, hence by destination device.

    Returns (order [A]: assignment index of each sorted row, local expert id on the
    destination [A], destination [A], rows per destination [ep], first sorted row of each
    destination [ep]).
    """
    flat = experts.reshape(-1)  # [A], A = T * k
    order = jnp.argsort(flat, stable=True)  # [A]
    sorted_expert = flat[order]
    destination = sorted_expert // num_local  # [A], non-decreasing
    send_sizes = jnp.zeros((ep,), jnp.int32).at[destination].add(1)  # [ep]
    send_offsets = jnp.cumsum(send_sizes) - send_sizes  # [ep]: first sorted row for each device
    return order, sorted_expert - destination * num_local, destination, send_sizes, send_offsets


def _unsort(sorted_out, order):
    return jnp.zeros_like(sorted_out).at[order].set(sorted_out)


def _dense(compute, x, experts, axis: ExpertAxis, num_local: int):
    tokens, k = experts.shape
    ep, assignments = axis.size, tokens * k
    order, local_expert, destination, _, send_offsets = _sorted_assignments(experts, num_local, ep)
    capacity = tokens * min(k, num_local)  # the most one device can send to one destination
    slot = jnp.arange(assignments) - send_offsets[destination]  # [A]: place in its block
    send = jnp.zeros((ep, capacity, x.shape[1]), x.dtype).at[destination, slot].set(x[order // k])
    send_expert = jnp.full((ep, capacity), num_local, jnp.int32).at[destination, slot].set(local_expert)
    # received[j] = the block device j sent here
    received = jax.lax.all_to_all(send, axis.name, 0, 0, tiled=True)  # [ep, C, d]
    received_expert = jax.lax.all_to_all(send_expert, axis.name, 0, 0, tiled=True)  # [ep, C]
    out = compute(received.reshape(ep * capacity, -1), received_expert.reshape(-1))  # [ep * C, d]
    returned = jax.lax.all_to_all(out.astype(x.dtype).reshape(ep, capacity, -1), axis.name, 0, 0, tiled=True)
    return _unsort(returned[destination, slot], order)  # [A, d]


def _ragged(compute, x, experts, axis: ExpertAxis, num_local: int):
    tokens, k = experts.shape
    ep = axis.size
    order, local_expert, _, send_sizes, send_offsets = _sorted_assignments(experts, num_local, ep)
    sizes = jax.lax.all_gather(send_sizes, axis.name)  # [ep (source), ep (destination)]
    me = jax.lax.axis_index(axis.name)
    # A source's block lands at a destination after the blocks of the sources before it.
    before = jnp.cumsum(sizes, axis=0) - sizes  # before[i, j] = rows sources < i send to j
    output_offsets = before[me]  # [ep]: where my block starts on each destination
    recv_sizes = sizes[:, me]  # [ep]: rows each source sends me
    recv_offsets = before[:, me]  # [ep]: where each source's block starts here
    capacity = ep * tokens * min(k, num_local)  # worst case received
    rows = x[order // k]  # [A, d] sorted by expert
    received = jax.lax.ragged_all_to_all(
        rows, jnp.zeros((capacity, x.shape[1]), x.dtype), send_offsets, send_sizes, output_offsets,
        recv_sizes, axis_name=axis.name,
    )
    received_expert = jax.lax.ragged_all_to_all(
        local_expert, jnp.full((capacity,), num_local, jnp.int32), send_offsets, send_sizes,
        output_offsets, recv_sizes, axis_name=axis.name,
    )
    out = compute(received, received_expert).astype(x.dtype)  # [capacity, d]
    # Back: each source's rows return to where they came from in its sorted order.
    home_offsets = (jnp.cumsum(sizes, axis=1) - sizes)[:, me]  # [ep]: my block's start at source i
    returned = jax.lax.ragged_all_to_all(
        out, jnp.zeros_like(rows), recv_offsets, recv_sizes, home_offsets, send_sizes, axis_name=axis.name,
    )
    return _unsort(returned, order)  # [A, d]

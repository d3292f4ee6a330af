"""Token dispatch of one MoE layer: every token-expert assignment is computed, none dropped.

The k assignments of T tokens are sorted by expert, their rows gathered into one
[T * k, d] array grouped by expert, pushed through the experts as two grouped matmuls
(elmjax/layers/moe/grouped.py), put back in assignment order and combined as
`out_t = sum_j weight_tj * expert_{e_tj}(x_t)`. There is no capacity: the arrays hold all
T * k assignments whatever the routing. With expert parallelism (elmjax/parallel/expert.py)
the same expert computation runs on each device for the rows other devices sent it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from elmjax.layers.moe.grouped import grouped_matmul
from elmjax.parallel import expert as expert_parallel
from elmjax.parallel import sharding


def expert_ffn(rows, group_sizes, gate_up, down, *, impl: str, tile: int, compute_dtype):
    """SwiGLU experts `down(silu(gate(x)) * up(x))` over rows grouped by expert.

    rows [R, d] sorted by expert; group_sizes [g]; gate_up [g, d, 2, I] (index 0 of the
    third axis is the gate); down [g, I, d]. Returns float32 [R, d] (0 for rows past the
    groups). The products run in `compute_dtype` with float32 accumulation.
    """
    groups, model_dim, _, inner = gate_up.shape
    # [g, d, 2, I] -> [g, d, 2I] puts the gate in the first I columns; a tensor-parallel shard
    # of the I axis keeps matching gate and up columns together.
    fused = gate_up.reshape(groups, model_dim, 2 * inner).astype(compute_dtype)
    hidden = grouped_matmul(rows.astype(compute_dtype), fused, group_sizes, impl=impl, tile=tile)  # [R, 2I]
    gate, up = hidden[:, :inner], hidden[:, inner:]
    activated = (jax.nn.silu(gate) * up).astype(compute_dtype)  # [R, I]
    return grouped_matmul(activated, down.astype(compute_dtype), group_sizes, impl=impl, tile=tile)  # [R, d]


def apply_experts(ffn, source, row_source, row_expert, num_groups: int):
    """Expert outputs for rows `source[row_source]` in row order.

    source [N, d]; row_source [R] int (which source row each row is); row_expert [R] int in
    [0, num_groups], where `num_groups` marks a padding row that no expert takes (its output
    is 0). `ffn(sorted_rows [R, d], group_sizes [num_groups])` computes the grouped experts.
    Returns float32 [R, d].
    """
    order = jnp.argsort(row_expert, stable=True)  # [R]: rows grouped by expert, padding last
    group_sizes = jnp.zeros((num_groups + 1,), jnp.int32).at[row_expert].add(1)[:num_groups]
    out_sorted = ffn(source[row_source[order]], group_sizes)  # [R, d]
    return jnp.zeros_like(out_sorted).at[order].set(out_sorted)  # back to row order


def combine(assignment_out, weights):
    """`sum_j weights[t, j] * out[t * k + j]`: assignment_out [T * k, d], weights [T, k] ->
    float32 [T, d]."""
    tokens, k = weights.shape
    per_token = assignment_out.astype(jnp.float32).reshape(tokens, k, -1)
    return jnp.einsum("tkd,tk->td", per_token, weights.astype(jnp.float32))


def local_moe(ffn, x, weights, experts, num_experts: int):
    """The MoE output float32 [T, d] for tokens x [T, d] routed to experts [T, k] with
    weights [T, k], all experts on this device."""
    tokens, k = experts.shape
    assignment_token = jnp.arange(tokens * k) // k  # [T * k]: assignment a belongs to token a // k
    out = apply_experts(ffn, x, assignment_token, experts.reshape(-1), num_experts)
    return combine(out, weights)


def moe(x, weights, experts, gate_up, down, *, impl: str, tile: int, dispatch: str, compute_dtype):
    """The MoE feed-forward for x [batch, seq, d] routed to experts [batch, seq, k] with
    weights [batch, seq, k]; experts gate_up [E, d, 2, I] and down [E, I, d].

    Without sharding rules (one device, decoding) every expert runs here. Under rules (the
    train step) the layer runs per shard in `shard_map`: each device sorts its own tokens, and
    when the rules split the experts over mesh axes the assignments travel to the devices
    holding their experts (`dispatch`: dense or ragged all-to-all, elmjax/parallel/expert.py).
    Returns [batch, seq, d] in x's dtype.
    """
    num_experts = gate_up.shape[0]

    def body(x, weights, experts, gate_up, down, axis):
        ffn = functools.partial(expert_ffn, gate_up=gate_up, down=down, impl=impl, tile=tile,
                                compute_dtype=compute_dtype)
        if axis is None or axis.size == 1:
            return local_moe(ffn, x, weights, experts, num_experts)
        num_local = gate_up.shape[0]  # this device's experts

        def compute(rows, row_expert):
            return apply_experts(ffn, rows, jnp.arange(rows.shape[0]), row_expert, num_local)

        out = expert_parallel.exchange(compute, x, experts, axis, num_local, dispatch)  # [T * k, d]
        return combine(out, weights)

    batch, seq, model_dim = x.shape
    active = sharding.active_rules()
    if active is None:
        flat = lambda a: a.reshape(batch * seq, *a.shape[2:])  # noqa: E731
        out = body(flat(x), flat(weights), flat(experts), gate_up, down, None)
        return out.reshape(batch, seq, model_dim).astype(x.dtype)
    mesh, rules = active
    return expert_parallel.shard_mapped(body, mesh, rules, x, weights, experts, gate_up, down)

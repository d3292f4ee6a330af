"""Grouped (ragged) matrix multiplication: rows sorted by group, each group times its own matrix.

`grouped_matmul(lhs, rhs, group_sizes)` with lhs [rows, k], rhs [groups, k, n] and
group_sizes [groups] multiplies rows `[start_g, start_g + group_sizes[g])` of lhs by `rhs[g]`
(groups laid out one after another from row 0). Rows past `sum(group_sizes)` belong to no
group; their output is zero. Every result is float32 (the products accumulate in float32
whatever the input dtype).

Implementations (`model.moe_matmul`):
- `ragged_dot`: `jax.lax.ragged_dot`, XLA's grouped matmul on GPU and TPU. On XLA:CPU, jax
  0.10.2 lowers it to a masked dense product over ALL groups (`ragged_to_dense` in
  jax/_src/lax/lax.py): every row is multiplied by every group's matrix, `groups` times the
  useful FLOPs. Correct, but it is exactly the all-experts-on-all-tokens compute an MoE avoids.
- `tiled`: plain JAX for any backend. Rows are cut into tiles of `tile` rows; a loop visits
  each (tile, group) pair that overlaps (at most rows/tile + groups - 1 visits, only as many
  as the group sizes need) and multiplies one tile by one group's matrix, masking the rows of
  other groups. The work is the useful FLOPs plus at most one partial tile per group. Both
  gradients are the same loop (custom VJP), so the backward pass costs the same.
- `megablox`: the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.megablox.gmm` (the same
  tile visits, on the MXU). Off TPU it runs in Pallas interpret mode (tests only).
- `auto`: megablox on TPU, ragged_dot on GPU, tiled on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MATMUL_IMPLS = ("auto", "tiled", "ragged_dot", "megablox")
DEFAULT_TILE = 128


def resolve_impl(impl: str) -> str:
    """The implementation `auto` stands for on the default backend."""
    if impl != "auto":
        return impl
    return {"tpu": "megablox", "gpu": "ragged_dot"}.get(jax.default_backend(), "tiled")


def grouped_matmul(lhs, rhs, group_sizes, *, impl: str = "auto", tile: int = DEFAULT_TILE,
                   transpose_rhs: bool = False):
    """lhs [m, k] rows sorted by group; rhs [g, k, n] ([g, n, k] with `transpose_rhs`);
    group_sizes [g] int32 with sum <= m. Returns float32 [m, n]; rows outside every group are 0.
    """
    impl = resolve_impl(impl)
    group_sizes = group_sizes.astype(jnp.int32)
    if impl == "ragged_dot":
        if transpose_rhs:
            rhs = jnp.swapaxes(rhs, 1, 2)
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    if impl == "tiled":
        return _tiled(lhs, rhs, group_sizes, tile, transpose_rhs)
    if impl == "megablox":
        return _megablox(lhs, rhs, group_sizes, tile, transpose_rhs)
    raise ValueError(f"model.moe_matmul={impl!r} is not a grouped matmul; allowed: {', '.join(MATMUL_IMPLS)}")


def _megablox(lhs, rhs, group_sizes, tile: int, transpose_rhs: bool):
    from jax.experimental.pallas.ops.tpu.megablox import ops

    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm = min(tile, _round_up(m, 8))
    # The kernel leaves rows outside every group unwritten, forward and backward: select them
    # away on the way in and out, so they are the documented zeros and their gradient is 0.
    in_group = (jnp.arange(m) < jnp.sum(group_sizes))[:, None]
    padded = _pad_rows(jnp.where(in_group, lhs, 0), tm)
    interpret = jax.default_backend() != "tpu"
    # Positional: ops.gmm is a custom_vjp whose static arguments are positions 3, 4, 7, 8.
    out = ops.gmm(padded, rhs, group_sizes, jnp.float32, (tm, min(k, 128), min(n, 128)), None, None,
                  transpose_rhs, interpret)[:m]
    return jnp.where(in_group, out, 0.0)


# ---- tiled: a loop over (tile, group) visits ---------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_rows(x, tile: int):
    rows = x.shape[0]
    padded = _round_up(max(rows, 1), tile)
    return x if padded == rows else jnp.pad(x, ((0, padded - rows), (0, 0)))


def _visits(group_sizes, num_tiles: int, tile: int):
    """The (tile, group) pairs that overlap, ordered by group, as arrays indexed by visit.

    Returns (group [V], tile index [V], group start row [V], group end row [V], count) with
    V = num_tiles + groups - 1 (the most visits any group sizes need); only the first
    `count` entries are real.
    """
    groups = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first_tile = starts // tile
    visits_per_group = jnp.where(group_sizes > 0, (ends - 1) // tile - first_tile + 1, 0)
    visit_ends = jnp.cumsum(visits_per_group)
    visit = jnp.arange(num_tiles + groups - 1)
    group = jnp.minimum(jnp.searchsorted(visit_ends, visit, side="right"), groups - 1)
    tile_index = first_tile[group] + visit - (visit_ends - visits_per_group)[group]
    return group, tile_index, starts[group], ends[group], visit_ends[-1]


def _tile_mask(tile_index, start, end, tile: int):
    rows = tile_index * tile + jnp.arange(tile)
    return (rows >= start) & (rows < end)  # [tile]


def _tiled_forward(lhs, rhs, group_sizes, tile: int, transpose_rhs: bool):
    lhs = _pad_rows(lhs, tile)
    rows, n = lhs.shape[0], (rhs.shape[1] if transpose_rhs else rhs.shape[2])
    group, tile_index, start, end, count = _visits(group_sizes, rows // tile, tile)
    contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

    def visit(v, out):
        row0 = tile_index[v] * tile
        x = jax.lax.dynamic_slice_in_dim(lhs, row0, tile, 0)  # [tile, k]
        w = jax.lax.dynamic_index_in_dim(rhs, group[v], 0, keepdims=False)  # [k, n] or [n, k]
        y = jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)
        mask = _tile_mask(tile_index[v], start[v], end[v], tile)[:, None]
        current = jax.lax.dynamic_slice_in_dim(out, row0, tile, 0)
        return jax.lax.dynamic_update_slice_in_dim(out, current + jnp.where(mask, y, 0.0), row0, 0)

    # A dynamic trip count: only the visits the group sizes need run (an expert-parallel
    # receive buffer is mostly padding rows that belong to no group).
    return jax.lax.fori_loop(0, count, visit, jnp.zeros((rows, n), jnp.float32))


def _tiled_rhs_grad(lhs, grad, group_sizes, tile: int, num_groups: int):
    """d rhs [g, k, n] = sum over each group's rows of lhs_row^T grad_row (float32)."""
    lhs, grad = _pad_rows(lhs, tile), _pad_rows(grad, tile)
    rows, k, n = lhs.shape[0], lhs.shape[1], grad.shape[1]
    group, tile_index, start, end, count = _visits(group_sizes, rows // tile, tile)

    def visit(v, acc):
        row0 = tile_index[v] * tile
        mask = _tile_mask(tile_index[v], start[v], end[v], tile)[:, None]
        x = jnp.where(mask, jax.lax.dynamic_slice_in_dim(lhs, row0, tile, 0), 0)  # [tile, k]
        g = jax.lax.dynamic_slice_in_dim(grad, row0, tile, 0)  # [tile, n]
        contribution = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        current = jax.lax.dynamic_index_in_dim(acc, group[v], 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(acc, current + contribution, group[v], 0)

    return jax.lax.fori_loop(0, count, visit, jnp.zeros((num_groups, k, n), jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled(lhs, rhs, group_sizes, tile: int, transpose_rhs: bool):
    return _tiled_forward(lhs, rhs, group_sizes, tile, transpose_rhs)[: lhs.shape[0]]


def _tiled_fwd(lhs, rhs, group_sizes, tile, transpose_rhs):
    return _tiled(lhs, rhs, group_sizes, tile, transpose_rhs), (lhs, rhs, group_sizes)


def _tiled_bwd(tile, transpose_rhs, residuals, grad):
    lhs, rhs, group_sizes = residuals
    grad = grad.astype(lhs.dtype)  # the products run in the inputs' dtype, as in the forward
    # d lhs = grad @ rhs[g]^T per group: the same loop against the transposed matrices.
    grad_lhs = _tiled_forward(grad, rhs, group_sizes, tile, not transpose_rhs)[: lhs.shape[0]]
    grad_rhs = _tiled_rhs_grad(lhs, grad, group_sizes, tile, rhs.shape[0])  # [g, k, n]
    if transpose_rhs:
        grad_rhs = jnp.swapaxes(grad_rhs, 1, 2)
    return grad_lhs.astype(lhs.dtype), grad_rhs.astype(rhs.dtype), None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)

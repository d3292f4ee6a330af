"""Checksums of a checkpoint's arrays: written with every step, verified on every restore.

Orbax notices a missing or truncated file, but not bytes changed in place: those restore
"successfully" as wrong values (a NaN in one kernel poisons every later step). Each array
leaf gets a 32-bit position-weighted sum of its bit patterns, computed where the arrays live
(sharded, on device; exact integer arithmetic, so any mesh or process count gives the same
value). Restoring compares the restored arrays' checksums with the saved ones.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from elmjax.tree import path_name

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_GOLDEN = np.uint32(2654435761)  # Knuth's multiplicative hash: position weights spread well


def _leaf_checksum(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * _GOLDEN | jnp.uint32(1)  # odd: no bit is ignored
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(leaves):
    return [_leaf_checksum(leaf) for leaf in leaves]


def checksums(tree) -> dict[str, int]:
    """{leaf path: 32-bit checksum} of every array leaf of `tree` (device or host arrays)."""
    paths_and_leaves = jax.tree_util.tree_leaves_with_path(tree)
    values = jax.device_get(_checksums([leaf for _, leaf in paths_and_leaves]))
    return {path_name(path): int(value) for (path, _), value in zip(paths_and_leaves, values)}


def mismatches(saved: dict, tree) -> list[str]:
    """Paths whose restored arrays do not have the checksum saved with them (leaves the
    saved table does not list are not checked)."""
    current = checksums(tree)
    return sorted(path for path, value in current.items() if path in saved and saved[path] != value)

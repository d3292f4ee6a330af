"""Parameter trees by '/'-joined path: the one flattening every reader and writer uses.

A path is the tuple of keys of a pytree leaf (`('layers', 0, 'attn', 'qkv_proj', 'kernel')`);
its name is `'layers/0/attn/qkv_proj/kernel'`.
"""
from __future__ import annotations

import numpy as np


def path_name(path) -> str:
    """'/'-joined keys of a path of plain keys, nnx path entries or jax key entries."""
    return "/".join(_key_name(key) for key in path)


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):  # jax DictKey / GetAttrKey / SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def flatten(tree) -> dict[str, np.ndarray]:
    """{path name: numpy array} of a nested dict, an `nnx.State` or an nnx module's params.

    nnx Variables are unwrapped to their values.
    """
    from flax import nnx

    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    if isinstance(tree, nnx.State):
        return {path_name(path): np.asarray(leaf[...]) for path, leaf in nnx.to_flat_state(tree)}
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + "/")
            else:
                flat[name] = np.asarray(value)

    walk(tree, "")
    return flat


def unflatten(flat: dict) -> dict:
    """Nested dict from {path tuple or name: value}; names split at '/' (integer-looking keys
    become ints, as nnx list indices are)."""
    tree: dict = {}
    for path, value in flat.items():
        if isinstance(path, str):
            path = tuple(int(k) if k.isdigit() else k for k in path.split("/"))
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree

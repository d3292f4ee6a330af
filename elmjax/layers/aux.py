"""Auxiliary terms a model returns beside its logits: extra losses with their weights, and
metrics (router statistics and the like).

An aux dict is `{"losses": {name: (value, weight)}, "metrics": {name: value}}` with float32
scalar values and Python float weights. A module that produces terms returns one per call;
the decoder merges its layers' dicts with `merge_layers`, and the train step adds
`weighted_sum(aux)` to the loss and logs every value. Models without such terms return
`empty()`.
"""
from __future__ import annotations

import jax.numpy as jnp


def empty() -> dict:
    """An aux dict with no terms."""
    return {"losses": {}, "metrics": {}}


def merge_layers(per_layer: dict) -> dict:
    """One aux dict from {layer index: that layer's aux dict}.

    A loss that several layers report is averaged over them (its weight is the layer's); each
    metric is kept per layer as `layer{i}/{name}`.
    """
    losses: dict = {}
    metrics: dict = {}
    for index, aux in sorted(per_layer.items()):
        for name, (value, weight) in aux["losses"].items():
            losses.setdefault(name, ([], weight))[0].append(value)
        for name, value in aux["metrics"].items():
            metrics[f"layer{index}/{name}"] = value
    return {
        "losses": {name: (jnp.mean(jnp.stack(values)), weight) for name, (values, weight) in losses.items()},
        "metrics": metrics,
    }


def weighted_sum(aux: dict):
    """`sum(weight * value)` over the aux losses (float32 0 when there are none)."""
    total = jnp.float32(0.0)
    for value, weight in aux["losses"].values():
        total = total + weight * value.astype(jnp.float32)
    return total


def values(aux: dict) -> dict:
    """Every term's value by name (losses unweighted), for logging."""
    return {**{name: value for name, (value, _) in aux["losses"].items()}, **aux["metrics"]}

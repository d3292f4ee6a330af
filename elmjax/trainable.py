"""What trains: the one filter over a model's variables that setup, the train step, the
optimizer, checkpoints, export and `count_params` share.

By default every `nnx.Param` trains. The variables the filter leaves out are "frozen": they
enter the forward pass but get no gradient, no optimizer state and no place in training
checkpoints (a family's fixed buffers, or a base model under adapters); a run rebuilds them
when it starts (from `train.init_from`, else from the initialisation seed).
"""
from __future__ import annotations

from flax import nnx


def trainable_filter(model_config):
    """The nnx filter of the variables that train for `config.model` (all parameters)."""
    del model_config  # adapters (fine-tuning) will narrow this to their own parameters
    return nnx.Param


def split(model, model_config):
    """(graphdef, trainable State, frozen State) of `model`; `nnx.merge(graphdef, trainable,
    frozen)` puts it back together."""
    return nnx.split(model, trainable_filter(model_config), ...)


def count(model, model_config) -> tuple[int, int]:
    """(trainable, total) numbers of variable elements of a (possibly abstract) model."""
    import jax

    _, trainable, frozen = split(model, model_config)
    trainable_size = sum(int(x.size) for x in jax.tree.leaves(trainable))
    return trainable_size, trainable_size + sum(int(x.size) for x in jax.tree.leaves(frozen))

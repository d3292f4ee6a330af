"""What trains: the one filter over a model's variables that setup, the train step, the
optimizer, checkpoints, export and `count_params` share.

By default every `nnx.Param` trains; with adapters (`config.model.adapter.kind` lora or dora,
elmjax/layers/adapters.py) only the adapters' parameters do. The variables the filter leaves out are "frozen": they
enter the forward pass but get no gradient, no optimizer state and no place in training
checkpoints (a family's fixed buffers, or a base model under adapters); a run rebuilds them
when it starts (from `train.init_from`, else from the initialisation seed).
"""
from __future__ import annotations

from flax import nnx


def trainable_filter(model_config):
    """The nnx filter of the variables that train for `config.model`: every parameter, or
    only the adapters' when adapters are on."""
    from elmjax.layers.adapters import AdapterParam

    if adapters_on(model_config):
        return AdapterParam
    return nnx.Param


def adapters_on(model_config) -> bool:
    """Whether `config.model` trains LoRA/DoRA adapters over a frozen base."""
    adapter = model_config.get("adapter")
    return adapter is not None and adapter.kind != "none"


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

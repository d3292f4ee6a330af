"""elmjax parameters <-> a model family's Hugging Face layout, as numpy arrays.

The names and config.json keys belong to each family (`family.hf_layout`, e.g.
elmjax/models/openelm/hf.py); these functions find the layout for a config and apply it.
"""
from __future__ import annotations

import numpy as np

from elmjax import models, tree


def layout_for(model_config):
    """The Hugging Face layout of `model_config`'s family; ValueError if it has none."""
    family = models.get(model_config.family)
    if family.hf_layout is None:
        raise ValueError(f"model family {family.name!r} has no Hugging Face layout; it cannot be exported")
    return family.hf_layout


def to_hf_state_dict(params, model_config, vocab_rows: int | None = None) -> dict[str, np.ndarray]:
    """HF-named arrays from an elmjax model, its Param state or a pure dict of params."""
    return layout_for(model_config).to_hf(tree.flatten(params), model_config, vocab_rows)


def to_mlx_state_dict(params, model_config, vocab_rows: int | None = None) -> dict[str, np.ndarray]:
    """mlx-lm-named arrays: the layout's `to_mlx` where mlx-lm's names differ from HF's
    (stacked experts), else the HF names, which mlx-lm reads as they are."""
    layout = layout_for(model_config)
    convert = getattr(layout, "to_mlx", layout.to_hf)
    return convert(tree.flatten(params), model_config, vocab_rows)


def from_hf_state_dict(tensors: dict, model_config) -> dict[str, np.ndarray]:
    """Flat elmjax parameter paths ('layers/0/attn/qkv_proj/kernel') -> arrays, from HF names."""
    return layout_for(model_config).from_hf(tensors, model_config)


def hf_config(model_config, torch_dtype: str = "float32", vocab_size: int | None = None) -> dict:
    """config.json of the family's release format for this model."""
    return layout_for(model_config).config_json(model_config, torch_dtype, vocab_size)

"""Shared helpers of the adapter tests: a small OpenELM with LoRA/DoRA adapters whose every
adapter tensor is non-zero (a freshly initialised adapter has B = 0 and changes nothing)."""
import copy

import numpy as np
from flax import nnx

from elmjax import tree
from elmjax.tree import path_name
from elmjax.layers.adapters import scale
from elmjax.layers.decoder import abstract_model
from export_support import random_params, tiny_config

LINEAR_TARGETS = "qkv_proj,out_proj,proj_1,proj_2"


def adapter_config(kind: str, targets: str = LINEAR_TARGETS, rank: int = 4, alpha: float = 8.0, rslora=False):
    """A validated small config with `kind` adapters on `targets` (dropout 0.1, as trained)."""
    config = tiny_config(num_layers=2, model_dim=64, head_dim=16, ffn_dim_divisor=32, vocab_size=256)
    adapter = config.model.adapter
    adapter.kind, adapter.targets, adapter.rank, adapter.alpha, adapter.rslora = kind, targets, rank, alpha, rslora
    return config


def base_config_of(config):
    """The same model without adapters."""
    base = copy.deepcopy(config)
    base.model.adapter.kind = "none"
    return base


def adapted_params(config, seed=0) -> dict:
    """Full pure dict: random base weights (export_support.random_params) and random adapters
    (A, B ~ N(0, 0.1); DoRA magnitudes = column norms x U(0.8, 1.2))."""
    rng = np.random.default_rng(seed + 100)
    base = tree.flatten(nnx.to_pure_dict(random_params(base_config_of(config).model, seed)))
    shapes = {path_name(path): v.shape for path, v in nnx.to_flat_state(nnx.state(abstract_model(config.model), nnx.Param))}
    flat = {}
    for key, shape in shapes.items():
        if key in base:
            flat[key] = base[key]
        elif key.endswith("magnitude"):
            continue  # after A and B, below
        else:
            flat[key] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    for key in shapes:
        if key.endswith("magnitude"):
            prefix = key[: -len("magnitude")]
            kernel = base["token_embeddings"] if prefix == "embedding_adapter/" else base[prefix.removesuffix("adapter/") + "kernel"]
            norms = np.linalg.norm(kernel + scale(config.model.adapter) * flat[prefix + "lora_a"] @ flat[prefix + "lora_b"],
                                   axis=0)
            flat[key] = (norms * rng.uniform(0.8, 1.2, norms.shape)).astype(np.float32)
    return tree.unflatten(flat)


def adapted_model(config, params):
    """The nnx model of `config` holding `params` (pure dict)."""
    graphdef, state = nnx.split(abstract_model(config.model))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)

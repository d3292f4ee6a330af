"""LoRA/DoRA adapters out of elmjax: merged into the base, or alone in peft's and mlx-lm's
formats (SPEC §5).

Parameters are flat dicts of numpy arrays keyed by elmjax paths: an adapted linear layer at
`layers/0/attn/qkv_proj` has `.../kernel` [in, out] and `.../adapter/lora_a` [in, r],
`.../adapter/lora_b` [r, out] (DoRA: `.../adapter/magnitude` [out]); the embedding's adapter
is `embedding_adapter/...` over `token_embeddings` [vocab, dim].
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np

from elmjax import tree
from elmjax.convert import hf
from elmjax.layers.adapters import EMBEDDING_TARGET, scale

ADAPTER_FORMATS = ("peft", "mlx")
_SUFFIX = "/adapter/"
_EMBEDDING = "embedding_adapter/"


def adapted_layers(flat: dict) -> dict[str, str]:
    """{elmjax layer path: its adapter's key prefix} ('layers/0/attn/qkv_proj' ->
    'layers/0/attn/qkv_proj/adapter/', 'token_embeddings' -> 'embedding_adapter/')."""
    layers = {}
    for key in flat:
        if key.endswith(_SUFFIX + "lora_a"):
            layer = key[: -len(_SUFFIX + "lora_a")]
            layers[layer] = layer + _SUFFIX
        elif key == _EMBEDDING + "lora_a":
            layers[EMBEDDING_TARGET] = _EMBEDDING
    return layers


def _base_kernel(flat: dict, layer: str) -> np.ndarray:
    return flat[EMBEDDING_TARGET] if layer == EMBEDDING_TARGET else flat[f"{layer}/kernel"]


def _merged_kernel(flat: dict, layer: str, prefix: str, adapter_config, magnitude: bool = True) -> np.ndarray:
    """W + s A B, rescaled per output column to the magnitude under DoRA (unless `magnitude`
    is False), float32 [in, out]."""
    kernel = _base_kernel(flat, layer).astype(np.float32)
    adapted = kernel + scale(adapter_config) * (
        flat[prefix + "lora_a"].astype(np.float32) @ flat[prefix + "lora_b"].astype(np.float32)
    )
    if magnitude and prefix + "magnitude" in flat:
        adapted = adapted * (flat[prefix + "magnitude"].astype(np.float32) / np.linalg.norm(adapted, axis=0))
    return adapted


def merge(config, params):
    """(config, params) of the base model with the adapters folded into its weights.

    `params`: the adapted model's full pure dict (base + adapters). The returned config has
    `model.adapter.kind = "none"`. An adapted embedding of a tied model unties the head: the
    head keeps the base table (the adapter only changed the lookup), as `lm_head`.
    """
    flat = tree.flatten(params)
    merged = {key: value for key, value in flat.items() if _SUFFIX not in key and not key.startswith(_EMBEDDING)}
    config = copy.deepcopy(config)
    for layer, prefix in adapted_layers(flat).items():
        kernel = _base_kernel(flat, layer)
        value = _merged_kernel(flat, layer, prefix, config.model.adapter).astype(kernel.dtype)
        if layer == EMBEDDING_TARGET:
            if config.model.tie_embeddings:
                merged["lm_head/kernel"] = np.ascontiguousarray(kernel.T)
                config.model.tie_embeddings = False
            merged[EMBEDDING_TARGET] = value
        else:
            merged[f"{layer}/kernel"] = value
    config.model.adapter.kind = "none"
    return config, tree.unflatten(merged)


def _module_names(model_config, layers) -> dict[str, str]:
    """{elmjax layer path: HF module name}; ValueError when the family's layout has none."""
    layout = hf.layout_for(model_config)
    if not hasattr(layout, "linear_module"):
        raise ValueError(
            f"adapters export alone for OpenELM models only; the {model_config.family!r} family's adapter layers "
            "are not mapped to Hugging Face modules, so export the merged model instead (--to torch or --to mlx)"
        )
    names = {}
    for layer in layers:
        name = layout.linear_module(layer)
        if name is None:
            raise ValueError(
                f"the {model_config.family!r} layout has no single Hugging Face module for the adapted layer "
                f"{layer!r}, so its adapter cannot be exported alone; export the merged model instead"
            )
        names[layer] = name
    return names


def peft_tensors(model_config, params, vocab_rows: int | None = None) -> dict[str, np.ndarray]:
    """peft's `adapter_model.safetensors` tensors: `base_model.model.<module>.lora_A.weight`
    [r, in], `.lora_B.weight` [out, r], DoRA `.lora_magnitude_vector` [out]; the embedding's
    `lora_embedding_A` [r, vocab], `lora_embedding_B` [dim, r].

    `vocab_rows` keeps the embedding's first rows (as the base export does); DoRA's embedding
    magnitude is then rescaled so that m / ||W + s A B|| over the kept rows equals elmjax's
    ratio over all rows (the adapted lookup of every kept token is unchanged).
    """
    flat = tree.flatten(params)
    layers = adapted_layers(flat)
    names = _module_names(model_config, layers)
    out = {}
    for layer, prefix in layers.items():
        name = f"base_model.model.{names[layer]}"
        lora_a, lora_b = flat[prefix + "lora_a"], flat[prefix + "lora_b"]
        if layer == EMBEDDING_TARGET:
            rows = lora_a.shape[0] if vocab_rows is None else vocab_rows
            out[f"{name}.lora_embedding_A"] = np.ascontiguousarray(lora_a[:rows].T)
            out[f"{name}.lora_embedding_B"] = np.ascontiguousarray(lora_b.T)
        else:
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(lora_a.T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(lora_b.T)
        if prefix + "magnitude" in flat:
            magnitude = flat[prefix + "magnitude"].astype(np.float32)
            if layer == EMBEDDING_TARGET and vocab_rows is not None and vocab_rows < lora_a.shape[0]:
                unmerged = _merged_kernel(flat, layer, prefix, model_config.adapter, magnitude=False)
                magnitude = magnitude * np.linalg.norm(unmerged[:vocab_rows], axis=0) / np.linalg.norm(unmerged, axis=0)
            out[f"{name}.lora_magnitude_vector"] = magnitude.astype(flat[prefix + "magnitude"].dtype)
    return out


def peft_config(model_config, names: list[str], base_model: str) -> dict:
    """peft's adapter_config.json for `model.adapter` over the given HF module names."""
    adapter = model_config.adapter
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(adapter.rank),
        "lora_alpha": float(adapter.alpha),
        "lora_dropout": float(adapter.dropout),
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in names}),
        "use_dora": adapter.kind == "dora",
        "use_rslora": bool(adapter.rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def mlx_tensors(model_config, params) -> dict[str, np.ndarray]:
    """mlx-lm's `adapters.safetensors` tensors: `<module>.lora_a` [in, r], `.lora_b` [r, out],
    DoRA `.m` [out]. mlx-lm adapts layers inside the blocks only, so an embedding adapter is a
    ValueError."""
    flat = tree.flatten(params)
    layers = adapted_layers(flat)
    if EMBEDDING_TARGET in layers:
        raise ValueError(
            "mlx-lm adapts only layers inside the transformer blocks, not token_embeddings; export the merged "
            "model (--to mlx without --adapters), or train without token_embeddings in model.adapter.targets"
        )
    out = {}
    for layer, name in _module_names(model_config, layers).items():
        prefix = layers[layer]
        out[f"{name}.lora_a"] = flat[prefix + "lora_a"]
        out[f"{name}.lora_b"] = flat[prefix + "lora_b"]
        if prefix + "magnitude" in flat:
            out[f"{name}.m"] = flat[prefix + "magnitude"]
    return out


def mlx_config(model_config, names: list[str]) -> dict:
    """mlx-lm's adapter_config.json: every block adapted (`num_layers`), the per-block module
    keys, and `scale` = s (mlx-lm multiplies by it directly)."""
    adapter = model_config.adapter
    keys = sorted({name.split(".", 3)[3] for name in names})  # transformer.layers.N.<key>
    return {
        "fine_tune_type": adapter.kind,
        "num_layers": int(model_config.num_layers),
        "lora_parameters": {
            "rank": int(adapter.rank),
            "scale": scale(adapter),
            "dropout": float(adapter.dropout),
            "keys": keys,
        },
    }


def export_adapters(out, config, params, *, to: str, base_model: str = "", vocab_rows: int | None = None,
                    overwrite: bool = False) -> list[str]:
    """Writes the adapters of `params` (full pure dict) alone, in peft's (`to="peft"`) or
    mlx-lm's (`to="mlx"`) format; returns the file names. The directory appears complete or
    not at all."""
    from elmjax.convert.outdir import atomic_output_dir, check_output_dir
    from elmjax.convert.safetensors_io import source_from_array, write_safetensors

    if to not in ADAPTER_FORMATS:
        raise ValueError(f"unknown adapter format {to!r}; --adapters must be one of {', '.join(ADAPTER_FORMATS)}")
    if config.model.adapter.kind == "none":
        raise ValueError("this checkpoint has no adapters (model.adapter.kind is 'none'); export the model instead")
    check_output_dir(out, overwrite)
    names = list(_module_names(config.model, adapted_layers(tree.flatten(params))).values())
    if to == "peft":
        tensors = peft_tensors(config.model, params, vocab_rows)
        files = {"adapter_model.safetensors": tensors,
                 "adapter_config.json": peft_config(config.model, names, base_model)}
    else:
        tensors = mlx_tensors(config.model, params)
        files = {"adapters.safetensors": tensors, "adapter_config.json": mlx_config(config.model, names)}
    with atomic_output_dir(out, overwrite) as tmp:
        for name, content in files.items():
            if name.endswith(".json"):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(content, f, indent=2)
                    f.write("\n")
            else:
                metadata = {"format": "pt" if to == "peft" else "mlx"}
                write_safetensors(os.path.join(tmp, name),
                                  [source_from_array(k, np.asarray(v)) for k, v in content.items()], metadata)
    return sorted(files)


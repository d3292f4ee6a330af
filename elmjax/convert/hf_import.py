"""A Hugging Face model directory -> elmjax config + parameters (for tools/import_hf.py).

config.json's `model_type` picks the model family (`elmjax.models.for_hf_model_type`); the
family's layout turns config.json into `config.model` fields (checking what elmjax derives,
such as OpenELM's per-layer lists) and HF tensor names into elmjax parameter paths.
"""
from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from elmjax import models
from elmjax.config import base_config, validate
from elmjax.convert.safetensors_io import read_model_dir
from elmjax.layers.decoder import abstract_model
from elmjax.models.family import HFConfigError
from elmjax.tree import path_name

__all__ = ["HFConfigError", "config_from_hf", "import_hf_dir", "load_hf_dir", "params_from_flat"]


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{hf_dir} has no config.json; expected a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


def family_for(hf_cfg: dict):
    """The elmjax model family of a config.json (by `model_type`)."""
    family = models.for_hf_model_type(hf_cfg.get("model_type"))
    if family is None and "model_type" not in hf_cfg and {"model", "train"} <= set(hf_cfg):
        raise HFConfigError("config.json is an elmjax run's config, not a Hugging Face model's: this is a training "
                            "workdir, which needs no import (use it as --checkpoint or train.init_from)")
    if family is None:
        known = [models.get(name).hf_layout.model_type for name in models.names() if models.get(name).hf_layout]
        raise HFConfigError(
            f"config.json: model_type={hf_cfg.get('model_type')!r} is not a layout elmjax reads; "
            f"supported: {', '.join(known)}"
        )
    return family


def config_from_hf(hf_cfg: dict):
    """A full, validated elmjax config whose model section reproduces config.json exactly."""
    family = family_for(hf_cfg)
    config = base_config(family.name)
    for name, value in family.hf_layout.model_fields(hf_cfg).items():
        config.model[name] = value
    config.train.seq_len = min(config.train.seq_len, config.model.max_seq_len)
    validate(config)
    family.hf_layout.check_config(hf_cfg, config.model)
    return config


def params_from_flat(model_config, flat: dict[str, np.ndarray]) -> nnx.State:
    """An `nnx.State` of float32 params (the structure of `nnx.state(model, nnx.Param)`) from
    flat elmjax paths, checking every name and shape; nothing is randomly initialised."""
    abstract = nnx.state(abstract_model(model_config), nnx.Param)
    leaves = []
    unused = set(flat)
    for path, variable in nnx.to_flat_state(abstract):
        name = path_name(path)
        if name not in flat:
            raise KeyError(f"the weights lack parameter {name}")
        value = flat[name]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"weight {name} has shape {tuple(value.shape)}; config.json implies {tuple(variable.shape)}")
        # A copy: `value` may be a read-only memory map of the safetensors file.
        leaves.append((path, variable.replace(value=np.array(value, dtype=variable.dtype))))
        unused.discard(name)
    if unused:
        raise ValueError(f"weights not used by the model: {sorted(unused)[:5]}")
    return nnx.from_flat_state(leaves)


def load_hf_dir(hf_dir: str | os.PathLike):
    """(config, params) from an HF-format model directory; params as float32 `nnx.State`."""
    hf_cfg = read_hf_config(hf_dir)
    if "quantization" in hf_cfg:
        raise HFConfigError(
            f"{hf_dir} holds mlx-lm quantized weights; import needs unquantized weights (an --to torch "
            "export or Apple's release)"
        )
    config = config_from_hf(hf_cfg)
    tensors = read_model_dir(hf_dir)
    try:
        flat = models.get(config.model.family).hf_layout.from_hf(tensors, config.model)
    except KeyError as missing:
        raise ValueError(f"{hf_dir} lacks the tensor {missing}") from None
    except ValueError as error:
        raise ValueError(f"{hf_dir} {error}") from None
    return config, params_from_flat(config.model, flat)


def _tokenizer_file(hf_dir) -> str | None:
    """The HF directory's tokenizer, preferring SentencePiece's own model file."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.exists(os.path.join(hf_dir, name)):
            return name
    return None


def import_hf_dir(hf_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, step: int = 0):
    """Writes an HF model directory as an elmjax params-only checkpoint workdir at `out`.

    The tokenizer files (tokenizer.model / tokenizer.json and their configs) are copied to
    `out/tokenizer/` and `config.data.tokenizer` points there, so training (fine-tuning),
    evaluation and export of `out` use the model's own vocabulary. Written to a temporary
    directory first: a failure leaves nothing at `out`. Returns the resolved config.
    """
    import shutil
    from pathlib import Path

    from elmjax.training.checkpoint import save_params_checkpoint
    from elmjax.convert.outdir import atomic_output_dir, check_output_dir

    check_output_dir(out, overwrite)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"--hf {hf_dir} is not a directory; expected a Hugging Face model directory")
    config, params = load_hf_dir(hf_dir)
    tokenizer_name = _tokenizer_file(hf_dir)
    final_tokenizer_dir = Path(out).absolute() / "tokenizer"
    with atomic_output_dir(out, overwrite) as tmp:
        if tokenizer_name is not None:
            (tmp / "tokenizer").mkdir()
            for name in os.listdir(hf_dir):
                if name.startswith(("tokenizer", "special_tokens_map")):
                    shutil.copy2(os.path.join(hf_dir, name), tmp / "tokenizer" / name)
            config.data.tokenizer = str(final_tokenizer_dir / tokenizer_name)
        save_params_checkpoint(tmp, config, params, step=step)
    return config

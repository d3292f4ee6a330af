"""A Hugging Face OpenELM directory -> elmjax config + parameters (for tools/import_hf.py).

The model section of the config is derived from config.json's few scalar fields (the paper's
numbers); its per-layer lists (heads, kv heads, FFN multipliers) are then recomputed by
`elmjax.models.openelm.layerwise` and must equal the file's, because elmjax never stores per-layer lists.
"""
from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from elmjax.config import base_config, validate
from elmjax.convert import hf
from elmjax.convert.safetensors_io import read_model_dir
from elmjax.layers.decoder import abstract_model
from elmjax.models.openelm.layerwise import schedule_from_config


class HFConfigError(ValueError):
    """config.json describes a model elmjax cannot represent, or contradicts itself."""


def _expect(hf_cfg: dict, key: str, allowed) -> None:
    if key in hf_cfg and hf_cfg[key] not in allowed:
        raise HFConfigError(f"config.json: {key}={hf_cfg[key]!r} is not supported; elmjax's OpenELM needs {allowed}")


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{hf_dir} has no config.json; expected a Hugging Face OpenELM directory")
    with open(path) as f:
        return json.load(f)


def model_fields_from_hf(hf_cfg: dict) -> dict:
    """elmjax `config.model` fields from an OpenELM config.json (checked against its lists)."""
    if hf_cfg.get("model_type") != "openelm":
        raise HFConfigError(f"config.json: model_type={hf_cfg.get('model_type')!r}; only 'openelm' is supported")
    _expect(hf_cfg, "share_input_output_layers", [True])
    _expect(hf_cfg, "ffn_with_glu", [True])
    _expect(hf_cfg, "normalization_layer_name", ["rms_norm"])
    _expect(hf_cfg, "activation_fn_name", ["swish", "silu"])
    try:
        num_layers = int(hf_cfg["num_transformer_layers"])
        qkv = [float(m) for m in hf_cfg["qkv_multipliers"]]
        ffn = [float(m) for m in hf_cfg["ffn_multipliers"]]
        fields = dict(
            num_layers=num_layers,
            model_dim=int(hf_cfg["model_dim"]),
            head_dim=int(hf_cfg["head_dim"]),
            num_gqa_groups=int(hf_cfg["num_gqa_groups"]),
            ffn_dim_divisor=int(hf_cfg["ffn_dim_divisor"]),
            vocab_size=int(hf_cfg["vocab_size"]),
            max_seq_len=int(hf_cfg["max_context_length"]),
        )
    except KeyError as missing:
        raise HFConfigError(f"config.json lacks the OpenELM key {missing}") from None
    # qkv_multipliers is the (first, last) range; ffn_multipliers may be the range or the
    # per-layer list (Apple's files hold the list).
    for key, values in (("qkv_multipliers", qkv), ("ffn_multipliers", ffn)):
        if len(values) not in (2, num_layers):
            raise HFConfigError(f"config.json: {key} has {len(values)} entries; expected 2 or {num_layers}")
    fields["qkv_multipliers"] = (qkv[0], qkv[-1])
    fields["ffn_multipliers"] = (ffn[0], ffn[-1])
    fields["rope_theta"] = float(hf_cfg.get("rope_freq_constant", 10000))
    fields["norm_eps"] = float(hf_cfg.get("rms_norm_eps", 1e-6))
    fields["qk_norm"] = "per_head" if hf_cfg.get("normalize_qk_projections", True) else "none"
    fields["tie_embeddings"] = True
    return fields


def config_from_hf(hf_cfg: dict):
    """A full, validated elmjax config whose model section reproduces config.json exactly."""
    config = base_config()
    for name, value in model_fields_from_hf(hf_cfg).items():
        config.model[name] = value
    config.train.seq_len = min(config.train.seq_len, config.model.max_seq_len)
    validate(config)
    check_layer_lists(hf_cfg, config.model)
    return config


def check_layer_lists(hf_cfg: dict, model_config) -> None:
    """Raises HFConfigError where config.json's per-layer lists differ from elmjax.models.openelm.layerwise's."""
    schedule = schedule_from_config(model_config)
    derived = {
        "num_query_heads": [layer.num_query_heads for layer in schedule],
        "num_kv_heads": [layer.num_kv_heads for layer in schedule],
    }
    if len(hf_cfg["ffn_multipliers"]) == model_config.num_layers:
        derived["ffn_multipliers"] = [layer.ffn_multiplier for layer in schedule]
    for key, ours in derived.items():
        theirs = hf_cfg.get(key)
        if theirs is None:
            continue
        theirs = [float(v) for v in theirs] if key == "ffn_multipliers" else [int(v) for v in theirs]
        if theirs != ours:
            raise HFConfigError(
                f"config.json: {key}={theirs} differs from the layer-wise scaling rule "
                f"(elmjax.models.openelm.layerwise) applied to its num_transformer_layers/model_dim/head_dim/"
                f"qkv_multipliers/ffn_multipliers, which gives {ours}; elmjax cannot represent "
                "hand-edited per-layer shapes"
            )


def params_from_flat(model_config, flat: dict[str, np.ndarray]) -> nnx.State:
    """An `nnx.State` of float32 params (the structure of `nnx.state(model, nnx.Param)`) from
    flat elmjax paths, checking every name and shape; nothing is randomly initialised."""
    abstract = nnx.state(abstract_model(model_config), nnx.Param)
    leaves = []
    unused = set(flat)
    for path, variable in nnx.to_flat_state(abstract):
        name = "/".join(str(p) for p in path)
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
    """(config, params) from an HF-format OpenELM directory; params as float32 `nnx.State`."""
    hf_cfg = read_hf_config(hf_dir)
    if "quantization" in hf_cfg:
        raise HFConfigError(
            f"{hf_dir} holds mlx-lm quantized weights; import needs unquantized weights (an --to torch "
            "export or Apple's release)"
        )
    config = config_from_hf(hf_cfg)
    tensors = read_model_dir(hf_dir)
    num_layers = config.model.num_layers
    expected = 2 + 8 * num_layers  # embedding, final norm, 8 tensors per block
    if len(tensors) != expected:
        raise ValueError(
            f"{hf_dir} holds {len(tensors)} tensors; an OpenELM with {num_layers} layers and tied "
            f"embeddings has {expected} (names: SPEC §1)"
        )
    try:
        flat = hf.from_hf_state_dict(tensors, num_layers)
    except KeyError as missing:
        raise ValueError(f"{hf_dir} lacks the tensor {missing}") from None
    return config, params_from_flat(config.model, flat)


def _tokenizer_file(hf_dir) -> str | None:
    """The HF directory's tokenizer, preferring SentencePiece's own model file."""
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.exists(os.path.join(hf_dir, name)):
            return name
    return None


def import_hf_dir(hf_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, step: int = 0):
    """Writes an HF OpenELM directory as an elmjax params-only checkpoint workdir at `out`.

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
        raise FileNotFoundError(f"--hf {hf_dir} is not a directory; expected a Hugging Face OpenELM directory")
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

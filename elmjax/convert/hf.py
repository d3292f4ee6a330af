"""elmjax parameters <-> Apple's Hugging Face OpenELM layout (SPEC §1), as numpy arrays.

elmjax stores linear kernels [in, out]; HF (torch) stores weights [out, in]. Names mirror
HF's, so the mapping is a transpose and a prefix. mlx-lm's `openelm` model reads the same
names, so these dictionaries also feed MLX.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

HF_ARCHITECTURE = "OpenELMForCausalLM"
HF_AUTO_MAP = {
    "AutoConfig": "configuration_openelm.OpenELMConfig",
    "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
}

# (elmjax path inside a block, HF suffix, is a linear kernel to transpose)
_BLOCK_PARAMS = (
    ("attn/qkv_proj/kernel", "attn.qkv_proj.weight", True),
    ("attn/out_proj/kernel", "attn.out_proj.weight", True),
    ("attn/q_norm/weight", "attn.q_norm.weight", False),
    ("attn/k_norm/weight", "attn.k_norm.weight", False),
    ("ffn/proj_1/kernel", "ffn.proj_1.weight", True),
    ("ffn/proj_2/kernel", "ffn.proj_2.weight", True),
    ("attn_norm/weight", "attn_norm.weight", False),
    ("ffn_norm/weight", "ffn_norm.weight", False),
)


def _flatten_pure_dict(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_pure_dict(value, name + "/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def _flat_params(model_or_state) -> dict[str, np.ndarray]:
    if isinstance(model_or_state, dict):  # a pure dict (`State.to_pure_dict()`, restore_params)
        return _flatten_pure_dict(model_or_state)
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    flat = {}
    for path, leaf in nnx.to_flat_state(state):
        value = leaf[...] if hasattr(leaf, "get_value") or isinstance(leaf, nnx.Variable) else leaf
        flat["/".join(str(p) for p in path)] = np.asarray(value)
    return flat


def to_hf_state_dict(model_or_state, num_layers: int, vocab_rows: int | None = None) -> dict[str, np.ndarray]:
    """HF-named arrays ([out, in] for linear layers) from an elmjax model or its Param state.

    `vocab_rows` keeps only the first rows of the embedding (a model trained with a padded
    vocabulary exports its real vocabulary).
    """
    flat = _flat_params(model_or_state)
    if "lm_head/kernel" in flat:
        raise ValueError("the OpenELM HF layout has tied embeddings; this model has an lm_head")
    embedding = flat["token_embeddings"]
    if vocab_rows is not None:
        if vocab_rows > embedding.shape[0]:
            raise ValueError(f"vocab_rows={vocab_rows} exceeds the {embedding.shape[0]} embedding rows")
        embedding = embedding[:vocab_rows]
    out = {"transformer.token_embeddings.weight": embedding}
    for i in range(num_layers):
        for ours, theirs, transpose in _BLOCK_PARAMS:
            value = flat[f"layers/{i}/{ours}"]
            out[f"transformer.layers.{i}.{theirs}"] = value.T if transpose else value
    out["transformer.norm.weight"] = flat["norm/weight"]
    return out


def from_hf_state_dict(hf: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """Flat elmjax parameter paths ('layers/0/attn/qkv_proj/kernel') -> arrays, from HF names."""
    out = {"token_embeddings": np.asarray(hf["transformer.token_embeddings.weight"])}
    for i in range(num_layers):
        for ours, theirs, transpose in _BLOCK_PARAMS:
            value = np.asarray(hf[f"transformer.layers.{i}.{theirs}"])
            out[f"layers/{i}/{ours}"] = value.T if transpose else value
    out["norm/weight"] = np.asarray(hf["transformer.norm.weight"])
    return out


def hf_config(model_config, schedule, torch_dtype: str = "float32", vocab_size: int | None = None) -> dict:
    """config.json of Apple's OpenELM release for this model (SPEC §1 keys)."""
    cfg = model_config
    return {
        "model_type": "openelm",
        "architectures": [HF_ARCHITECTURE],
        "auto_map": dict(HF_AUTO_MAP),
        "activation_fn_name": "swish",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "ffn_dim_divisor": cfg.ffn_dim_divisor,
        "ffn_multipliers": [layer.ffn_multiplier for layer in schedule],
        "ffn_with_glu": True,
        "head_dim": cfg.head_dim,
        "initializer_range": 0.02,
        "max_context_length": cfg.max_seq_len,
        "model_dim": cfg.model_dim,
        "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": cfg.qk_norm == "per_head",
        "num_gqa_groups": cfg.num_gqa_groups,
        "num_kv_heads": [layer.num_kv_heads for layer in schedule],
        "num_query_heads": [layer.num_query_heads for layer in schedule],
        "num_transformer_layers": cfg.num_layers,
        "qkv_multipliers": [float(m) for m in cfg.qkv_multipliers],
        "rope_freq_constant": int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
        "rope_max_length": 4096,
        "rms_norm_eps": cfg.norm_eps,
        "share_input_output_layers": bool(cfg.tie_embeddings),
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": vocab_size if vocab_size is not None else cfg.vocab_size,
    }

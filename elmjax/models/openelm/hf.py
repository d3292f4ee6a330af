"""OpenELM's Hugging Face layout (SPEC §1): weight names and config.json, both ways.

elmjax stores linear kernels [in, out]; HF (torch) stores weights [out, in], so the mapping is
a transpose and a name. mlx-lm's `openelm` model reads the same names and keys, so the same
tensors feed MLX. config.json's per-layer lists are recomputed by the layer-wise scaling rule
on import and must equal the file's: elmjax never stores per-layer lists.
"""
from __future__ import annotations

import numpy as np

from elmjax.models.family import HFConfigError, tied_embedding_rows
from elmjax.models.openelm.layerwise import schedule_from_config

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

# config.model fields the OpenELM layout (and mlx-lm's openelm model) can express, with the
# only value each may take.
_FIXED_FIELDS = {
    "norm_type": "rms_norm",
    "qk_norm": "per_head",
    "position_encoding": "rope",
    "use_bias": False,
    "embedding_scale": 1.0,
    "logit_scale": 1.0,
    "attention_scale": None,
    "mup_base_width": 0.0,
    "alibi_scaling_factor": None,
    "alibi_train_seq_len": None,
}


def _expect(hf_cfg: dict, key: str, allowed) -> None:
    if key in hf_cfg and hf_cfg[key] not in allowed:
        raise HFConfigError(f"config.json: {key}={hf_cfg[key]!r} is not supported; elmjax's OpenELM needs {allowed}")


class OpenELMLayout:
    """Apple's OpenELM release format (`OpenELMForCausalLM`, model_type "openelm")."""

    model_type = "openelm"
    architecture = "OpenELMForCausalLM"
    auto_map = {
        "AutoConfig": "configuration_openelm.OpenELMConfig",
        "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
    }
    # HF weight names of the layers mlx-lm quantizes (its Linear / Embedding layers).
    mlx_quantizable = (
        "token_embeddings.weight",
        "attn.qkv_proj.weight",
        "attn.out_proj.weight",
        "ffn.proj_1.weight",
        "ffn.proj_2.weight",
    )

    def check_exportable(self, model_config) -> None:
        """Raises ValueError naming the first `config.model` field this layout cannot hold."""
        for field, required in _FIXED_FIELDS.items():
            if model_config[field] != required:
                raise ValueError(
                    f"config field `model.{field}` is {model_config[field]!r}; the OpenELM Hugging Face / "
                    f"mlx-lm layout needs {required!r}, so this model cannot be exported"
                )

    # ---- weights -------------------------------------------------------------------------
    def to_hf(self, flat: dict, model_config, vocab_rows: int | None = None) -> dict[str, np.ndarray]:
        """HF-named arrays ([out, in] for linear layers) from flat elmjax params.

        `vocab_rows` keeps only the first rows of the embedding (a model trained with a padded
        vocabulary exports its real vocabulary).
        """
        untied = {key: value for key, value in flat.items() if key != "lm_head/kernel"}
        out = {"transformer.token_embeddings.weight": tied_embedding_rows(untied, vocab_rows, "OpenELM")}
        for i in range(model_config.num_layers):
            for ours, theirs, transpose in _BLOCK_PARAMS:
                value = flat[f"layers/{i}/{ours}"]
                out[f"transformer.layers.{i}.{theirs}"] = value.T if transpose else value
        out["transformer.norm.weight"] = flat["norm/weight"]
        if "lm_head/kernel" in flat:  # share_input_output_layers=False (e.g. a merged embedding adapter)
            out["lm_head.weight"] = flat["lm_head/kernel"].T[:vocab_rows]
        return out

    def linear_module(self, path: str) -> str | None:
        """The HF module name of the linear layer at elmjax path `path` ('layers/0/attn/qkv_proj'),
        or of the embedding ('token_embeddings'); None if it has no single HF counterpart."""
        if path == "token_embeddings":
            return "transformer.token_embeddings"
        if path == "lm_head":
            return "lm_head"
        parts = path.split("/")
        if len(parts) >= 3 and parts[0] == "layers":
            for ours, theirs, transpose in _BLOCK_PARAMS:
                if transpose and ours == "/".join(parts[2:]) + "/kernel":
                    return f"transformer.layers.{parts[1]}.{theirs.removesuffix('.weight')}"
        return None

    def from_hf(self, tensors: dict, model_config) -> dict[str, np.ndarray]:
        """Flat elmjax paths ('layers/0/attn/qkv_proj/kernel') -> arrays, from HF names.

        Raises KeyError naming a missing tensor and ValueError for a wrong tensor count.
        """
        num_layers = model_config.num_layers
        tied = bool(model_config.tie_embeddings)
        expected = 2 + len(_BLOCK_PARAMS) * num_layers + (0 if tied else 1)  # embedding, norm, 8 per block, head
        if len(tensors) != expected:
            raise ValueError(
                f"holds {len(tensors)} tensors; an OpenELM with {num_layers} layers and "
                f"{'tied' if tied else 'untied'} embeddings has {expected} (names: SPEC §1)"
            )
        out = {"token_embeddings": np.asarray(tensors["transformer.token_embeddings.weight"])}
        if not tied:
            out["lm_head/kernel"] = np.asarray(tensors["lm_head.weight"]).T
        for i in range(num_layers):
            for ours, theirs, transpose in _BLOCK_PARAMS:
                value = np.asarray(tensors[f"transformer.layers.{i}.{theirs}"])
                out[f"layers/{i}/{ours}"] = value.T if transpose else value
        out["norm/weight"] = np.asarray(tensors["transformer.norm.weight"])
        return out

    # ---- config.json ---------------------------------------------------------------------
    def config_json(self, model_config, torch_dtype: str = "float32", vocab_size: int | None = None) -> dict:
        """config.json of Apple's OpenELM release for this model (SPEC §1 keys)."""
        cfg = model_config
        schedule = schedule_from_config(cfg)
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "auto_map": dict(self.auto_map),
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

    def model_fields(self, hf_cfg: dict) -> dict:
        """elmjax `config.model` fields from an OpenELM config.json."""
        if hf_cfg.get("model_type") != self.model_type:
            raise HFConfigError(f"config.json: model_type={hf_cfg.get('model_type')!r}; expected 'openelm'")
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
        fields["tie_embeddings"] = bool(hf_cfg.get("share_input_output_layers", True))
        return fields

    def check_config(self, hf_cfg: dict, model_config) -> None:
        """Raises HFConfigError where config.json's per-layer lists differ from the rule's."""
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
                    f"(elmjax.models.openelm.layerwise) applied to its num_transformer_layers/model_dim/"
                    f"head_dim/qkv_multipliers/ffn_multipliers, which gives {ours}; elmjax cannot "
                    "represent hand-edited per-layer shapes"
                )

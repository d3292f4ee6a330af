"""Cerebras' Hugging Face layout of BTLM (`BTLMLMHeadModel`, model_type "btlm"; SPEC §3),
both ways.

The weights follow GPT-2's module names, and GPT-2's `Conv1D` stores kernels [in, out] like
elmjax, so no kernel is transposed:
  transformer.wte.weight [V, d]                  token_embeddings (lm_head tied to it)
  lm_head.weight [V, d]                          lm_head/kernel [d, V], only when untied
                                                 (tie_word_embeddings false: a merged
                                                 embedding adapter keeps the base head)
  transformer.h.{i}.ln_1.{weight,bias} [d]       layers/i/attn_norm
  transformer.h.{i}.attn.c_attn.{weight,bias}    layers/i/attn/qkv_proj ([d, 3d]: q | k | v)
  transformer.h.{i}.attn.c_proj.{weight,bias}    layers/i/attn/out_proj
  transformer.h.{i}.ln_2.{weight,bias}           layers/i/ffn_norm
  transformer.h.{i}.mlp.c_fc2.{weight,bias}      layers/i/ffn/proj_1, first half (the gate)
  transformer.h.{i}.mlp.c_fc.{weight,bias}       layers/i/ffn/proj_1, second half
  transformer.h.{i}.mlp.c_proj.{weight,bias}     layers/i/ffn/proj_2
  transformer.ln_f.{weight,bias} [d]             norm
  transformer.relative_pe.slopes [n_head, 1]     the ALiBi slopes (derived in elmjax)
BTLM's MLP is `c_proj(c_fc(x) * silu(c_fc2(x)))`; elmjax's fused SwiGLU computes
`proj_2(silu(gate) * up)` with `proj_1 = [gate | up]`, hence c_fc2 -> gate, c_fc -> up.

The slopes are stored as Cerebras' `AlibiPositionEmbeddingLayer` holds them, [n_head, 1]
(SPEC §3 writes [n_head]; import takes either). elmjax does not keep them as parameters
(they are not counted in the 2,646,255,744 parameters): export writes the formula's slopes,
and import checks that the stored ones are those, at the stored precision.

config.json maps to `config.model` as: n_embd/n_layer/n_head/n_inner/n_positions/vocab_size
-> model_dim/num_layers/num_heads/ffn_dim/max_seq_len/vocab_size, layer_norm_epsilon ->
norm_eps, mup_embeddings_scale -> embedding_scale, mup_width_scale (1 = no muP) ->
mup_base_width = width scale x n_embd, mup_output_alpha -> mup_output_alpha (without muP:
logit_scale), mup_scale_qk_dot_by_d -> the attention scale 1/head_dim (else
1/sqrt(head_dim)), alibi_scaling -> alibi_scaling_factor / alibi_train_seq_len,
initializer_range -> mup_init_std.
"""
from __future__ import annotations

import numpy as np

from elmjax import mup
from elmjax.models.family import HFConfigError, tied_embedding_rows

SLOPES = "transformer.relative_pe.slopes"
EMBEDDING = "transformer.wte.weight"

# (elmjax path inside a block, HF suffix): tensors stored as they are.
_BLOCK_PARAMS = (
    ("attn_norm/weight", "ln_1.weight"),
    ("attn_norm/bias", "ln_1.bias"),
    ("attn/qkv_proj/kernel", "attn.c_attn.weight"),
    ("attn/qkv_proj/bias", "attn.c_attn.bias"),
    ("attn/out_proj/kernel", "attn.c_proj.weight"),
    ("attn/out_proj/bias", "attn.c_proj.bias"),
    ("ffn_norm/weight", "ln_2.weight"),
    ("ffn_norm/bias", "ln_2.bias"),
    ("ffn/proj_2/kernel", "mlp.c_proj.weight"),
    ("ffn/proj_2/bias", "mlp.c_proj.bias"),
)
# proj_1's halves along its output axis (the last): the gate first.
_GATE_UP = (("mlp.c_fc2", 0), ("mlp.c_fc", 1))
# GPT-2 style checkpoints may hold these non-learned attention buffers; they carry nothing.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# config.model fields the layout can express, with the only value each may take.
_FIXED_FIELDS = {
    "norm_type": "layer_norm",
    "qk_norm": "none",
    "position_encoding": "alibi",
    "use_bias": True,
}


def _alibi_slopes(num_heads: int) -> np.ndarray:
    from elmjax.layers.positions import alibi_slopes

    return np.asarray(alibi_slopes(num_heads), np.float32)


def _base_width(width_scale: float, model_dim: int) -> float:
    """`width_scale * model_dim`, snapped to the integer it is meant to be (0.1 * 2560 is
    256.00000000000003 in floating point)."""
    base = width_scale * model_dim
    nearest = round(base)
    return float(nearest) if abs(base - nearest) <= 1e-9 * max(1.0, base) else base


class BTLMLayout:
    """Cerebras' BTLM release format (remote code from cerebras/btlm-3b-8k-base)."""

    model_type = "btlm"
    architecture = "BTLMLMHeadModel"
    auto_map = {
        "AutoConfig": "cerebras/btlm-3b-8k-base--configuration_btlm.BTLMConfig",
        "AutoModel": "cerebras/btlm-3b-8k-base--modeling_btlm.BTLMModel",
        "AutoModelForCausalLM": "cerebras/btlm-3b-8k-base--modeling_btlm.BTLMLMHeadModel",
    }
    mlx_quantizable = None  # mlx-lm has no BTLM model: no MLX layout

    def check_exportable(self, model_config) -> None:
        """Raises ValueError naming the first `config.model` field this layout cannot hold."""
        cfg = model_config
        for field, required in _FIXED_FIELDS.items():
            if cfg[field] != required:
                raise ValueError(
                    f"config field `model.{field}` is {cfg[field]!r}; the BTLM Hugging Face layout "
                    f"needs {required!r}, so this model cannot be exported"
                )
        scale = mup.attention_scale(cfg)
        if scale not in (1.0 / cfg.head_dim, cfg.head_dim**-0.5):
            raise ValueError(
                f"config field `model.attention_scale` is {scale}; the BTLM layout has 1/head_dim "
                "(mup_scale_qk_dot_by_d) or 1/sqrt(head_dim) only"
            )
        if mup.enabled(cfg) and cfg.logit_scale != 1.0:
            raise ValueError(
                f"config field `model.logit_scale` is {cfg.logit_scale}; with muP the BTLM layout "
                "holds the logit multiplier as mup_output_alpha x mup_width_scale only (set "
                "logit_scale=1 and use mup_output_alpha)"
            )

    # ---- weights -------------------------------------------------------------------------
    def to_hf(self, flat: dict, model_config, vocab_rows: int | None = None) -> dict[str, np.ndarray]:
        """HF-named arrays from flat elmjax params (views: nothing is copied here)."""
        untied = {key: value for key, value in flat.items() if key != "lm_head/kernel"}
        out = {EMBEDDING: tied_embedding_rows(untied, vocab_rows, "BTLM")}
        if "lm_head/kernel" in flat:  # tie_word_embeddings false
            out["lm_head.weight"] = flat["lm_head/kernel"].T[:vocab_rows]
        inner = model_config.ffn_dim
        for i in range(model_config.num_layers):
            prefix = f"transformer.h.{i}."
            for ours, theirs in _BLOCK_PARAMS:
                out[prefix + theirs] = flat[f"layers/{i}/{ours}"]
            kernel, bias = flat[f"layers/{i}/ffn/proj_1/kernel"], flat[f"layers/{i}/ffn/proj_1/bias"]
            for name, half in _GATE_UP:
                out[f"{prefix}{name}.weight"] = kernel[:, half * inner : (half + 1) * inner]
                out[f"{prefix}{name}.bias"] = bias[half * inner : (half + 1) * inner]
        out["transformer.ln_f.weight"] = flat["norm/weight"]
        out["transformer.ln_f.bias"] = flat["norm/bias"]
        out[SLOPES] = _alibi_slopes(model_config.num_heads)[:, None]  # [n_head, 1]
        return out

    def from_hf(self, tensors: dict, model_config) -> dict[str, np.ndarray]:
        """Flat elmjax paths -> arrays from HF names. Raises KeyError naming a missing tensor,
        ValueError for unexpected tensors, a tied lm_head that differs from wte, or stored
        ALiBi slopes that are not the formula's. An untied model (`tie_embeddings` False,
        from tie_word_embeddings) needs lm_head.weight."""
        num_layers = model_config.num_layers
        expected = {EMBEDDING, "transformer.ln_f.weight", "transformer.ln_f.bias", SLOPES}
        for i in range(num_layers):
            prefix = f"transformer.h.{i}."
            expected |= {prefix + theirs for _, theirs in _BLOCK_PARAMS}
            expected |= {f"{prefix}{name}.{kind}" for name, _ in _GATE_UP for kind in ("weight", "bias")}
        unexpected = sorted(
            name for name in tensors
            if name not in expected and name != "lm_head.weight" and not name.endswith(_IGNORED_SUFFIXES)
        )
        if unexpected:
            raise ValueError(
                f"holds tensors a BTLM with {num_layers} layers does not have: {unexpected[:5]} (names: SPEC §3)"
            )
        embedding = np.asarray(tensors[EMBEDDING])
        out = {"token_embeddings": embedding}
        if not model_config.tie_embeddings:
            out["lm_head/kernel"] = np.ascontiguousarray(np.asarray(tensors["lm_head.weight"]).T)
        elif "lm_head.weight" in tensors and not np.array_equal(np.asarray(tensors["lm_head.weight"]), embedding):
            raise ValueError("lm_head.weight differs from transformer.wte.weight, but config.json ties them "
                             "(tie_word_embeddings is not false)")
        self._check_slopes(np.asarray(tensors[SLOPES]), model_config.num_heads)
        for i in range(num_layers):
            prefix = f"transformer.h.{i}."
            for ours, theirs in _BLOCK_PARAMS:
                out[f"layers/{i}/{ours}"] = np.asarray(tensors[prefix + theirs])
            halves = [np.asarray(tensors[f"{prefix}{name}.weight"]) for name, _ in _GATE_UP]
            biases = [np.asarray(tensors[f"{prefix}{name}.bias"]) for name, _ in _GATE_UP]
            out[f"layers/{i}/ffn/proj_1/kernel"] = np.concatenate(halves, axis=1)  # [d, 2I]: gate | up
            out[f"layers/{i}/ffn/proj_1/bias"] = np.concatenate(biases)
        out["norm/weight"] = np.asarray(tensors["transformer.ln_f.weight"])
        out["norm/bias"] = np.asarray(tensors["transformer.ln_f.bias"])
        return out

    @staticmethod
    def _check_slopes(stored: np.ndarray, num_heads: int) -> None:
        if stored.shape not in ((num_heads, 1), (num_heads,)):
            raise ValueError(f"{SLOPES} has shape {stored.shape}; expected ({num_heads}, 1) for {num_heads} heads")
        derived = _alibi_slopes(num_heads).astype(stored.dtype)  # compared at the stored precision
        if not np.array_equal(stored.reshape(-1), derived):
            raise HFConfigError(
                f"{SLOPES} {stored.reshape(-1).tolist()} are not ALiBi's slopes for {num_heads} heads "
                f"(SPEC §3: {derived.tolist()}); elmjax derives the slopes and cannot hold others"
            )

    # ---- config.json ---------------------------------------------------------------------
    def config_json(self, model_config, torch_dtype: str = "float32", vocab_size: int | None = None) -> dict:
        """config.json of Cerebras' BTLM release for this model (SPEC §3 keys)."""
        cfg = model_config
        if cfg.alibi_scaling_factor is not None:
            alibi_scaling = {"type": "linear", "factor": float(cfg.alibi_scaling_factor)}
        elif cfg.alibi_train_seq_len is not None:
            alibi_scaling = {"type": "linear", "train_seq_len": int(cfg.alibi_train_seq_len)}
        else:
            alibi_scaling = None
        on = mup.enabled(cfg)
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "auto_map": dict(self.auto_map),
            "vocab_size": vocab_size if vocab_size is not None else cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.model_dim,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.ffn_dim,
            "activation_function": "swiglu",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "layer_norm_epsilon": cfg.norm_eps,
            "initializer_range": float(cfg.mup_init_std) if on else 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "position_embedding_type": "alibi",
            "mup_width_scale": mup.width_scale(cfg),
            "mup_embeddings_scale": float(cfg.embedding_scale),
            "mup_output_alpha": float(cfg.mup_output_alpha) if on else float(cfg.logit_scale),
            "mup_scale_qk_dot_by_d": mup.attention_scale(cfg) == 1.0 / cfg.head_dim,
            "alibi_scaling": alibi_scaling,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": bool(cfg.tie_embeddings),
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }

    def model_fields(self, hf_cfg: dict) -> dict:
        """elmjax `config.model` fields from a BTLM config.json."""
        if hf_cfg.get("model_type") != self.model_type:
            raise HFConfigError(f"config.json: model_type={hf_cfg.get('model_type')!r}; expected 'btlm'")
        for key, allowed in (
            ("activation_function", ["swiglu"]),
            ("position_embedding_type", ["alibi"]),
            ("scale_attn_weights", [True]),
            ("scale_attn_by_inverse_layer_idx", [False]),
            ("add_cross_attention", [False]),
        ):
            if key in hf_cfg and hf_cfg[key] not in allowed:
                raise HFConfigError(
                    f"config.json: {key}={hf_cfg[key]!r} is not supported; elmjax's BTLM needs {allowed}"
                )
        try:
            model_dim, num_heads = int(hf_cfg["n_embd"]), int(hf_cfg["n_head"])
            fields = dict(
                num_layers=int(hf_cfg["n_layer"]),
                model_dim=model_dim,
                num_heads=num_heads,
                head_dim=model_dim // num_heads,
                ffn_dim=int(hf_cfg.get("n_inner") or 4 * model_dim),
                vocab_size=int(hf_cfg["vocab_size"]),
                max_seq_len=int(hf_cfg["n_positions"]),
            )
        except KeyError as missing:
            raise HFConfigError(f"config.json lacks the BTLM key {missing}") from None
        width_scale = float(hf_cfg.get("mup_width_scale", 1.0))
        alpha = float(hf_cfg.get("mup_output_alpha", 1.0))
        by_d = bool(hf_cfg.get("mup_scale_qk_dot_by_d", False))
        head_dim = fields["head_dim"]
        fields.update(
            norm_type="layer_norm", norm_eps=float(hf_cfg.get("layer_norm_epsilon", 1e-5)), qk_norm="none",
            position_encoding="alibi", use_bias=True, tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", True)),
            embedding_scale=float(hf_cfg.get("mup_embeddings_scale", 1.0)),
        )
        if width_scale == 1.0:  # no muP: the multipliers are plain ones
            fields.update(mup_base_width=0.0, logit_scale=alpha, attention_scale=1.0 / head_dim if by_d else None)
        else:
            fields.update(
                mup_base_width=_base_width(width_scale, model_dim), mup_output_alpha=alpha, logit_scale=1.0,
                attention_scale=None if by_d else head_dim**-0.5,
            )
            if hf_cfg.get("initializer_range"):
                fields["mup_init_std"] = float(hf_cfg["initializer_range"])
        fields.update(self._alibi_scaling(hf_cfg.get("alibi_scaling")))
        return fields

    @staticmethod
    def _alibi_scaling(scaling) -> dict:
        if scaling is None:
            return {"alibi_scaling_factor": None, "alibi_train_seq_len": None}
        if not isinstance(scaling, dict) or scaling.get("type") != "linear":
            raise HFConfigError(f"config.json: alibi_scaling={scaling!r}; elmjax supports type 'linear' only")
        if scaling.get("factor") is not None:
            return {"alibi_scaling_factor": float(scaling["factor"]), "alibi_train_seq_len": None}
        if scaling.get("train_seq_len") is not None:
            return {"alibi_scaling_factor": None, "alibi_train_seq_len": int(scaling["train_seq_len"])}
        raise HFConfigError(f"config.json: alibi_scaling={scaling!r} has neither factor nor train_seq_len")

    def check_config(self, hf_cfg: dict, model_config) -> None:
        """Nothing per layer to check: every BTLM layer has the same shape."""
        del hf_cfg, model_config

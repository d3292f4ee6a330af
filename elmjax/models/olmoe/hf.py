"""OLMoE's Hugging Face layout (`OlmoeForCausalLM`, SPEC §2) and mlx-lm's, both ways.

elmjax keeps a fused q|k|v kernel [d, (q + 2 kv) * hd] and stacked experts (gate_up
[E, d, 2, I], down [E, I, d], kernels stored [in, out]); the HF checkpoint has separate
q/k/v/o projections and one [out, in] matrix per expert and projection:
`model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`. Conversion is slicing,
concatenation and transposes only, so HF -> elmjax -> HF is bit-exact.

mlx-lm's `olmoe` model keeps the experts stacked (`mlp.switch_mlp.{gate,up,down}_proj.weight`
[E, out, in]); its `sanitize` stacks HF per-expert names on load, and `to_mlx` writes them
stacked, as mlx-lm's own converter saves them (its quantizer quantizes the stacked tensors).

The load-balance weight maps to `router_aux_loss_coef` as the same number, though the losses
differ by a factor top_k (transformers' f_i sums to k, elmjax's to 1; elmjax/layers/moe/router.py).
"""
from __future__ import annotations

import numpy as np

from elmjax.models.family import HFConfigError

# (elmjax path inside a block, HF suffix, is a linear kernel to transpose)
_BLOCK_PARAMS = (
    ("attn/out_proj/kernel", "self_attn.o_proj.weight", True),
    ("attn/q_norm/weight", "self_attn.q_norm.weight", False),
    ("attn/k_norm/weight", "self_attn.k_norm.weight", False),
    ("ffn/router/kernel", "mlp.gate.weight", True),
    ("attn_norm/weight", "input_layernorm.weight", False),
    ("ffn_norm/weight", "post_attention_layernorm.weight", False),
)
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# config.model fields the layout can express, with the only value each may take.
_FIXED_FIELDS = {
    "norm_type": "rms_norm",
    "qk_norm": "full",
    "position_encoding": "rope",
    "use_bias": False,
    "embedding_scale": 1.0,
    "logit_scale": 1.0,
    "attention_scale": None,
}


def _expect(hf_cfg: dict, key: str, allowed) -> None:
    if hf_cfg.get(key) not in allowed:
        raise HFConfigError(f"config.json: {key}={hf_cfg.get(key)!r} is not supported; elmjax's OLMoE needs {allowed}")


def _rope_theta(hf_cfg: dict) -> float:
    """RoPE theta from transformers 5's `rope_parameters` or the older `rope_theta` key."""
    parameters = hf_cfg.get("rope_parameters") or {}
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default" or hf_cfg.get("rope_scaling"):
        raise HFConfigError(f"config.json: rope type {rope_type!r} / rope_scaling is not supported; elmjax uses plain RoPE")
    return float(parameters.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)))


class OlmoeLayout:
    """allenai's OLMoE release format (`OlmoeForCausalLM`, model_type "olmoe")."""

    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    # Names of the layers mlx-lm quantizes (its Linear, Embedding and SwitchLinear layers).
    mlx_quantizable = (
        "embed_tokens.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
        "mlp.gate.weight", "switch_mlp.gate_proj.weight", "switch_mlp.up_proj.weight",
        "switch_mlp.down_proj.weight", "lm_head.weight",
    )

    def check_exportable(self, model_config) -> None:
        """Raises ValueError naming the first `config.model` field this layout cannot hold."""
        for field, required in _FIXED_FIELDS.items():
            if model_config[field] != required:
                raise ValueError(
                    f"config field `model.{field}` is {model_config[field]!r}; the OLMoE Hugging Face / "
                    f"mlx-lm layout needs {required!r}, so this model cannot be exported"
                )
        if model_config.num_heads * model_config.head_dim != model_config.model_dim:
            # transformers' OlmoeAttention sizes q_norm by hidden_size.
            raise ValueError(
                f"config field `model.num_heads`: {model_config.num_heads} heads of {model_config.head_dim} "
                f"do not make model_dim={model_config.model_dim}, which the OLMoE layout requires"
            )

    # ---- weights -------------------------------------------------------------------------
    def _common(self, flat: dict, model_config, vocab_rows: int | None) -> dict:
        """Everything but the experts, HF-named ([out, in]); the expert tensors come after."""
        cfg = model_config
        q_width = cfg.num_heads * cfg.head_dim
        kv_width = cfg.num_kv_heads * cfg.head_dim

        def rows(array):
            if vocab_rows is None:
                return array
            if vocab_rows > array.shape[0]:
                raise ValueError(f"vocab_rows={vocab_rows} exceeds the {array.shape[0]} embedding rows")
            return array[:vocab_rows]

        out = {"model.embed_tokens.weight": rows(flat["token_embeddings"])}
        for i in range(cfg.num_layers):
            prefix = f"model.layers.{i}."
            qkv = flat[f"layers/{i}/attn/qkv_proj/kernel"]  # [d, q + 2 kv]: [q | k | v]
            out[prefix + "self_attn.q_proj.weight"] = qkv[:, :q_width].T
            out[prefix + "self_attn.k_proj.weight"] = qkv[:, q_width : q_width + kv_width].T
            out[prefix + "self_attn.v_proj.weight"] = qkv[:, q_width + kv_width :].T
            for ours, theirs, transpose in _BLOCK_PARAMS:
                value = flat[f"layers/{i}/{ours}"]
                out[prefix + theirs] = value.T if transpose else value
        out["model.norm.weight"] = flat["norm/weight"]
        if "lm_head/kernel" in flat:
            out["lm_head.weight"] = rows(flat["lm_head/kernel"].T)
        return out

    @staticmethod
    def _stacked(flat: dict, i: int) -> dict:
        """Layer i's experts as mlx-lm stacks them: {projection: [E, out, in]} (views)."""
        gate_up = flat[f"layers/{i}/ffn/experts/gate_up"]  # [E, d, 2, I]
        return {
            "gate_proj": gate_up[:, :, 0, :].transpose(0, 2, 1),  # [E, I, d]
            "up_proj": gate_up[:, :, 1, :].transpose(0, 2, 1),
            "down_proj": flat[f"layers/{i}/ffn/experts/down"].transpose(0, 2, 1),  # [E, d, I]
        }

    def to_hf(self, flat: dict, model_config, vocab_rows: int | None = None) -> dict[str, np.ndarray]:
        """HF-named arrays ([out, in]) from flat elmjax params; `vocab_rows` keeps the first
        rows of the embedding and the output head."""
        out = self._common(flat, model_config, vocab_rows)
        for i in range(model_config.num_layers):
            for name, stacked in self._stacked(flat, i).items():
                for j in range(stacked.shape[0]):
                    out[f"model.layers.{i}.mlp.experts.{j}.{name}.weight"] = stacked[j]
        return out

    def to_mlx(self, flat: dict, model_config, vocab_rows: int | None = None) -> dict[str, np.ndarray]:
        """mlx-lm-named arrays: as `to_hf`, with each layer's experts stacked [E, out, in]."""
        out = self._common(flat, model_config, vocab_rows)
        for i in range(model_config.num_layers):
            for name, stacked in self._stacked(flat, i).items():
                out[f"model.layers.{i}.mlp.switch_mlp.{name}.weight"] = stacked
        return out

    def from_hf(self, tensors: dict, model_config) -> dict[str, np.ndarray]:
        """Flat elmjax paths -> arrays, from HF names. Raises KeyError naming a missing tensor
        and ValueError for a wrong tensor count."""
        cfg = model_config
        experts = cfg.num_experts
        per_layer = 4 + len(_BLOCK_PARAMS) + 3 * experts - 1  # q, k, v (+ o among the block params)
        expected = 2 + (0 if cfg.tie_embeddings else 1) + per_layer * cfg.num_layers
        if len(tensors) != expected:
            raise ValueError(
                f"holds {len(tensors)} tensors; an OLMoE with {cfg.num_layers} layers of {experts} experts "
                f"({'tied' if cfg.tie_embeddings else 'untied'} embeddings) has {expected} (names: SPEC §2)"
            )
        get = lambda name: np.asarray(tensors[name])  # noqa: E731
        out = {"token_embeddings": get("model.embed_tokens.weight")}
        for i in range(cfg.num_layers):
            prefix = f"model.layers.{i}."
            out[f"layers/{i}/attn/qkv_proj/kernel"] = np.concatenate(
                [get(prefix + f"self_attn.{p}_proj.weight").T for p in "qkv"], axis=1
            )
            for ours, theirs, transpose in _BLOCK_PARAMS:
                value = get(prefix + theirs)
                out[f"layers/{i}/{ours}"] = value.T if transpose else value
            expert = lambda j, p: get(f"{prefix}mlp.experts.{j}.{p}.weight")  # noqa: E731
            out[f"layers/{i}/ffn/experts/gate_up"] = np.stack(
                [np.stack([expert(j, "gate_proj").T, expert(j, "up_proj").T], axis=1) for j in range(experts)]
            )  # [E, d, 2, I]
            out[f"layers/{i}/ffn/experts/down"] = np.stack([expert(j, "down_proj").T for j in range(experts)])
        out["norm/weight"] = get("model.norm.weight")
        if not cfg.tie_embeddings:
            out["lm_head/kernel"] = get("lm_head.weight").T
        return out

    # ---- config.json ---------------------------------------------------------------------
    def config_json(self, model_config, torch_dtype: str = "float32", vocab_size: int | None = None) -> dict:
        """config.json with `OlmoeConfig`'s keys (transformers 5), plus `rope_theta` and
        `head_dim`, which mlx-lm's olmoe reads."""
        cfg = model_config
        theta = int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vocab_size": vocab_size if vocab_size is not None else cfg.vocab_size,
            "hidden_size": cfg.model_dim,
            "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "initializer_range": cfg.init_std,
            "rms_norm_eps": cfg.norm_eps,
            "use_cache": True,
            # OlmoeConfig's defaults (the GPT-NeoX tokenizer); export puts the tokenizer's ids here.
            "pad_token_id": 1,
            "bos_token_id": None,
            "eos_token_id": 50279,
            "tie_word_embeddings": bool(cfg.tie_embeddings),
            "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
            "rope_theta": theta,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "clip_qkv": None,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "num_experts": cfg.num_experts,
            "output_router_logits": False,
            "router_aux_loss_coef": cfg.load_balance_weight,
            "norm_topk_prob": bool(cfg.norm_topk_prob),
            "dtype": torch_dtype,
        }

    def model_fields(self, hf_cfg: dict) -> dict:
        """elmjax `config.model` fields from an OLMoE config.json."""
        if hf_cfg.get("model_type") != self.model_type:
            raise HFConfigError(f"config.json: model_type={hf_cfg.get('model_type')!r}; expected 'olmoe'")
        _expect(hf_cfg, "hidden_act", ["silu"])
        _expect(hf_cfg, "attention_bias", [False, None])
        _expect(hf_cfg, "clip_qkv", [None])
        try:
            hidden, heads = int(hf_cfg["hidden_size"]), int(hf_cfg["num_attention_heads"])
            fields = dict(
                num_layers=int(hf_cfg["num_hidden_layers"]),
                model_dim=hidden,
                num_heads=heads,
                num_kv_heads=int(hf_cfg.get("num_key_value_heads") or heads),
                head_dim=int(hf_cfg.get("head_dim") or hidden // heads),
                ffn_dim=int(hf_cfg["intermediate_size"]),
                num_experts=int(hf_cfg["num_experts"]),
                num_experts_per_tok=int(hf_cfg["num_experts_per_tok"]),
                vocab_size=int(hf_cfg["vocab_size"]),
            )
        except KeyError as missing:
            raise HFConfigError(f"config.json lacks the OLMoE key {missing}") from None
        fields.update(
            max_seq_len=int(hf_cfg.get("max_position_embeddings", 4096)),
            norm_eps=float(hf_cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=_rope_theta(hf_cfg),
            tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", False)),
            norm_topk_prob=bool(hf_cfg.get("norm_topk_prob", False)),
            load_balance_weight=float(hf_cfg.get("router_aux_loss_coef", 0.01)),
            init_std=float(hf_cfg.get("initializer_range", 0.02)),
            qk_norm="full",
        )
        return fields

    def check_config(self, hf_cfg: dict, model_config) -> None:
        """Nothing is derived from config.json beyond `model_fields`; its shapes are checked
        against the weights on load."""

"""BTLM (Cerebras' BTLM-3B-8K, arXiv 2309.11568; SPEC §3): a pre-LayerNorm GPT-2 style
decoder with ALiBi, SwiGLU, biases, tied embeddings and muP.

Every layer has the same shape: `num_heads` heads of `head_dim` (multi-head: as many kv heads
as query heads) and a SwiGLU of inner width `ffn_dim`. The blocks use the shared parts: the
fused q|k|v attention (bias, no QK-norm, ALiBi, scale 1/head_dim under muP), LayerNorm with
bias, and the fused SwiGLU, whose [gate | up] projection holds BTLM's `c_fc2` (the gate) and
`c_fc` halves (hf.py maps them). muP (its multipliers, init and learning-rate groups) is
the shared facility of elmjax/mup.py, turned on by the config's `mup_*` fields.
"""
from __future__ import annotations

from elmjax.models.btlm.hf import BTLMLayout
from elmjax.models.family import LayerSpec, ModelFamily
from elmjax.validation import require


class BTLM(ModelFamily):
    """The `btlm` family."""

    name = "btlm"
    hf_layout = BTLMLayout()

    def model_fields(self) -> dict:
        return {
            "num_heads": 32,  # attention heads per layer (query = kv heads); head_dim * num_heads = model_dim
            "ffn_dim": 6826,  # SwiGLU inner width (BTLM: int(8/3 * 2560))
        }

    def validate(self, model_config) -> None:
        cfg = model_config
        require(cfg.num_heads >= 1, "model.num_heads", f"is {cfg.num_heads}; need >= 1")
        require(
            cfg.model_dim % cfg.num_heads == 0,
            "model.num_heads",
            f"{cfg.num_heads} heads do not divide model.model_dim={cfg.model_dim}",
        )
        require(
            cfg.head_dim * cfg.num_heads == cfg.model_dim,
            "model.head_dim",
            f"is {cfg.head_dim}; {cfg.num_heads} heads of model.model_dim={cfg.model_dim} need "
            f"head_dim={cfg.model_dim // cfg.num_heads}",
        )
        require(cfg.ffn_dim >= 1, "model.ffn_dim", f"is {cfg.ffn_dim}; need >= 1")

    def layer_specs(self, model_config) -> list[LayerSpec]:
        spec = LayerSpec(model_config.num_heads, model_config.num_heads, model_config.ffn_dim)
        return [spec] * model_config.num_layers

    def describe(self, model_config) -> list[str]:
        cfg = model_config
        return [f"every layer: {cfg.num_heads} heads of {cfg.head_dim}, SwiGLU inner {cfg.ffn_dim}"]

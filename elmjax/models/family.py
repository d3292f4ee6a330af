"""What a model family is: the interface every architecture folder under elmjax/models/ fills.

A family owns what differs between architectures: its own `config.model` fields with their
defaults and validation, its per-layer shapes, its initialisation, the pieces its blocks are
built from (norm, attention, feed-forward), its training FLOPs per token, and its Hugging Face
/ MLX layouts. Everything shared (attention, norms, positions, linear layers, kernels,
sharding) lives in elmjax/layers, elmjax/kernels and elmjax/parallel and knows no family.

A new family subclasses `ModelFamily` and is registered with `elmjax.models.register`; nothing
else in elmjax changes.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from elmjax.layers.init import InitRules  # noqa: F401  (re-exported: families subclass it)


class HFConfigError(ValueError):
    """A Hugging Face config.json describes a model elmjax cannot represent, or contradicts itself."""


def tied_embedding_rows(flat: dict, vocab_rows: int | None, layout: str):
    """The embedding of a tied-embedding layout's export: its first `vocab_rows` rows (a model
    trained with a padded vocabulary exports its real vocabulary). Refuses an untied model."""
    if "lm_head/kernel" in flat:
        raise ValueError(f"the {layout} HF layout has tied embeddings; this model has an lm_head")
    embedding = flat["token_embeddings"]
    if vocab_rows is not None:
        if vocab_rows > embedding.shape[0]:
            raise ValueError(f"vocab_rows={vocab_rows} exceeds the {embedding.shape[0]} embedding rows")
        embedding = embedding[:vocab_rows]
    return embedding


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Shapes of one transformer layer."""

    num_query_heads: int
    num_kv_heads: int
    ffn_dim: int  # inner (hidden) width of the feed-forward (of one expert, for MoE)


class ModelFamily:
    """Base class of a model family. Override what the architecture changes.

    Class attributes:
      name: the `config.model.family` value.
      hf_layout: the family's Hugging Face layout (an object with the methods of
        `elmjax.models.openelm.hf.OpenELMLayout`), or None when the family has none.
      has_experts: whether parameters carry an `expert` axis (`mesh.expert > 1` needs it).
      adapter_targets: the default `model.adapter.targets` (SPEC §1's PEFT recipe: the
        embedding and every linear layer of the blocks).
    """

    name: str = ""
    hf_layout = None
    has_experts: bool = False
    adapter_targets: str = "token_embeddings,qkv_proj,out_proj,proj_1,proj_2"

    # ---- configuration -------------------------------------------------------------------
    def model_fields(self) -> dict:
        """This family's own `config.model` fields and their defaults."""
        return {}

    def validate(self, model_config) -> None:
        """Raises `elmjax.validation.ConfigError` naming the first bad family field."""

    # ---- architecture --------------------------------------------------------------------
    def layer_specs(self, model_config) -> list[LayerSpec]:
        """Per-layer shapes, first layer first."""
        raise NotImplementedError

    def init_rules(self, model_config) -> InitRules:
        """The initialisation scheme of a from-scratch model: muP's (elmjax/mup.py) when
        `model.mup_base_width` is set, else OpenELM's scheme."""
        from elmjax import mup

        if mup.enabled(model_config):
            return mup.MupInitRules(model_config)
        return InitRules(model_config.model_dim, model_config.num_layers)

    def norm(self, model_config, dim: int):
        """A norm layer over `dim` features (the block's pre-norms and the final norm)."""
        from elmjax.layers.norms import make_norm

        cfg = model_config
        return make_norm(cfg.norm_type, dim, cfg.norm_eps, cfg.use_bias, jnp.dtype(cfg.param_dtype))

    def attention(self, model_config, spec: LayerSpec, init: InitRules):
        """The block's attention module."""
        from elmjax.layers.attention import Attention

        return Attention(model_config, spec.num_query_heads, spec.num_kv_heads, init=init)

    def feed_forward(self, model_config, spec: LayerSpec, init: InitRules):
        """The block's feed-forward module (SwiGLU by default). A module whose class sets
        `has_aux = True` returns `(output, aux)` (see elmjax/layers/aux.py)."""
        from elmjax.layers.mlp import SwiGLU

        cfg = model_config
        return SwiGLU(
            cfg.model_dim, spec.ffn_dim, init=init, use_bias=cfg.use_bias,
            compute_dtype=jnp.dtype(cfg.compute_dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        )

    # ---- accounting ----------------------------------------------------------------------
    def layer_matmul_params(self, model_config, spec: LayerSpec) -> int:
        """Matmul weights of one layer that each token uses (the active ones, for MoE).

        The default is a fused-qkv attention plus a SwiGLU of width `spec.ffn_dim`.
        """
        d, hd = model_config.model_dim, model_config.head_dim
        q, kv = spec.num_query_heads, spec.num_kv_heads
        return d * (q + 2 * kv) * hd + q * hd * d + 3 * d * spec.ffn_dim

    def num_experts(self, model_config) -> int:
        """Experts per MoE layer (0 for dense families); `mesh.expert` must divide it."""
        return 0

    def active_params(self, model_config, total_params: int) -> int:
        """Parameters one token uses, given the model's `total_params`: all of them for a
        dense family; an MoE family leaves out the experts a token is not routed to."""
        return total_params

    def describe(self, model_config) -> list[str]:
        """Extra lines for `tools/count_params.py` (per-layer shapes and the like)."""
        return []

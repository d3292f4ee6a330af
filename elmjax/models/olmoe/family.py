"""OLMoE (arXiv 2409.02060, SPEC §2): uniform pre-norm layers, QK-norm over the whole
projected q and k, and a mixture of SwiGLU experts in place of every feed-forward.

Its own config fields are the head counts, the expert bank (count, top-k, inner width,
`norm_topk_prob`), the auxiliary loss weights, the truncated-normal initialisation and the
MoE implementation choices. Blocks use the shared fused-qkv attention (`model.qk_norm="full"`
gives OLMoE's QK-norm) and the shared MoE feed-forward (elmjax/layers/moe/). FLOPs and MFU
count the parameters a token uses: the router and k of the E experts.
"""
from __future__ import annotations

import jax.numpy as jnp

from elmjax.layers.moe.grouped import MATMUL_IMPLS
from elmjax.models.family import InitRules, LayerSpec, ModelFamily
from elmjax.models.olmoe.hf import OlmoeLayout
from elmjax.parallel.expert import DISPATCH_IMPLS
from elmjax.validation import choice, require


class TruncatedNormalInit(InitRules):
    """Every matrix ~ N(0, std^2) cut at +-cutoff * std (OLMoE: std 0.02, 3 sigma); norm
    weights 1."""

    def __init__(self, std: float, cutoff: float):
        self.rule = ("truncated_normal", float(std), float(cutoff))

    def embedding(self) -> tuple:
        return self.rule

    def linear(self, in_features: int) -> tuple:
        return self.rule

    def output_projection(self) -> tuple:
        return self.rule


class OLMoE(ModelFamily):
    """The `olmoe` family."""

    name = "olmoe"
    hf_layout = OlmoeLayout()
    has_experts = True
    adapter_targets = "token_embeddings,qkv_proj,out_proj"  # the experts take no adapters

    def model_fields(self) -> dict:
        return {
            "num_heads": 16,  # query heads
            "num_kv_heads": 16,  # key/value heads (OLMoE has no GQA: equal to num_heads)
            "ffn_dim": 1024,  # inner width of one SwiGLU expert
            "num_experts": 64,  # experts per layer
            "num_experts_per_tok": 8,  # top-k: experts each token uses
            "norm_topk_prob": False,  # renormalise the k chosen probabilities to sum to 1
            "load_balance_weight": 0.01,  # weight of N_E * sum f_i P_i (1 at balance)
            "router_z_loss_weight": 0.001,  # weight of mean(logsumexp(router logits)^2)
            "init_std": 0.02,  # truncated-normal std of every matrix
            "init_cutoff": 3.0,  # truncation at +-init_cutoff * init_std
            "moe_matmul": "auto",  # grouped matmul, one of MATMUL_IMPLS (auto: by backend)
            "moe_dispatch": "auto",  # expert-parallel all-to-all, one of DISPATCH_IMPLS
            "moe_tile": 128,  # row tile of the tiled / megablox grouped matmul
        }

    def validate(self, model_config) -> None:
        cfg = model_config
        require(cfg.num_heads >= 1, "model.num_heads", f"is {cfg.num_heads}; need >= 1")
        require(cfg.num_kv_heads >= 1, "model.num_kv_heads", f"is {cfg.num_kv_heads}; need >= 1")
        require(
            cfg.num_heads % cfg.num_kv_heads == 0,
            "model.num_kv_heads",
            f"{cfg.num_kv_heads} does not divide model.num_heads={cfg.num_heads}",
        )
        require(cfg.ffn_dim >= 1, "model.ffn_dim", f"is {cfg.ffn_dim}; need >= 1")
        require(cfg.num_experts >= 1, "model.num_experts", f"is {cfg.num_experts}; need >= 1")
        require(
            1 <= cfg.num_experts_per_tok <= cfg.num_experts,
            "model.num_experts_per_tok",
            f"is {cfg.num_experts_per_tok}; need 1 <= top-k <= model.num_experts={cfg.num_experts}",
        )
        for name in ("load_balance_weight", "router_z_loss_weight"):
            require(cfg[name] >= 0, f"model.{name}", f"is {cfg[name]}; need >= 0")
        require(cfg.init_std > 0, "model.init_std", f"is {cfg.init_std}; need > 0")
        require(cfg.init_cutoff > 0, "model.init_cutoff", f"is {cfg.init_cutoff}; need > 0")
        choice(cfg, "model", "moe_matmul", MATMUL_IMPLS)
        choice(cfg, "model", "moe_dispatch", DISPATCH_IMPLS)
        require(
            cfg.moe_tile >= 8 and cfg.moe_tile % 8 == 0,
            "model.moe_tile",
            f"is {cfg.moe_tile}; need a multiple of 8 (TPU sublanes), >= 8",
        )

    def num_experts(self, model_config) -> int:
        return int(model_config.num_experts)

    # ---- architecture --------------------------------------------------------------------
    def layer_specs(self, model_config) -> list[LayerSpec]:
        cfg = model_config
        return [LayerSpec(cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim)] * cfg.num_layers

    def init_rules(self, model_config) -> InitRules:
        return TruncatedNormalInit(model_config.init_std, model_config.init_cutoff)

    def feed_forward(self, model_config, spec: LayerSpec, init: InitRules):
        from elmjax.layers.moe import MoEFeedForward

        cfg = model_config
        return MoEFeedForward(
            cfg.model_dim, spec.ffn_dim, num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
            init=init, normalize_top_k=bool(cfg.norm_topk_prob),
            load_balance_weight=float(cfg.load_balance_weight), z_loss_weight=float(cfg.router_z_loss_weight),
            matmul_impl=cfg.moe_matmul, dispatch_impl=cfg.moe_dispatch, tile=int(cfg.moe_tile),
            compute_dtype=jnp.dtype(cfg.compute_dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        )

    # ---- accounting ----------------------------------------------------------------------
    def _expert_params(self, model_config, spec: LayerSpec) -> int:
        return 3 * model_config.model_dim * spec.ffn_dim  # gate, up, down of one expert

    def layer_matmul_params(self, model_config, spec: LayerSpec) -> int:
        """Attention, the router, and the k experts a token uses (not all E)."""
        cfg = model_config
        d, hd = cfg.model_dim, cfg.head_dim
        q, kv = spec.num_query_heads, spec.num_kv_heads
        attention = d * (q + 2 * kv) * hd + q * hd * d
        return attention + d * cfg.num_experts + cfg.num_experts_per_tok * self._expert_params(cfg, spec)

    def active_params(self, model_config, total_params: int) -> int:
        """All parameters except, in every layer, the E - k experts a token does not use."""
        cfg = model_config
        unused = cfg.num_experts - cfg.num_experts_per_tok
        return total_params - sum(unused * self._expert_params(cfg, spec) for spec in self.layer_specs(cfg))

    def describe(self, model_config) -> list[str]:
        cfg = model_config
        return [
            f"attention: {cfg.num_heads} query heads, {cfg.num_kv_heads} kv heads of {cfg.head_dim}",
            f"experts per layer: {cfg.num_experts} SwiGLU of inner width {cfg.ffn_dim}, "
            f"top-{cfg.num_experts_per_tok} (norm_topk_prob {bool(cfg.norm_topk_prob)})",
        ]

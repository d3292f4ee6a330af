"""The MoE feed-forward module: a router and a bank of SwiGLU experts (OLMoE, SPEC §2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax.layers.init import param
from elmjax.layers.moe import dispatch, router


class Router(nnx.Module):
    """`logits = x @ kernel` in float32 (kernel [d, experts]); routing decisions are made in
    float32 whatever the compute dtype."""

    def __init__(self, model_dim: int, num_experts: int, *, init: tuple, param_dtype):
        # The expert dimension of the router stays whole on every device: each device routes
        # its own tokens to all experts.
        self.kernel = param((model_dim, num_experts), param_dtype, ("embed", None), init)

    def __call__(self, x):
        """x [..., d] -> float32 logits [..., experts]."""
        return jnp.einsum(
            "...d,de->...e", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,  # float32 on TPU too, not bf16 passes
        )


class Experts(nnx.Module):
    """E SwiGLU experts, stacked: gate_up [E, d, 2, I] (gate at index 0), down [E, I, d]."""

    def __init__(self, model_dim: int, ffn_dim: int, num_experts: int, *, init, param_dtype):
        self.gate_up = param(
            (num_experts, model_dim, 2, ffn_dim), param_dtype, ("expert", "embed", None, "mlp"),
            init.linear(model_dim),
        )
        self.down = param(
            (num_experts, ffn_dim, model_dim), param_dtype, ("expert", "mlp", "embed"), init.output_projection()
        )


class MoEFeedForward(nnx.Module):
    """Dropless token-choice MoE: `out = sum_{i in top-k} p_i * expert_i(x)`.

    Returns `(output, aux)` (`has_aux`): the load-balance and router z-loss with their weights
    and the layer's expert load (elmjax/layers/moe/router.py).
    """

    has_aux = True

    def __init__(self, model_dim: int, ffn_dim: int, *, num_experts: int, top_k: int, init,
                 normalize_top_k: bool = False, load_balance_weight: float = 0.01,
                 z_loss_weight: float = 0.001, matmul_impl: str = "auto", dispatch_impl: str = "auto",
                 tile: int = 128, compute_dtype=jnp.float32, param_dtype=jnp.float32):
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.load_balance_weight = load_balance_weight
        self.z_loss_weight = z_loss_weight
        self.matmul_impl = matmul_impl
        self.dispatch_impl = dispatch_impl
        self.tile = tile
        self.compute_dtype = compute_dtype
        self.router = Router(model_dim, num_experts, init=init.linear(model_dim), param_dtype=param_dtype)
        self.experts = Experts(model_dim, ffn_dim, num_experts, init=init, param_dtype=param_dtype)

    def cast_before_use(self) -> dict:
        """{parameter path: dtype}: the experts' weights are used only in the compute dtype
        (elmjax/layers/moe/dispatch.py), so scanned runs stack them so (elmjax/layers/scan.py)."""
        return {("experts", "gate_up"): self.compute_dtype, ("experts", "down"): self.compute_dtype}

    def route(self, x):
        """(logits [..., E], probs [..., E], weights [..., k], experts [..., k]) for x [..., d]."""
        logits = self.router(x)
        probs, weights, experts = router.route(logits, self.top_k, self.normalize_top_k)
        return logits, probs, weights, experts

    def __call__(self, x):
        """x [batch, seq, d] -> ([batch, seq, d] in x's dtype, aux dict)."""
        logits, probs, weights, experts = self.route(x)
        out = dispatch.moe(
            x.astype(self.compute_dtype), weights, experts, self.experts.gate_up[...], self.experts.down[...],
            impl=self.matmul_impl, tile=self.tile, dispatch=self.dispatch_impl, compute_dtype=self.compute_dtype,
        )
        aux = router.router_aux(
            logits, probs, experts, load_balance_weight=self.load_balance_weight, z_loss_weight=self.z_loss_weight
        )
        return out.astype(x.dtype), aux

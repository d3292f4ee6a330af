"""Token-choice top-k routing and the router's auxiliary terms.

Routing (OLMoE, SPEC §2; transformers' `OlmoeTopKRouter`): float32 logits, a softmax over
all experts, the top k of the probabilities; the chosen probabilities are the combine
weights, divided by their sum only with `normalize` (`norm_topk_prob`, off by default).

Auxiliary terms, per layer, over all tokens of the (micro-)batch:
- load balance `N_E * sum_i f_i * P_i`, where `f_i` is the fraction of the token-expert
  ASSIGNMENTS that go to expert i (counts / (tokens * k), so sum_i f_i = 1) and `P_i` the
  mean router probability of expert i. It is 1 at perfect balance and N_E when every token
  picks the same experts. transformers' `load_balancing_loss_func` divides the counts by
  tokens only (its f sums to k), so for one layer it equals k times this value. `f` carries
  no gradient (counts are piecewise constant); the gradient flows through `P`.
- router z-loss `mean(logsumexp(logits)^2)`: keeps the router logits small.
- expert load `max_i f_i / mean_i f_i` (a metric): 1 at balance, N_E / k at the worst.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def route(logits, top_k: int, normalize: bool = False):
    """Top-k routing of router `logits` [tokens, experts] (any leading shape).

    Returns (probs [..., experts] float32, weights [..., k] float32, experts [..., k] int32):
    the softmax over all experts, the k largest probabilities (renormalised to sum to 1 when
    `normalize`) and their expert indices, largest first.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts.astype(jnp.int32)


def assignment_fractions(experts, num_experts: int):
    """f [experts] float32: the fraction of the (tokens * k) assignments `experts` [..., k]
    sends to each expert (sums to 1)."""
    flat = experts.reshape(-1)
    counts = jnp.zeros((num_experts,), jnp.float32).at[flat].add(1.0)
    return counts / flat.shape[0]


def load_balance_loss(probs, experts):
    """`N_E * sum_i f_i * P_i` (module docstring) for probs [..., E] and experts [..., k]."""
    num_experts = probs.shape[-1]
    fractions = jax.lax.stop_gradient(assignment_fractions(experts, num_experts))
    mean_probs = jnp.mean(probs.reshape(-1, num_experts), axis=0)  # [E]
    return num_experts * jnp.sum(fractions * mean_probs)


def router_z_loss(logits):
    """`mean(logsumexp(logits)^2)` over tokens, logits [..., E] (computed in float32)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def expert_load(experts, num_experts: int):
    """`max_i f_i / mean_i f_i`: the busiest expert's share of the assignments over a fair share."""
    return jnp.max(assignment_fractions(experts, num_experts)) * num_experts


def router_aux(logits, probs, experts, *, load_balance_weight: float, z_loss_weight: float) -> dict:
    """The aux dict (elmjax/layers/aux.py) of one MoE layer: the two losses and the load."""
    num_experts = probs.shape[-1]
    return {
        "losses": {
            "load_balance": (load_balance_loss(probs, experts), float(load_balance_weight)),
            "router_z_loss": (router_z_loss(logits), float(z_loss_weight)),
        },
        "metrics": {"expert_load": jax.lax.stop_gradient(expert_load(experts, num_experts))},
    }

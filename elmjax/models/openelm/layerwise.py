"""Layer-wise scaling: the per-layer attention heads and FFN widths of OpenELM.

OpenELM gives each transformer layer its own number of query/kv heads and its own FFN
width, interpolated linearly from the first to the last layer (arXiv 2404.14619, §3). This
module is the single source of truth for that schedule; configs only hold the paper's few
numbers and everything per layer is derived here.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from elmjax.models.family import LayerSpec


@dataclasses.dataclass(frozen=True)
class ScaledLayerSpec(LayerSpec):
    """One layer's shapes plus the multipliers they came from (config.json keeps them)."""

    qkv_multiplier: float = 1.0  # alpha_i
    ffn_multiplier: float = 1.0  # beta_i


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Rounds `value` to the nearest multiple of `divisor`, never going below 90% of it.

    This is the rounding rule of OpenELM's reference code (inherited from MobileNet); it is
    reproduced exactly because the released weights' shapes depend on it.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:  # rounding down must not lose more than 10%
        rounded += divisor
    return int(rounded)


def interpolate_multipliers(low_high: Sequence[float], num_layers: int) -> list[float]:
    """`round(linspace(low, high, num_layers)[i], 2)` in float64, as in the paper's code."""
    low, high = low_high
    return [round(float(v), 2) for v in np.linspace(low, high, num=num_layers, dtype=np.float64)]


def layer_schedule(
    num_layers: int,
    model_dim: int,
    head_dim: int,
    num_gqa_groups: int,
    qkv_multipliers: Sequence[float],
    ffn_multipliers: Sequence[float],
    ffn_dim_divisor: int,
) -> list[ScaledLayerSpec]:
    """The per-layer heads and FFN widths for a layer-wise scaled decoder.

    A range with equal ends (e.g. `(1.0, 1.0)`) gives a uniform model.
    """
    alphas = interpolate_multipliers(qkv_multipliers, num_layers)
    betas = interpolate_multipliers(ffn_multipliers, num_layers)
    specs = []
    for alpha, beta in zip(alphas, betas):
        query_dim = make_divisible(model_dim * alpha, divisor=head_dim * num_gqa_groups)
        num_query_heads = query_dim // head_dim
        specs.append(
            ScaledLayerSpec(
                num_query_heads=num_query_heads,
                num_kv_heads=num_query_heads // num_gqa_groups,
                ffn_dim=make_divisible(beta * model_dim, divisor=ffn_dim_divisor),
                qkv_multiplier=alpha,
                ffn_multiplier=beta,
            )
        )
    return specs


def schedule_from_config(model_config) -> list[ScaledLayerSpec]:
    """`layer_schedule` for a validated OpenELM `config.model`."""
    return layer_schedule(
        num_layers=model_config.num_layers,
        model_dim=model_config.model_dim,
        head_dim=model_config.head_dim,
        num_gqa_groups=model_config.num_gqa_groups,
        qkv_multipliers=tuple(model_config.qkv_multipliers),
        ffn_multipliers=tuple(model_config.ffn_multipliers),
        ffn_dim_divisor=model_config.ffn_dim_divisor,
    )

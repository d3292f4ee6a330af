"""OpenELM (arXiv 2404.14619, SPEC §1): a pre-norm decoder whose layers widen with depth.

Its own config fields are the layer-wise scaling inputs (`num_gqa_groups`, the
`qkv_multipliers` / `ffn_multipliers` ranges, `ffn_dim_divisor`); every per-layer width is
derived from them by `layerwise.py`. Blocks use the shared fused-qkv attention with per-head
QK-norm and RoPE, and the fused SwiGLU; initialisation is the default `InitRules`.
"""
from __future__ import annotations

import itertools

from elmjax.models.family import ModelFamily
from elmjax.models.openelm import layerwise
from elmjax.models.openelm.hf import OpenELMLayout
from elmjax.validation import require


def _multiplier_range(model_config, name: str) -> None:
    field = f"model.{name}"
    low_high = tuple(model_config[name])
    require(
        len(low_high) == 2 and all(isinstance(v, (int, float)) for v in low_high),
        field,
        f"is {low_high!r}; expected two numbers (first layer, last layer)",
    )
    low, high = low_high
    require(low > 0, field, f"min {low} must be > 0")
    require(low <= high, field, f"min {low} is greater than max {high}; expected min <= max")


def run_length(values) -> str:
    """[12, 12, 16] -> '12x2, 16x1'."""
    return ", ".join(f"{value}x{len(list(group))}" for value, group in itertools.groupby(values))


class OpenELM(ModelFamily):
    """The `openelm` family."""

    name = "openelm"
    hf_layout = OpenELMLayout()

    def model_fields(self) -> dict:
        return {
            "num_gqa_groups": 4,  # query heads per kv head
            "qkv_multipliers": (0.5, 1.0),  # (first, last) layer's query width as a fraction of d
            "ffn_multipliers": (0.5, 4.0),  # (first, last) layer's FFN width as a multiple of d
            "ffn_dim_divisor": 256,  # FFN widths are rounded to multiples of this
        }

    def validate(self, model_config) -> None:
        require(
            model_config.num_gqa_groups >= 1,
            "model.num_gqa_groups",
            f"is {model_config.num_gqa_groups}; need >= 1",
        )
        _multiplier_range(model_config, "qkv_multipliers")
        _multiplier_range(model_config, "ffn_multipliers")
        require(
            model_config.ffn_dim_divisor >= 1,
            "model.ffn_dim_divisor",
            f"is {model_config.ffn_dim_divisor}; need >= 1",
        )
        # No per-layer head check: make_divisible rounds each layer's query width to a
        # multiple of head_dim * num_gqa_groups, so the groups always divide the heads.

    def layer_specs(self, model_config):
        return layerwise.schedule_from_config(model_config)

    def describe(self, model_config) -> list[str]:
        schedule = self.layer_specs(model_config)
        return [
            f"query heads: {run_length(s.num_query_heads for s in schedule)}",
            f"kv heads: {run_length(s.num_kv_heads for s in schedule)}",
            f"ffn dims: {[s.ffn_dim for s in schedule]}",
        ]

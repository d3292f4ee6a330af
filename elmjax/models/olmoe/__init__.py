"""The OLMoE family: a decoder whose every feed-forward is a dropless top-k MoE (SPEC §2)."""

from elmjax.models.olmoe.family import OLMoE

FAMILY = OLMoE()

__all__ = ["FAMILY", "OLMoE"]

"""Mixture-of-experts parts shared by any MoE family: top-k router and its auxiliary terms
(router.py), grouped matmuls (grouped.py), dropless dispatch (dispatch.py; expert
parallelism in elmjax/parallel/expert.py) and the feed-forward module (layer.py)."""

from elmjax.layers.moe.layer import MoEFeedForward

__all__ = ["MoEFeedForward"]

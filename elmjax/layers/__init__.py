"""The decoder and its parts; `Transformer` is the model a config builds."""

from elmjax.layers.decoder import Transformer, build_model

__all__ = ["Transformer", "build_model"]

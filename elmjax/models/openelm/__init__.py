"""The OpenELM family: layer-wise scaled decoders (SPEC §1)."""

from elmjax.models.openelm.family import OpenELM

FAMILY = OpenELM()

__all__ = ["FAMILY", "OpenELM"]

"""The BTLM family: GPT-2 style decoders with ALiBi, SwiGLU and muP (SPEC §3)."""

from elmjax.models.btlm.family import BTLM

FAMILY = BTLM()

__all__ = ["BTLM", "FAMILY"]

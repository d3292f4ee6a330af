"""The names `config.data` accepts, and the parsing of `data.mixture_weights`: defined once
here and used by `elmjax.config.validate` and the data pipeline alike.

Standard library only: elmjax.config imports this module.
"""
from __future__ import annotations

import math

DATA_FORMATS = ("auto", "text", "jsonl", "parquet", "token_store")  # data.format
TEXT_UNITS = ("file", "line")  # data.text_unit: a text file's documents (whole file / lines)

# data.chat_template: a name here, or a turn header of its own holding "{role}" once. Every
# turn is rendered as header(role) + content + EOS (elmjax/data/chat.py).
CHAT_TEMPLATES = {"openelm": "<|{role}|>\n"}  # OpenELM-Instruct's turns (SPEC §5)


def chat_header(template: str) -> str:
    """The turn header format of `data.chat_template` (a name or a header with "{role}").

    Raises ValueError whose text completes "config field `data.chat_template`: ..."."""
    header = CHAT_TEMPLATES.get(template, template)
    rest = header.replace("{role}", "")
    if header.count("{role}") != 1 or "{" in rest or "}" in rest:
        raise ValueError(
            f"is {template!r}; give one of {', '.join(CHAT_TEMPLATES)}, a turn header holding "
            "\"{role}\" once and no other braces (e.g. \"### {role}:\\n\"), or \"\" for plain documents"
        )
    return header


def source_entries(source) -> list[str]:
    """`data.source` split into its comma-separated entries (blank entries dropped)."""
    return [entry.strip() for entry in str(source).split(",") if entry.strip()]


def parse_mixture_weights(value, num_sources: int) -> list[float]:
    """`data.mixture_weights` -> one positive finite weight per source (empty = equal).

    Raises ValueError whose text completes "config field `data.mixture_weights`: ..." (the
    callers raise it as a ConfigError naming that field)."""
    text = str(value).strip()
    if not text:
        return [1.0] * num_sources
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != num_sources or not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(
            f"is {value!r}; need {num_sources} positive comma-separated numbers, one per "
            "data.source entry (or empty for equal weights)"
        )
    return weights

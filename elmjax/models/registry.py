"""Model families by name: `config.model.family` -> the family object.

The built-in families are imported on first use; a family defined elsewhere (another
package, a test) calls `register(family)` before its config is validated.
"""
from __future__ import annotations

import importlib

from elmjax.validation import ConfigError

# Built-in family name -> module holding its `FAMILY`.
_BUILTIN = {
    "openelm": "elmjax.models.openelm",
    "btlm": "elmjax.models.btlm",
    "olmoe": "elmjax.models.olmoe",
}
_REGISTERED: dict = {}


def register(family) -> None:
    """Makes `family` (a `ModelFamily`) available as `config.model.family = family.name`."""
    if not family.name:
        raise ValueError(f"{type(family).__name__} has no name")
    _REGISTERED[family.name] = family


def names() -> list[str]:
    """Every known family name, built-in and registered."""
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get(name: str):
    """The family called `name`; an unknown name is a ConfigError listing the known ones."""
    if name not in _REGISTERED and name in _BUILTIN:
        register(importlib.import_module(_BUILTIN[name]).FAMILY)
    if name not in _REGISTERED:
        raise ConfigError("model.family", f"is {name!r}; known families: {', '.join(names())}")
    return _REGISTERED[name]


def for_hf_model_type(model_type) -> object:
    """The family whose Hugging Face layout has `model_type` (config.json), or None."""
    for name in names():
        family = get(name)
        if family.hf_layout is not None and family.hf_layout.model_type == model_type:
            return family
    return None

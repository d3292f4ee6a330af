"""Config errors and the small checks every config section (and every model family) uses.

Kept apart from `elmjax.config` so that model families can validate their own fields without
importing the schema that lists them (no import cycle).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration field holds a value that elmjax cannot run with."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config field `{field}`: {message}")
        self.field = field


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or its type's name when the message is empty:
    the reason shown in a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def require(condition: bool, field: str, message: str) -> None:
    """Raises `ConfigError(field, message)` unless `condition`."""
    if not condition:
        raise ConfigError(field, message)


def choice(section_config, section: str, name: str, allowed) -> None:
    """`section_config[name]` must be one of `allowed`."""
    value = section_config[name]
    require(value in allowed, f"{section}.{name}", f"is {value!r}; allowed: {', '.join(allowed)}")


def at_least(section_config, section: str, name: str, minimum) -> None:
    """`section_config[name] >= minimum`."""
    value = section_config[name]
    require(value >= minimum, f"{section}.{name}", f"is {value}; need >= {minimum}")


def check_expert_axis(num_experts: int, expert_axis: int) -> None:
    """The expert mesh axis must split the experts evenly (each device holds E / axis)."""
    require(
        num_experts % expert_axis == 0,
        "mesh.expert",
        f"is {expert_axis}; it must divide model.num_experts={num_experts} "
        "(each device of the expert axis holds the same number of experts)",
    )

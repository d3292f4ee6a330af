"""The resolved config a checkpoint step carries: to JSON and back onto the schema."""
from __future__ import annotations

import json

import ml_collections

from elmjax import storage


def config_to_dict(config) -> dict:
    return json.loads(config.to_json())


def config_from_dict(data: dict) -> ml_collections.ConfigDict:
    """A ConfigDict from saved JSON, laid over `base_config(its model family)` so tuples and
    placeholders keep their types; fields unknown to this version are kept as saved (a
    config saved before families existed is OpenELM's)."""
    from elmjax.config import base_config

    def merge(node, values):
        for key, value in values.items():
            if key in node and isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
                merge(node[key], value)
            elif key in node and isinstance(node[key], tuple) and isinstance(value, list):
                node[key] = _tuples(value)
            else:
                with node.unlocked():
                    node[key] = value

    config = base_config(data.get("model", {}).get("family", "openelm"))
    merge(config, data)
    return config


def _tuples(value):
    """JSON lists back to the (nested) tuples the config schema uses."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def read_config(step_dir) -> ml_collections.ConfigDict:
    """The resolved config saved with a step; DamagedCheckpointError (naming the file) when it
    is missing or not the JSON it was written as."""
    from elmjax.training.checkpoint_errors import DamagedCheckpointError, one_line

    metadata_file = storage.path(step_dir) / "config" / "metadata"
    try:
        data = json.loads(metadata_file.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"holds a JSON {type(data).__name__}, not the config's object")
    except (OSError, ValueError) as error:
        raise DamagedCheckpointError(f"the config saved with checkpoint step {storage.path(step_dir).name} "
                                     f"({metadata_file}) is unreadable: {one_line(error)}") from None
    return config_from_dict(data)

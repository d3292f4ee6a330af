"""Prints a config's parameter count and per-layer schedule, from abstract shapes only.

    python tools/count_params.py --config=configs/3b.py [--config.model.vocab_size=32128]
"""
from __future__ import annotations

import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from elmjax.config import validate_for_cli  # noqa: E402
from elmjax.layers.decoder import abstract_model, count_params  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)


def run_length(values) -> str:
    """[12, 12, 16] -> '12x2, 16x1'."""
    return ", ".join(f"{value}x{len(list(group))}" for value, group in itertools.groupby(values))


def describe(config) -> list[str]:
    """The lines the tool prints for a validated config."""
    model = abstract_model(config.model)  # ShapeDtypeStructs: nothing is allocated
    schedule = model.schedule
    embedding = config.model.vocab_size * config.model.model_dim
    total = count_params(model)
    lines = [
        f"params: {total}",
        f"non-embedding params: {total - embedding}",
        f"layers: {len(schedule)}",
        f"query heads: {run_length(s.num_query_heads for s in schedule)}",
        f"kv heads: {run_length(s.num_kv_heads for s in schedule)}",
        f"ffn dims: {[s.ffn_dim for s in schedule]}",
    ]
    return lines


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config=PATH is required, e.g. --config=configs/3b.py")
    print("\n".join(describe(validate_for_cli(_CONFIG.value))))


if __name__ == "__main__":
    app.run(main)

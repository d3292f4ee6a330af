"""Prints a config's parameter counts (total, active per token, trainable, non-embedding), its
training FLOPs per token and its family's per-layer shapes, from abstract shapes only.

    python tools/count_params.py --config=configs/3b.py [--config.model.vocab_size=32128]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from elmjax import cli, models, trainable  # noqa: E402
from elmjax.config import validate  # noqa: E402
from elmjax.layers.decoder import abstract_model  # noqa: E402
from elmjax.training.metrics import flops_per_token  # noqa: E402

cli.define_config_flag(None)


def describe(config) -> list[str]:
    """The lines the tool prints for a validated config."""
    model = abstract_model(config.model)  # ShapeDtypeStructs: nothing is allocated
    trainable_count, total = trainable.count(model, config.model)
    embedding = config.model.vocab_size * config.model.model_dim
    family = models.get(config.model.family)
    return [
        f"params: {total}",
        f"active_params: {family.active_params(config.model, total)}",  # used per token (MoE: k of E experts)
        f"trainable params: {trainable_count}",
        f"family: {family.name}",
        f"non-embedding params: {total - embedding}",
        f"layers: {len(model.schedule)}",
        f"training FLOPs per token at seq_len {config.train.seq_len} (SPEC §4 + output head): "
        f"{flops_per_token(config.model, config.train.seq_len):.4g}",
        *family.describe(config.model),
    ]


def main(argv):
    del argv
    from absl import flags

    if flags.FLAGS.config is None:
        cli.fail("--config=PATH is required, e.g. --config=configs/3b.py")
    print("\n".join(describe(validate(flags.FLAGS.config, reads_inputs=False))))


if __name__ == "__main__":
    cli.run(main)

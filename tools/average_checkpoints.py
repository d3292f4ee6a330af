"""Average the parameters of a workdir's last K checkpoints (OpenELM's release recipe).

    python tools/average_checkpoints.py --workdir DIR --last 5 --out DIR2 [--overwrite]

DIR2 becomes a params-only checkpoint workdir (at the newest averaged step) that export,
evaluation and fine-tuning accept; DIR2/average.json lists the steps averaged.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir holding the checkpoints")
    parser.add_argument("--last", type=int, default=5, help="number of newest complete checkpoints to average")
    parser.add_argument("--out", required=True, help="workdir to create (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)
    from elmjax.training.checkpoint import CheckpointError
    from elmjax.convert.average import average_checkpoints

    try:
        steps = average_checkpoints(args.workdir, args.out, last=args.last, overwrite=args.overwrite)
    except (ValueError, OSError, CheckpointError) as error:
        print(f"averaging failed: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: mean of steps {steps}")
    return 0


if __name__ == "__main__":
    from elmjax import cli  # one-line errors, and the CPU pinned before a JAX backend starts

    sys.exit(cli.run_command(main))

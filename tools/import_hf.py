"""Import a Hugging Face OpenELM, OLMoE or BTLM directory as an elmjax checkpoint workdir.

    python tools/import_hf.py --hf HF_DIR --out WORKDIR [--overwrite]

config.json's model_type picks the family; the config is derived from config.json (OpenELM's
per-layer lists must match elmjax's layer-wise scaling rule, BTLM's stored ALiBi slopes the
formula's); the weights become a params-only checkpoint at step 0, which fine-tuning
(`python -m elmjax.train --workdir WORKDIR ...`), evaluation and export accept. The
tokenizer files are copied to WORKDIR/tokenizer and the config points to them.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="directory with config.json and model*.safetensors")
    parser.add_argument("--out", required=True, help="workdir to create (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)
    from elmjax.training.checkpoint import CheckpointError
    from elmjax.convert.hf_import import import_hf_dir

    try:
        config = import_hf_dir(args.hf, args.out, overwrite=args.overwrite)
    except (ValueError, KeyError, OSError, CheckpointError) as error:
        print(f"import failed: {error}", file=sys.stderr)
        return 2
    model = config.model
    print(
        f"wrote {args.out}: {model.num_layers} layers, model_dim {model.model_dim}, "
        f"vocab {model.vocab_size}, tokenizer {config.data.tokenizer or '(none in --hf)'}"
    )
    return 0


if __name__ == "__main__":
    from elmjax import cli  # one-line errors, and the CPU pinned before a JAX backend starts

    sys.exit(cli.run_command(main))

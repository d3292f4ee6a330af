"""Export an elmjax checkpoint to Hugging Face / PyTorch (`--to torch`) or mlx-lm (`--to mlx`).

    python tools/export.py --checkpoint WORKDIR_OR_STEP_DIR --to {torch,mlx} --out DIR
        [--dtype {float32,bfloat16,float16}] [--step N]
        [--quantize {4,8} --group-size {32,64,128}] [--max-shard-gb 2] [--overwrite]
    python tools/export.py --checkpoint LORA_WORKDIR --adapters {peft,mlx} --out DIR

A LoRA/DoRA checkpoint exports merged into its base with --to, or its adapters alone with
--adapters: peft's adapter_model.safetensors + adapter_config.json, or mlx-lm's
adapters.safetensors + adapter_config.json (`mlx_lm.load(base_dir, adapter_path=DIR)`).

The output is written to a temporary directory and renamed when complete, so a failed
export leaves nothing behind; an existing --out is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training workdir (newest complete step) or a step directory")
    parser.add_argument("--to", dest="target", help="torch (Hugging Face layout) or mlx (mlx-lm layout)")
    parser.add_argument("--adapters", help="peft or mlx: write a LoRA/DoRA checkpoint's adapters alone")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--base", default="", help="with --adapters peft: the exported base model's directory "
                        "(or hub id), written as base_model_name_or_path; default: the run's train.init_from")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--step", type=int, default=None, help="export this step of a workdir instead of the newest")
    parser.add_argument("--quantize", type=int, default=None, help="mlx only: 4 or 8 bits (mlx-lm affine quantization)")
    parser.add_argument("--group-size", type=int, default=64, help="quantization group size: 32, 64 (default) or 128")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="shard model.safetensors above this size (GiB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from elmjax.training.checkpoint import CheckpointError
    from elmjax.convert.export import export_adapter_checkpoint, export_checkpoint

    start = time.perf_counter()
    if (args.target is None) == (args.adapters is None):
        print("export failed: give exactly one of --to {torch,mlx} (the model) or --adapters {peft,mlx}", file=sys.stderr)
        return 2
    if not args.max_shard_gb > 0:
        print(f"export failed: --max-shard-gb is {args.max_shard_gb:g}; need > 0 (GiB per model.safetensors shard)",
              file=sys.stderr)
        return 2
    try:
        if args.adapters:
            files = export_adapter_checkpoint(args.checkpoint, args.out, to=args.adapters, step=args.step,
                                              overwrite=args.overwrite, base_model=args.base)
        else:
            files = export_checkpoint(
                args.checkpoint, args.out, target=args.target, dtype=args.dtype, step=args.step,
                quantize=args.quantize, group_size=args.group_size, overwrite=args.overwrite,
                max_shard_bytes=int(args.max_shard_gb * 1024**3),
            )
    except (ValueError, OSError, CheckpointError) as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 2
    except ImportError as error:  # --to mlx needs mlx (the `export` extra)
        from elmjax.cli import missing_extra_message

        print(f"export failed: {missing_extra_message(error)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({', '.join(files)}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    from elmjax import cli  # one-line errors, and the CPU pinned before a JAX backend starts

    sys.exit(cli.run_command(main))

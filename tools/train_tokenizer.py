"""Train a SentencePiece BPE tokenizer on a corpus (the sources `data.source` names).

  PYTHONPATH=. python tools/train_tokenizer.py --source='data/*.jsonl' --vocab_size=32000 \\
      --output=/tmp/tok/tokenizer.model
  PYTHONPATH=. python tools/train_tokenizer.py --source=embedded --vocab_size=4096 \\
      --output=/tmp/tok/tokenizer.model --hf_dir=/tmp/tok

Uses LLaMA's conventions (unk 0, bos 1, eos 2, pad 3; byte fallback; identity normalisation)
so the model also converts exactly to a Hugging Face tokenizer.json (`--hf_dir`).
Then train with `--config.data.tokenizer=/tmp/tok/tokenizer.model`.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="embedded", help="data.source syntax: paths/globs, embedded")
    parser.add_argument("--format", default="auto", help="data.format: auto|text|jsonl|parquet")
    parser.add_argument("--text_field", default="text", help="JSONL field / Parquet column")
    parser.add_argument("--text_unit", default="file", help="text files: file|line")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--max_documents", type=int, default=0, help="train on at most this many (0 = all)")
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    parser.add_argument("--hf_dir", help="also write Hugging Face tokenizer files here")
    args = parser.parse_args(argv)

    from elmjax.config import base_config
    from elmjax.data import sources as sources_lib
    from elmjax.data.tokenizer import SentencePieceTokenizer
    from elmjax.data.sentencepiece_training import train_sentencepiece
    from elmjax.storage import StorageError

    data = base_config().data
    data.source, data.format, data.text_field, data.text_unit = (
        args.source, args.format, args.text_field, args.text_unit
    )
    if args.vocab_size < 300:
        print("error: --vocab_size must be >= 300 (259 byte and special pieces are reserved)", file=sys.stderr)
        return 2
    try:
        opened = [sources_lib.open_source(s, data) for s in sources_lib.parse_source_list(data)]
    except (ValueError, FileNotFoundError, StorageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if any(source.tokenized for source in opened):
        print("error: --source is a token store; train a tokenizer on text", file=sys.stderr)
        return 2

    def texts():
        count = 0
        for source in opened:
            for index in range(len(source)):
                if args.max_documents and count >= args.max_documents:
                    return
                count += 1
                yield source[index]

    try:
        proto = train_sentencepiece(texts(), args.vocab_size)
    except ValueError as error:
        print(f"error: --vocab_size: {error}", file=sys.stderr)
        return 2
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(proto)
    tokenizer = SentencePieceTokenizer(proto, name=str(output))
    print(f"wrote {output} ({tokenizer.vocab_size} pieces, fingerprint {tokenizer.fingerprint})")
    if args.hf_dir:
        files = tokenizer.save_hf_files(args.hf_dir)
        print(f"wrote {', '.join(files)} to {os.path.abspath(args.hf_dir)}")
    return 0


if __name__ == "__main__":
    from elmjax import cli  # one-line errors, and the CPU pinned before a JAX backend starts

    sys.exit(cli.run_command(main))

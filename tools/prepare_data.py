"""Tokenise text sources once into a token store (tensorstore zarr3, local or gs://).

  PYTHONPATH=. python tools/prepare_data.py --config=configs/tiny.py --output=/tmp/tiny_store
  PYTHONPATH=. python tools/prepare_data.py --source='data/*.jsonl' --tokenizer=tok.model \\
      --output=gs://bucket/store

Then train from it with `--config.data.source=/tmp/tiny_store` (the store keeps its
tokenizer, so data.tokenizer may stay empty). Documents are stored without BOS/EOS; the
pipeline adds them as config.data says. Empty/undecodable inputs are counted in the store's
metadata (elmjax_token_store.json) and printed.
"""
from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm


def prepare(config, output: str, *, overwrite: bool = False, batch_docs: int = 256) -> dict:
    """Writes every document of config.data.source (all splits) to a token store at
    `output`; returns the store's metadata."""
    from elmjax.data import sources as sources_lib
    from elmjax.data.token_store import TokenStoreWriter
    from elmjax.data.tokenizer_choice import load_tokenizer

    tokenizer = load_tokenizer(config)
    specs = sources_lib.parse_source_list(config.data)
    opened = [sources_lib.open_source(spec, config.data) for spec in specs]
    if any(source.tokenized for source in opened):
        raise ValueError("config field `data.source`: a token store cannot be an input of prepare_data")
    writer = TokenStoreWriter(output, tokenizer, overwrite=overwrite)
    stats = sources_lib.SourceStats()
    for source in opened:
        for field, value in source.stats.as_dict().items():
            setattr(stats, field, getattr(stats, field) + value)
        with tqdm(total=len(source), desc=f"tokenising {source.name}", unit="doc") as bar:
            for start in range(0, len(source), batch_docs):
                texts = [source[i] for i in range(start, min(start + batch_docs, len(source)))]
                for tokens in tokenizer.encode_batch(texts):
                    writer.add(tokens)
                bar.update(len(texts))
    return writer.close(stats, [s.name for s in opened])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py", help="config file whose data section is used")
    parser.add_argument("--source", help="overrides data.source (comma-separated paths/globs)")
    parser.add_argument("--format", help="overrides data.format")
    parser.add_argument("--text_field", help="overrides data.text_field")
    parser.add_argument("--text_unit", help="overrides data.text_unit")
    parser.add_argument("--tokenizer", help="overrides data.tokenizer (.model or tokenizer.json)")
    parser.add_argument("--output", required=True, help="store root: a path, file://, gs:// or memory:// URL")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    args = parser.parse_args(argv)

    from elmjax.config import ConfigError, load_config_file, validate
    from elmjax.storage import StorageError

    config = load_config_file(args.config)
    for name in ("source", "format", "text_field", "text_unit", "tokenizer"):
        if getattr(args, name) is not None:
            config.data[name] = getattr(args, name)
    try:
        validate(config)
        meta = prepare(config, args.output, overwrite=args.overwrite)
    except (ConfigError, StorageError, ValueError, OSError) as error:
        if "--debug" in sys.argv:  # cli.run_command took it out of argv
            raise
        if isinstance(error, FileNotFoundError) and error.filename:  # an OS error: name the file
            print(f"error: no such file: {error.filename}; check --source, --tokenizer and the data section of "
                  f"{args.config}", file=sys.stderr)
        else:  # ours name the file and the fix already
            print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    from elmjax import cli  # one-line errors, and the CPU pinned before a JAX backend starts

    sys.exit(cli.run_command(main))

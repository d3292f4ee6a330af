"""The tokenizer file a run keeps in its workdir, found from a workdir or a step directory.

A training run writes the tokenizer it trains with into its workdir (`tokenizer.model` for
SentencePiece, `tokenizer.json` for Hugging Face; the bytes `Tokenizer.stored_file` gives),
so a fine-tune or `elmjax.generate` that starts from the workdir, or from one of its step
directories (WORKDIR/checkpoints/STEP), uses the same vocabulary without `data.tokenizer`.
Bytes only here (no tokenizer library), so elmjax.data.tokenizer_choice can import this module.
Workdirs may be local or gs:// (elmjax/storage.py).
"""
from __future__ import annotations

from elmjax import storage

STORED_NAMES = ("tokenizer.model", "tokenizer.json")
# Beside a tokenizer.json whose BOS/EOS/pad have unusual names: those names (Tokenizer.stored_special).
SPECIAL_NAME = "tokenizer_config.json"


def find_stored_tokenizer(path, *, look_up: bool = True) -> tuple[str, bytes, str, bytes | None] | None:
    """(file name, bytes, file path, special-token file's bytes or None) of the tokenizer kept
    with the run at `path` (a workdir or, with `look_up`, a step directory under it), or None
    when there is none (an older run)."""
    path = storage.path(path)
    # A step dir is WORKDIR/checkpoints/STEP (or WORKDIR/STEP); look up to the workdir.
    for directory in (path, path.parent, path.parent.parent) if look_up else (path,):
        for name in STORED_NAMES:
            candidate = directory / name
            if candidate.is_file():
                special = directory / SPECIAL_NAME
                return name, candidate.read_bytes(), str(candidate), special.read_bytes() if special.is_file() else None
    return None


def write_stored_tokenizer(workdir, name: str, payload: bytes, special: bytes | None = None) -> str:
    """Writes the tokenizer file (and its special-token names, if any) into `workdir`, each as
    one step: never half-written. Returns the tokenizer file's path."""
    target = storage.path(workdir) / name
    if special is not None:  # first: a tokenizer file found always has its names beside it
        storage.write_bytes(storage.path(workdir) / SPECIAL_NAME, special)
    storage.write_bytes(target, payload)
    return str(target)

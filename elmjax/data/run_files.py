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


def find_stored_tokenizer(path, *, look_up: bool = True) -> tuple[str, bytes, str] | None:
    """(file name, bytes, file path) of the tokenizer kept with the run at `path` (a workdir
    or, with `look_up`, a step directory under it), or None when there is none (an older run)."""
    path = storage.path(path)
    # A step dir is WORKDIR/checkpoints/STEP (or WORKDIR/STEP); look up to the workdir.
    for directory in (path, path.parent, path.parent.parent) if look_up else (path,):
        for name in STORED_NAMES:
            candidate = directory / name
            if candidate.is_file():
                return name, candidate.read_bytes(), str(candidate)
    return None


def write_stored_tokenizer(workdir, name: str, payload: bytes) -> str:
    """Writes the tokenizer file into `workdir` (as one step: never half-written); returns
    its path."""
    target = storage.path(workdir) / name
    storage.write_bytes(target, payload)
    return str(target)

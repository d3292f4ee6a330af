"""Which documents, or which tokens, a source holds out for evaluation.

Documents are split by a hash of their key (`is_eval_document`), so the split is
deterministic and independent of the order and number of documents. A source with too few
documents for that (a single text file, with the default data.text_unit="file") would leave
evaluation without data: it keeps every document in both splits instead, and each document's
tokens are split, the head (1 - data.eval_fraction) for training and the tail for
evaluation (at least one token each). `plan_split` decides this once, from the source alone,
so the train and eval pipelines agree, and the training pipeline can tell at start whether
evaluation will have data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from elmjax.data.base import DocumentSource, logger


def is_eval_document(key: str, eval_fraction: float) -> bool:
    """Deterministic held-out membership from a hash of the document's key."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < eval_fraction


def _held_out_mask(source: DocumentSource, eval_fraction: float) -> np.ndarray:
    if eval_fraction <= 0:
        return np.zeros(len(source), bool)
    keys = (source.key(i) for i in range(len(source)))
    held_out = np.fromiter((is_eval_document(key, eval_fraction) for key in keys), bool, len(source))
    if not held_out.any() and len(source) > 1:
        held_out[0] = True  # a tiny source still gets a non-empty held-out set
    return held_out


def split_indices(source: DocumentSource, eval_fraction: float, split: str) -> np.ndarray:
    """Indices of `source`'s documents in `split` ("train" or "eval"), by whole documents."""
    held_out = _held_out_mask(source, eval_fraction)
    return np.flatnonzero(held_out if split == "eval" else ~held_out)


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """The documents of each split, and whether the splits share documents and divide each
    document's tokens instead (`token_split`: the eval split gets the last `eval_fraction`)."""

    train: np.ndarray
    eval: np.ndarray
    eval_fraction: float
    token_split: bool = False

    def indices(self, split: str) -> np.ndarray:
        return self.eval if split == "eval" else self.train


def plan_split(source: DocumentSource, eval_fraction: float, process_count: int) -> SplitPlan:
    """Whole documents for each split when each of the `process_count` processes gets at least
    one document of each; else (a source with too few documents) a split of each document's
    tokens, with a warning."""
    held_out = _held_out_mask(source, eval_fraction)
    train, held = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    enough = len(held) >= process_count and len(train) >= process_count
    if eval_fraction <= 0 or enough or len(source) < process_count:
        return SplitPlan(train, held, eval_fraction)
    logger.warning(
        "data source %s has %d document(s), too few to hold out whole documents for evaluation "
        "(data.eval_fraction=%g holds out %d; each of the %d process(es) needs one); holding out "
        "the last %g%% of each document's tokens instead",
        source.name, len(source), eval_fraction, len(held), process_count, 100 * eval_fraction,
    )
    everything = np.arange(len(source))
    return SplitPlan(everything, everything, eval_fraction, token_split=True)


def held_out_tokens(length: int, eval_fraction: float) -> int:
    """How many of a document's `length` tokens (BOS/EOS included) a token split holds out:
    the fraction rounded up, at least one, and never all of them."""
    if length < 2:
        return 0
    return min(length - 1, max(1, math.ceil(length * eval_fraction)))


def token_part(tokens: np.ndarray, eval_fraction: float, split: str) -> np.ndarray:
    """A document's part of its tokens in `split` under a token split (head: train, tail: eval)."""
    cut = len(tokens) - held_out_tokens(len(tokens), eval_fraction)
    return tokens[cut:] if split == "eval" else tokens[:cut]

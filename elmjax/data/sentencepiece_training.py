"""Training SentencePiece BPE vocabularies: `train_sentencepiece(texts, vocab_size)` for
tools/train_tokenizer.py, and `embedded_tokenizer`, the one trained on the embedded corpus on
first use and cached under $ELMJAX_CACHE (default ~/.cache/elmjax), keyed by the corpus text
and the training settings so any change retrains.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from typing import Iterable, Sequence

import sentencepiece as spm

from elmjax.data.tokenizer import SentencePieceTokenizer, cache_dir

# Changing any of these changes the cache key, so cached tokenizers are retrained.
_SPM_SETTINGS = dict(
    model_type="bpe",
    normalization_rule_name="identity",  # LLaMA-style: no NFKC, so HF's converter is exact
    remove_extra_whitespaces=False,  # keep text round-trippable
    byte_fallback=True,  # no <unk> for unseen characters: they become byte pieces
    split_digits=True,
    character_coverage=0.9999,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    max_sentence_length=1 << 15,
    input_sentence_size=4_000_000,
    shuffle_input_sentence=True,
    seed_sentencepiece_size=1_000_000,
    num_threads=2,
    minloglevel=2,
)


def _training_sentences(texts: Iterable[str]) -> Iterable[str]:
    """Paragraphs (blank-line separated, newlines kept) so the vocabulary learns '\\n'."""
    for text in texts:
        for paragraph in text.split("\n\n"):
            paragraph = paragraph.strip("\n")
            if paragraph.strip():
                yield paragraph[: _SPM_SETTINGS["max_sentence_length"] // 4]


class VocabularySizeError(ValueError):
    """SentencePiece cannot train a vocabulary of the size asked for on the text given:
    `most` (the text gives no more pieces) or `fewest` (its characters and the special and
    byte pieces need that many) is SentencePiece's bound; the other is None."""

    def __init__(self, message: str, *, most: int | None = None, fewest: int | None = None):
        super().__init__(message)
        self.most, self.fewest = most, fewest


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """Trains a SentencePiece BPE with LLaMA's special ids (unk 0, bos 1, eos 2; pad 3).

    Raises VocabularySizeError when `vocab_size` is more pieces than the text gives or fewer
    than its characters need (with SentencePiece's own bound)."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_sentences(texts)),
            model_writer=model,
            vocab_size=vocab_size,
            **_SPM_SETTINGS,
        )
    except RuntimeError as error:
        most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(error))
        fewest = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(error))
        if most:
            raise VocabularySizeError(f"a vocabulary of {vocab_size} pieces is more than this text gives (at most "
                                      f"{most.group(1)}); lower the vocabulary size or train on more text",
                                      most=int(most.group(1))) from None
        if fewest:
            raise VocabularySizeError(f"a vocabulary of {vocab_size} pieces is too small for this text (its "
                                      f"characters and the special and byte pieces need at least {fewest.group(1)}); "
                                      "raise the vocabulary size", fewest=int(fewest.group(1))) from None
        raise
    return model.getvalue()


def embedded_tokenizer(vocab_size: int, corpora: Sequence[str]) -> SentencePieceTokenizer:
    """The SentencePiece BPE trained on the embedded corpora, from the cache or trained now."""
    from elmjax.data.corpus import embedded_documents, embedded_fingerprint

    corpora = tuple(sorted(corpora))
    settings = json.dumps(_SPM_SETTINGS, sort_keys=True) + spm.__version__
    key = hashlib.sha256(
        f"{embedded_fingerprint(corpora)}|{vocab_size}|{settings}".encode()
    ).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"{'+'.join(corpora)}-bpe{vocab_size}-{key}.model"
    if not path.exists():
        texts = (text for name in corpora for _, text in embedded_documents(name))
        proto = train_sentencepiece(texts, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: concurrent first uses never read a half-written file.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(proto)
        os.replace(tmp.name, path)
    return SentencePieceTokenizer.from_file(path)

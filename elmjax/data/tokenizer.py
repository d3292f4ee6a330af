"""Tokenizers: SentencePiece `.model` files and Hugging Face `tokenizer.json` behind one API.

`open_tokenizer(path)` opens a file (or "gpt2" for GPT-2's BPE, elmjax/data/gpt2_bpe.py);
training a SentencePiece BPE (the embedded corpus's, cached) is
elmjax/data/sentencepiece_training.py; which tokenizer a run uses, and keeping it with the run,
is elmjax/data/tokenizer_choice.py.

Encoding never adds BOS/EOS: the pipeline adds them per document as `config.data` says.
`save_hf_files(out_dir)` writes files `transformers.AutoTokenizer` and mlx-lm load offline.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import pathlib
from typing import ClassVar, Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers

from elmjax.data.base import logger

# Texts longer than this are tokenized in pieces of at most this many characters
# (Tokenizer.encode_array), so tokenizing a document needs memory independent of its length.
MAX_CHUNK_CHARS = 1 << 16
_FORCED_CUT_TRIES = 64  # cuts tried, a character apart, when a piece has no space to end at


def _space_between_words(text: str, low: int, high: int) -> int | None:
    """The last index i in [low, high) with text[i] == " " between two non-space characters."""
    i = text.rfind(" ", low, high)
    while i > 0:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", low, i)
    return None


class Tokenizer(abc.ABC):
    """Text <-> token ids. Pickles by value, so grain worker processes get a copy."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_token_id: int | None  # the pad token's id, or None when the vocabulary has none
    stored_file_name: str  # the file `stored_file` names ("tokenizer.model", ...)
    _by_stored_file_name: ClassVar[dict[str, type[Tokenizer]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "stored_file_name" in cls.__dict__:
            Tokenizer._by_stored_file_name[cls.stored_file_name] = cls

    @property
    def bos_prefix(self) -> list[int]:
        """[BOS], or [] for a vocabulary without one (whose documents the pipeline starts with
        no BOS either)."""
        return [self.bos_id] if self.bos_id is not None else []

    @property
    def pad_id(self) -> int:
        """The id in padding positions: the pad token's, or 0 when the vocabulary has none."""
        return self.pad_token_id if self.pad_token_id is not None else 0

    @abc.abstractmethod
    def stored_file(self) -> tuple[str, bytes]:
        """(file name, bytes) that define this tokenizer, as a token store keeps them."""

    def stored_special(self) -> bytes | None:
        """The `tokenizer_config.json` kept beside the stored file where the file alone does
        not say which tokens are BOS/EOS/pad (None: it does)."""
        return None

    @classmethod
    @abc.abstractmethod
    def from_bytes(cls, payload: bytes, name: str, special: bytes | None = None) -> Tokenizer:
        """The tokenizer `stored_file` (and `stored_special`) described; `name` says where it
        came from."""

    @staticmethod
    def from_stored_file(file_name: str, payload: bytes, name: str, special: bytes | None = None) -> Tokenizer:
        """Rebuilds a tokenizer from what `stored_file` and `stored_special` returned."""
        kind = Tokenizer._by_stored_file_name.get(file_name)
        if kind is None:
            raise ValueError(
                f"{name}: unknown tokenizer file {file_name!r}; known: "
                f"{', '.join(sorted(Tokenizer._by_stored_file_name))}"
            )
        return kind.from_bytes(payload, name, special)

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Token ids of the whole of `text` at once, without BOS/EOS."""

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """`_encode` of each text (implementations may use several threads)."""
        return [self._encode(text) for text in texts]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (a long text is tokenized in pieces, see
        `encode_array`)."""
        if len(text) <= MAX_CHUNK_CHARS:
            return self._encode(text)
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array. A text longer than MAX_CHUNK_CHARS is tokenized in
        pieces of at most that many characters, so memory does not grow with the document
        (SentencePiece needs ~40 bytes per character at once, more with a large vocabulary).
        A piece ends at a space between two non-space characters where it can: no token
        spans such a space (tokens do not continue across a word start), so the ids are
        those of the whole text. A text without such a space for MAX_CHUNK_CHARS / 2
        characters is cut where the cut keeps the text whole, and its ids may differ from
        whole-text tokenization next to the cut."""
        if len(text) <= MAX_CHUNK_CHARS:
            return np.asarray(self._encode(text), np.int32)
        pieces, start = [], 0
        while start < len(text):
            end = len(text) if len(text) - start <= MAX_CHUNK_CHARS else self._next_cut(text, start)
            if start == 0:
                ids = self._encode(text[:end])
            else:
                ids = self._encode_after(text, start, end)
                if ids is None:  # (rare) no cut was found whose context survives
                    logger.warning("a %d-character document was cut where its tokens may differ", len(text))
                    ids = self._encode(text[start:end])
            pieces.append(np.asarray(ids, np.int32))
            start = end
        return np.concatenate(pieces)

    def _encode_after(self, text: str, start: int, end: int) -> list[int] | None:
        """Ids of text[start:end], a piece that continues the text before it: encoded after
        the character before it (a one-character context), whose ids are then dropped. A
        piece encoded alone would be tokenized as a document's start (SentencePiece adds its
        "▁" dummy prefix). None when the context's ids do not come out unchanged in front,
        i.e. when a token spans the cut."""
        context = self._encode(text[start - 1])
        ids = self._encode(text[start - 1 : end])
        return ids[len(context) :] if ids[: len(context)] == context else None

    def _next_cut(self, text: str, start: int) -> int:
        """Where the piece that starts at `start` ends (see `encode_array`)."""
        low, high = start + MAX_CHUNK_CHARS // 2, start + MAX_CHUNK_CHARS
        cut = _space_between_words(text, low, high)
        if cut is not None:
            return cut
        for cut in range(high, high - _FORCED_CUT_TRIES, -1):
            if self._encode_after(text, cut, min(cut + _FORCED_CUT_TRIES, len(text))) is not None:
                return cut
        return high

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text (short texts may be encoded by several threads)."""
        texts = list(texts)
        out: list[list[int] | None] = [None] * len(texts)
        short = [i for i, text in enumerate(texts) if len(text) <= MAX_CHUNK_CHARS]
        for i, ids in zip(short, self._encode_many([texts[i] for i in short])):
            out[i] = ids
        for i, text in enumerate(texts):
            if out[i] is None:
                out[i] = self.encode(text)
        return out

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; special tokens are dropped."""

    @abc.abstractmethod
    def save_hf_files(self, out_dir) -> list[str]:
        """Writes tokenizer files Hugging Face / mlx-lm load; returns the file names."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A short hash of the tokenizer's definition (checked against token stores)."""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (e.g. LLaMA's tokenizer.model, as OpenELM uses)."""

    stored_file_name = "tokenizer.model"

    def __init__(self, model_proto: bytes, name: str = "tokenizer.model"):
        self._proto = model_proto
        self.name = name
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        # SentencePiece answers -1 for a token the model does not have.
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.pad_token_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    @classmethod
    def from_file(cls, path) -> "SentencePieceTokenizer":
        path = pathlib.Path(path)
        return cls(path.read_bytes(), name=str(path))

    def stored_file(self) -> tuple[str, bytes]:
        return self.stored_file_name, self._proto

    @classmethod
    def from_bytes(cls, payload: bytes, name: str, special: bytes | None = None) -> SentencePieceTokenizer:
        return cls(payload, name=name)  # the model file holds its special ids

    def __getstate__(self):
        return {"proto": self._proto, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["name"])

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()[:16]

    def id_to_piece(self, index: int) -> str:
        return self._sp.id_to_piece(index)

    def save_hf_files(self, out_dir) -> list[str]:
        from elmjax.data import hf_export  # local: only export needs it

        return hf_export.save_sentencepiece(self, self._proto, out_dir)


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (GPT-2/NeoX BPE, LLaMA-3, ...).

    BOS/EOS/pad come from a `tokenizer_config.json` next to the file when there is one,
    else from the usual special-token names.
    """

    _BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>")
    _EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")
    _PAD_NAMES = ("<pad>", "<|padding|>", "[PAD]")
    stored_file_name = "tokenizer.json"

    def __init__(self, json_text: str, special: dict | None = None, name: str = "tokenizer.json"):
        self._json = json_text
        self.name = name
        self._tok = tokenizers.Tokenizer.from_str(json_text)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        special = dict(special or {})
        self._special = special
        self.bos_id = self._find("bos", special, self._BOS_NAMES)
        self.eos_id = self._find("eos", special, self._EOS_NAMES)
        self.pad_token_id = self._find("pad", special, self._PAD_NAMES)

    def _find(self, kind: str, special: dict, names: Sequence[str]) -> int | None:
        token = special.get(f"{kind}_token")
        if isinstance(token, dict):  # tokenizer_config.json may hold AddedToken dicts
            token = token.get("content")
        for name in ([token] if token else []) + list(names):
            index = self._tok.token_to_id(name)
            if index is not None:
                return index
        return None

    @classmethod
    def from_file(cls, path) -> "HuggingFaceTokenizer":
        path = pathlib.Path(path)
        config_path = path.parent / "tokenizer_config.json"
        special = json.loads(config_path.read_text()) if config_path.exists() else {}
        return cls(path.read_text(encoding="utf-8"), special, name=str(path))

    def stored_file(self) -> tuple[str, bytes]:
        return self.stored_file_name, self._json.encode()

    def stored_special(self) -> bytes | None:
        """The resolved BOS/EOS/pad token names, when a tokenizer_config.json (or the built-in
        GPT-2's table) named any: a tokenizer found by the usual names needs none."""
        if not any(self._special.get(f"{kind}_token") for kind in ("bos", "eos", "pad")):
            return None
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_token_id}
        return json.dumps({key: self._tok.id_to_token(i) for key, i in ids.items() if i is not None},
                          indent=1).encode()

    @classmethod
    def from_bytes(cls, payload: bytes, name: str, special: bytes | None = None) -> HuggingFaceTokenizer:
        return cls(payload.decode(), json.loads(special) if special else {}, name=name)

    def __getstate__(self):
        return {"json": self._json, "special": self._special, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["json"], state["special"], state["name"])

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._json.encode()).hexdigest()[:16]

    def save_hf_files(self, out_dir) -> list[str]:
        from elmjax.data import hf_export

        return hf_export.save_tokenizer_json(self, self._json, out_dir)


def open_tokenizer(path) -> Tokenizer:
    """A tokenizer from a SentencePiece `.model` file or a HF `tokenizer.json` (or its dir),
    or the built-in GPT-2 BPE for the name "gpt2" (elmjax/data/gpt2_bpe.py)."""
    from elmjax.data import gpt2_bpe

    if gpt2_bpe.is_gpt2_name(path):
        json_text, special, name = gpt2_bpe.gpt2_tokenizer_json(cache_dir())
        return HuggingFaceTokenizer(json_text, special, name=name)
    path = pathlib.Path(os.path.expanduser(str(path)))
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).exists():
                path = path / name
                break
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {str(path)!r} does not exist; give a SentencePiece .model file, "
            "a tokenizer.json, or a directory holding one (config field `data.tokenizer`)"
        )
    if path.suffix == ".json":
        return HuggingFaceTokenizer.from_file(path)
    return SentencePieceTokenizer.from_file(path)


def cache_dir() -> pathlib.Path:
    """$ELMJAX_CACHE, or ~/.cache/elmjax."""
    return pathlib.Path(os.environ.get("ELMJAX_CACHE") or "~/.cache/elmjax").expanduser()

"""GPT-2's byte-level BPE (50,257 tokens; BTLM's vocabulary) from an installable file.

The `openai-whisper` package ships GPT-2's merge ranks as `whisper/assets/gpt2.tiktoken`
(one `base64(token bytes) rank` line per token, 50,256 of them; `<|endoftext|>` is 50256).
Install it without its dependencies, `pip install --no-deps openai-whisper==20250625`; the
file is read from the installed distribution without importing whisper.

The ranks become a Hugging Face `tokenizers` byte-level BPE (tokenizer.json) served by
`HuggingFaceTokenizer`, so the GPT-2 tokenizer is an ordinary elmjax tokenizer (pickles into
grain workers, is stored in token stores, is written next to exported models). A token's
merge is recovered the way tiktoken applies ranks: BPE over the token's bytes using only
lower ranks always ends in two parts, and merging those two parts is the token's rank. The
pre-tokenizer is GPT-2's regex (tiktoken's r50k pattern), so encoding equals tiktoken's with
the same file. The converted JSON is cached under $ELMJAX_CACHE keyed by the file's hash.

Select it with `data.tokenizer = "gpt2"`.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import pathlib
import tempfile

GPT2_NAME = "gpt2"  # the `data.tokenizer` value that selects this tokenizer
WHISPER_DISTRIBUTION = "openai-whisper"
WHISPER_PIN = "openai-whisper==20250625"
TIKTOKEN_FILE = "whisper/assets/gpt2.tiktoken"
END_OF_TEXT = "<|endoftext|>"


def tiktoken_file() -> pathlib.Path:
    """The installed `gpt2.tiktoken`; FileNotFoundError saying how to install it."""
    try:
        files = importlib.metadata.files(WHISPER_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if str(file).replace("\\", "/") == TIKTOKEN_FILE:
            path = pathlib.Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"data.tokenizer={GPT2_NAME!r} reads GPT-2's BPE from the openai-whisper package, which is not "
        f"installed; run `pip install --no-deps {WHISPER_PIN}`"
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (how byte-level BPE
    vocabularies spell tokens): printable Latin-1 bytes map to themselves, the others to
    code points from 256 on, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def read_ranks(text: str) -> dict[bytes, int]:
    """`token bytes -> rank` from a .tiktoken file's text."""
    ranks = {}
    for line in text.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int], rank: int) -> list[bytes]:
    """BPE of `token`'s bytes merging only pairs whose merge has a rank below `rank`
    (lowest first, as tiktoken does)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = None, rank
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < best_rank:
                best, best_rank = i, pair_rank
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def tokenizer_json(ranks: dict[bytes, int]) -> str:
    """A `tokenizers` byte-level BPE (GPT-2's pre-tokenizer, `<|endoftext|>` after the
    ranks) that encodes as tiktoken does with `ranks`."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    spell = bytes_to_unicode()
    text = lambda token: "".join(spell[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _split_by_lower_ranks(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of lower-ranked tokens")
        merges.append((text(parts[0]), text(parts[1])))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(END_OF_TEXT, special=True, normalized=False)])
    if tok.token_to_id(END_OF_TEXT) != len(ranks):
        raise ValueError(f"{END_OF_TEXT} got id {tok.token_to_id(END_OF_TEXT)}, expected {len(ranks)}")
    return tok.to_str()


def gpt2_tokenizer_json(cache_root: pathlib.Path) -> tuple[str, dict, str]:
    """(tokenizer.json text, special tokens, name) of GPT-2's BPE, cached under `cache_root`;
    `elmjax.data.tokenizer.open_tokenizer` wraps it as a `HuggingFaceTokenizer`
    (BOS = EOS = `<|endoftext|>` = 50256)."""
    source = tiktoken_file()
    payload = source.read_bytes()
    key = hashlib.sha256(payload).hexdigest()[:16]
    cached = cache_root / "tokenizers" / f"gpt2-bpe-{key}.json"
    if cached.exists():
        json_text = cached.read_text(encoding="utf-8")
    else:
        json_text = tokenizer_json(read_ranks(payload.decode()))
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: concurrent first uses never read a half-written file.
        with tempfile.NamedTemporaryFile("w", dir=cached.parent, delete=False, encoding="utf-8") as tmp:
            tmp.write(json_text)
        os.replace(tmp.name, cached)
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}
    return json_text, special, f"{GPT2_NAME} ({source})"


def is_gpt2_name(value: str) -> bool:
    """Whether a `data.tokenizer` value names the built-in GPT-2 BPE."""
    return str(value).strip().lower() == GPT2_NAME


__all__ = ["GPT2_NAME", "gpt2_tokenizer_json", "is_gpt2_name", "read_ranks", "tiktoken_file", "tokenizer_json"]

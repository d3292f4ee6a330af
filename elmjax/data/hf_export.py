"""Tokenizer files for Hugging Face `AutoTokenizer` and mlx-lm (used by `save_hf_files`).

A SentencePiece BPE model is written twice: as `tokenizer.model` (for SentencePiece users)
and as an equivalent `tokenizers` BPE in `tokenizer.json`, which is what transformers and
mlx-lm read. The BPE merge list is recovered from the SentencePiece vocabulary: every
two-part split of a piece whose parts are both pieces is a merge, ranked by the merged
piece's score, highest first, as SentencePiece's BPE applies them. The score, not the id: a
trained model's scores fall with the id, but LLaMA-2's tokenizer (and Mistral's) give
whitespace-run pieces ("▁▁", "▁▁▁▁", ...) a score of -1e9 at low ids, so those merges come
last ("a  b" is "▁a", "▁", "▁b"). Among merges of equal score SentencePiece takes the
leftmost pair, which a BPE merge list cannot say; ranking longer pieces first reproduces
it for runs of one symbol (a run grows from its left end), then the id decides.
"""
from __future__ import annotations

import json
import pathlib

import tokenizers
from tokenizers import decoders, models, normalizers, processors


def _sentencepiece_vocab_and_merges(sp) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked = []
    for piece, index in vocab.items():
        if not sp.is_control(index) and not sp.is_unknown(index) and not sp.is_byte(index):
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    rank = (-sp.get_score(index), -len(piece), index, vocab[left], vocab[right])
                    ranked.append((*rank, left, right))
    ranked.sort()
    return vocab, [(left, right) for *_, left, right in ranked]


def sentencepiece_to_tokenizer_json(sp) -> str:
    """A `tokenizers` JSON that encodes and decodes exactly like SentencePiece BPE `sp`."""
    vocab, merges = _sentencepiece_vocab_and_merges(sp)
    unk = sp.id_to_piece(sp.unk_id())
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # SentencePiece: one "▁" is always prepended (add_dummy_prefix, even before a leading
    # space, which Metaspace would skip) and spaces become "▁"; no pre-tokenizer split.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    if sp.bos_id() >= 0:  # a model without BOS: nothing to add
        bos = sp.id_to_piece(sp.bos_id())
        # Like LLaMA: callers that add special tokens get BOS in front (prompts at generation).
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
        )
    return tok.to_str()


def _special_tokens(tokenizer, id_to_token) -> dict[str, str]:
    """bos, eos and (where the vocabulary has one) pad: the ids export writes to config.json."""
    names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_token_id}
    return {k: id_to_token(v) for k, v in names.items() if v is not None and v >= 0}


def _write_configs(out_dir: pathlib.Path, special: dict[str, str], add_bos: bool) -> list[str]:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return ["tokenizer_config.json", "special_tokens_map.json"]


def save_sentencepiece(tokenizer, proto: bytes, out_dir) -> list[str]:
    """tokenizer.model + tokenizer.json + tokenizer_config.json + special_tokens_map.json."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sp = tokenizer._sp  # the SentencePieceProcessor
    (out_dir / "tokenizer.model").write_bytes(proto)
    (out_dir / "tokenizer.json").write_text(sentencepiece_to_tokenizer_json(sp), encoding="utf-8")
    special = _special_tokens(tokenizer, sp.id_to_piece)
    special["unk_token"] = sp.id_to_piece(sp.unk_id())
    return ["tokenizer.model", "tokenizer.json", *_write_configs(out_dir, special, add_bos=tokenizer.bos_id is not None)]


def save_tokenizer_json(tokenizer, json_text: str, out_dir) -> list[str]:
    """tokenizer.json (as given) + tokenizer_config.json + special_tokens_map.json."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json_text, encoding="utf-8")
    tok = tokenizers.Tokenizer.from_str(json_text)
    special = _special_tokens(tokenizer, tok.id_to_token)
    return ["tokenizer.json", *_write_configs(out_dir, special, add_bos=False)]

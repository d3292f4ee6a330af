"""tokenizer.json written for a SentencePiece BPE encodes exactly as SentencePiece does, also
for models whose piece scores are not in id order (LLaMA-2/Mistral: whitespace runs -1e9)."""
import importlib.metadata
import io
import random

import pytest
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from elmjax.data.corpus import EMBEDDED_CORPORA, embedded_documents
from elmjax.data.hf_export import sentencepiece_to_tokenizer_json

WHITESPACE_SCORE = -1e9  # what LLaMA-2's tokenizer.model gives "▁▁", "▁▁▁▁", ...


def code_snippets(count: int, seed: int) -> list[str]:
    """Indented code: runs of spaces and tabs at line starts, inside and at line ends."""
    rng = random.Random(seed)
    bodies = ["def f(x):", "return x  +  1", "if a and  b:", "x = [1,   2,    3]", "# a  comment",
              "pass", "print( 'hi' )", "a  b", "\tkey:\t\tvalue", ""]  # fmt: skip
    snippets = []
    for _ in range(count):
        lines = []
        for _ in range(rng.randint(1, 10)):
            indent = rng.choice(["    ", "  ", "\t", " \t", " "]) * rng.randint(0, 5)
            lines.append(indent + rng.choice(bodies) + rng.choice(["", " ", "   ", "\t"]))
        snippets.append("\n".join(lines))
    return snippets + ["a  b", " " * 20 + "x", "x" + " " * 33 + "y", "\t\t  \t   z", " " * 7, "  ", "a \t b"]


@pytest.fixture(scope="module")
def whitespace_scored_model() -> bytes:
    """A SentencePiece BPE trained on text and indented code, whose whitespace-run pieces
    then get LLaMA-2's score of -1e9: ids and scores disagree for them."""
    texts = [t for _, t in embedded_documents("kjv")[:150]] + code_snippets(400, seed=0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=1000, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        allow_whitespace_only_pieces=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2, max_sentence_length=1 << 15,
    )  # fmt: skip
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    runs = [p for p in proto.pieces if len(p.piece) > 1 and set(p.piece) == {"▁"}]
    assert len(runs) >= 3 and runs[0].piece == "▁▁"
    for piece in runs:
        piece.score = WHITESPACE_SCORE
    return proto.SerializeToString()


def assert_encodes_like_sentencepiece(proto: bytes, texts: list[str]) -> None:
    sp = spm.SentencePieceProcessor(model_proto=proto)
    exported = tokenizers.Tokenizer.from_str(sentencepiece_to_tokenizer_json(sp))
    expected = sp.encode(texts)
    got = [e.ids for e in exported.encode_batch(texts, add_special_tokens=False)]
    wrong = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
    if wrong:
        a, b = expected[wrong[0]], got[wrong[0]]
        at = next(k for k in range(min(len(a), len(b)) + 1) if k == min(len(a), len(b)) or a[k] != b[k])
        window = slice(max(at - 3, 0), at + 8)
        pytest.fail(
            f"{len(wrong)} of {len(texts)} texts encode differently; the first from token {at}:\n"
            f"  sentencepiece  {[sp.id_to_piece(t) for t in a[window]]}\n"
            f"  tokenizer.json {[sp.id_to_piece(t) for t in b[window]]}"
        )


def corpus_and_code() -> list[str]:
    texts = [text for name in EMBEDDED_CORPORA for _, text in embedded_documents(name)]
    return texts + code_snippets(300, seed=1)


def test_whitespace_runs_merge_last_as_their_score_says(whitespace_scored_model):
    sp = spm.SentencePieceProcessor(model_proto=whitespace_scored_model)
    exported = tokenizers.Tokenizer.from_str(sentencepiece_to_tokenizer_json(sp))
    assert sp.encode("a  b", out_type=str) == ["▁a", "▁", "▁b"]
    assert exported.encode("a  b", add_special_tokens=False).ids == sp.encode("a  b")


def test_exported_tokenizer_json_encodes_the_corpus_and_code_like_sentencepiece(whitespace_scored_model):
    assert_encodes_like_sentencepiece(whitespace_scored_model, corpus_and_code())


def test_mistral_commons_llama_structured_model_exports_exactly():
    """The 32000-piece LLaMA-structured BPE that the `mistral-common` package ships (when it
    is installed; read as a file, the package is not imported)."""
    try:
        files = importlib.metadata.distribution("mistral-common").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mistral-common is not installed (pip install --no-deps mistral-common)")
    paths = [f for f in files if str(f).endswith("data/tokenizer.model.v1")]
    if not paths:
        pytest.skip("this mistral-common has no data/tokenizer.model.v1")
    proto = paths[0].locate().read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert sp.get_piece_size() == 32000 and sp.get_score(sp.piece_to_id("▁▁")) == WHITESPACE_SCORE
    assert_encodes_like_sentencepiece(proto, corpus_and_code())


@pytest.mark.parametrize("vocab, pad", [
    ({"<|endoftext|>": 0, "<|padding|>": 1, "hello": 2, "<unk>": 3}, 1),  # GPT-NeoX's pad (OLMoE's tokenizer)
    ({"<|endoftext|>": 0, "hello": 1, "<unk>": 2}, None),  # no pad token
])
def test_a_tokenizer_json_exports_the_special_ids_transformers_reads(tmp_path, vocab, pad):
    """The ids that export writes to config.json (bos, eos, pad) are the ones transformers
    finds in the exported tokenizer files."""
    from transformers import PreTrainedTokenizerFast

    from elmjax.data.tokenizer import HuggingFaceTokenizer

    ours = HuggingFaceTokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "<unk>")).to_str())
    ours.save_hf_files(tmp_path)
    theirs = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (0, 0, pad)
    assert (ours.bos_id, ours.eos_id, ours.pad_token_id) == (0, 0, pad)


def test_a_sentencepiece_model_without_bos_exports_files_that_add_none(tmp_path):
    """transformers, adding special tokens as generation does, must give SentencePiece's ids."""
    from transformers import PreTrainedTokenizerFast

    from elmjax.data.tokenizer import SentencePieceTokenizer

    texts = [t for _, t in embedded_documents("kjv")[:60]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=400, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    tokenizer = SentencePieceTokenizer(model.getvalue())
    assert tokenizer.bos_id is None and tokenizer.bos_prefix == []
    tokenizer.save_hf_files(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    text = "In the beginning God created the heaven and the earth."
    assert loaded(text)["input_ids"] == tokenizer._sp.encode(text)
    assert loaded.bos_token_id is None and loaded.eos_token_id == 1

"""Long documents are tokenized in bounded pieces: memory independent of the document's
length, and the same ids as tokenizing the whole document at once."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers

from elmjax.data import tokenizer as tokenizer_lib
from elmjax.data.corpus import EMBEDDED_CORPORA, embedded_documents
from elmjax.data.tokenizer import open_tokenizer
from elmjax.data.sentencepiece_training import embedded_tokenizer


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    return embedded_tokenizer(1024, EMBEDDED_CORPORA)


@pytest.fixture(scope="module")
def oracle(sentencepiece_tokenizer):
    """SentencePiece itself, on the same model file: whole-text tokenization."""
    return spm.SentencePieceProcessor(model_file=sentencepiece_tokenizer.name)


@pytest.fixture(scope="module")
def long_text():
    """~120k characters: chapters joined with newlines, blank lines and runs of spaces."""
    chapters = [text for _, text in embedded_documents("kjv")[:40]]
    return "\n\n".join(chapters).replace("\n\n", "\n  \n") + "   the end  "


def test_documents_under_the_bound_tokenize_exactly_as_before(sentencepiece_tokenizer, oracle):
    texts = [text for name in EMBEDDED_CORPORA for _, text in embedded_documents(name)[:200]]
    texts += [" a leading space,  double  spaces ", "x" * tokenizer_lib.MAX_CHUNK_CHARS]
    assert max(len(t) for t in texts) <= tokenizer_lib.MAX_CHUNK_CHARS
    assert sentencepiece_tokenizer.encode_batch(texts) == oracle.encode(texts)
    for text in texts[:50] + texts[-2:]:
        assert sentencepiece_tokenizer.encode(text) == oracle.encode(text)
        np.testing.assert_array_equal(sentencepiece_tokenizer.encode_array(text), oracle.encode(text))


def test_a_long_document_is_tokenized_in_pieces_with_the_whole_documents_ids(
    sentencepiece_tokenizer, oracle, long_text, tmp_path, monkeypatch
):
    sentencepiece_tokenizer.save_hf_files(tmp_path)
    json_tokenizer = open_tokenizer(tmp_path / "tokenizer.json")
    json_oracle = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(tokenizer_lib, "MAX_CHUNK_CHARS", 2000)
    lengths = []
    for tok in (sentencepiece_tokenizer, json_tokenizer):
        encode = tok._encode
        monkeypatch.setattr(tok, "_encode", lambda text, encode=encode: lengths.append(len(text)) or encode(text))
    expected = oracle.encode(long_text)
    assert json_oracle.encode(long_text, add_special_tokens=False).ids == expected
    for tok in (sentencepiece_tokenizer, json_tokenizer):
        lengths.clear()
        assert tok.encode(long_text) == expected
        assert max(lengths) <= 2000 + 1 and len(lengths) > len(long_text) // 2000  # in pieces
        np.testing.assert_array_equal(tok.encode_array(long_text), expected)
        assert tok.encode_batch(["short one", long_text]) == [oracle.encode("short one"), expected]


def test_a_long_text_without_spaces_is_cut_without_losing_a_character(sentencepiece_tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer_lib, "MAX_CHUNK_CHARS", 1000)
    chapter = embedded_documents("kjv")[0][1]
    text = chapter.replace(" ", "")[:6000]  # no space anywhere: every cut is forced
    ids = sentencepiece_tokenizer.encode(text)
    assert sentencepiece_tokenizer.decode(ids) == text


def test_a_4_mb_single_line_document_needs_bounded_memory(sentencepiece_tokenizer, tmp_path):
    """Through the pipeline, as a run with text_unit=line reads it: the peak resident memory
    while its tokens are produced grows by far less than the 40 bytes per character that
    tokenizing it whole takes (about 160 MB here; a 50 MB document was killed at 16.5 GB)."""
    chapters = [text.replace("\n", " ") for _, text in embedded_documents("kjv")]
    line = " ".join(chapters)
    line = (line * (4_000_000 // len(line) + 1))[:4_000_000]
    (tmp_path / "one_line.txt").write_text(line + "\n")
    script = textwrap.dedent(
        f"""
        import json, resource
        from elmjax.config import base_config, validate
        from elmjax.data import pipeline

        config = base_config()
        config.model.vocab_size, config.model.max_seq_len = 1024, 1024
        config.train.seq_len, config.train.batch_size = 1024, 1
        config.data.source, config.data.text_unit = {str(tmp_path / "one_line.txt")!r}, "line"
        config.data.eval_fraction, config.data.tokenizer = 0.0, {sentencepiece_tokenizer.name!r}
        rows = iter(pipeline.build_rows(validate(config), "train", process_index=0, process_count=1,
                                        num_epochs=1))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the source is indexed
        tokens = sum(len(row["tokens"]) for row in rows)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"grown_mb": (after - before) / 1024, "tokens": tokens}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tokens"] > 1_000_000  # the whole line was read, in rows of 1025 tokens
    assert out["grown_mb"] < 40, out

"""GPT-2's BPE (BTLM's vocabulary) from openai-whisper's `gpt2.tiktoken` file, behind elmjax's
tokenizer interface, against tiktoken reading the same file."""
import pickle

import pytest
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from elmjax.data import gpt2_bpe
from elmjax.data.corpus import embedded_documents
from elmjax.data.tokenizer import Tokenizer, open_tokenizer


@pytest.fixture(scope="module")
def ours():
    return open_tokenizer("gpt2")


@pytest.fixture(scope="module")
def theirs():
    """tiktoken with the same file, GPT-2's pattern and <|endoftext|> = 50256."""
    ranks = tiktoken.load.load_tiktoken_bpe(str(gpt2_bpe.tiktoken_file()))
    return tiktoken.Encoding(name="gpt2-whisper-file", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def test_vocabulary_and_special_ids(ours):
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (50257, 50256, 50256)


def test_embedded_corpus_encodes_token_for_token_as_tiktoken(ours, theirs):
    """Every document of the embedded corpus, through the pipeline's own path (encode_array,
    which tokenizes long documents in pieces)."""
    documents = tokens = 0
    for corpus in ("kjv", "shakespeare"):
        for key, text in embedded_documents(corpus):
            expected = theirs.encode_ordinary(text)
            assert ours.encode_array(text).tolist() == expected, key
            documents, tokens = documents + 1, tokens + len(expected)
    assert documents > 60 and tokens > 2_000_000


def test_edge_cases_match_tiktoken(ours, theirs):
    texts = ["", " ", "  \n\n  x  ", "don't we'll I'VE", "naïve café 東京 🙂", "x" * 3000, "a1234567b", "\t\r\n"]
    for text in texts:
        assert ours.encode(text) == theirs.encode_ordinary(text), repr(text)
        assert ours.decode(ours.encode(text)) == text


def test_it_is_an_ordinary_elmjax_tokenizer(ours, tmp_path):
    copy = pickle.loads(pickle.dumps(ours))  # what grain workers receive
    assert copy.encode("In the beginning") == ours.encode("In the beginning")
    name, payload = ours.stored_file()  # what a token store keeps
    stored = Tokenizer.from_stored_file(name, payload, "store")
    assert (stored.bos_id, stored.eos_id) == (50256, 50256)
    files = ours.save_hf_files(tmp_path)  # what export writes next to the model
    assert "tokenizer.json" in files
    reopened = open_tokenizer(tmp_path)
    assert reopened.encode("And God said") == ours.encode("And God said") and reopened.eos_id == 50256


def test_transformers_reads_the_exported_tokenizer(ours, tmp_path):
    from transformers import AutoTokenizer

    ours.save_hf_files(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Let there be light: and there was light."
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert hf.eos_token_id == 50256

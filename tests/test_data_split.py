"""Held-out data for evaluation: whole documents, or, for a source with too few documents (a
single text file), the tail of each document's tokens; decided when the pipeline is built."""
import logging
import math

import numpy as np
import pytest
import sentencepiece as spm

from elmjax.config import ConfigError, base_config, validate
from elmjax.data import pipeline
from elmjax.data.corpus import embedded_documents
from elmjax.data.sentencepiece_training import embedded_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer(1024, ("kjv", "shakespeare"))


@pytest.fixture(scope="module")
def oracle(tokenizer):
    return spm.SentencePieceProcessor(model_file=tokenizer.name)


def one_file_config(path, tokenizer, **data):
    config = base_config()
    config.model.vocab_size, config.model.max_seq_len = 1024, 256
    config.train.seq_len, config.train.batch_size = SEQ, 2
    config.data.source, config.data.tokenizer = str(path), tokenizer.name
    for name, value in data.items():
        config.data[name] = value
    return validate(config)


def split_tokens(config, split, process_index=0, process_count=1):
    rows = pipeline.build_rows(
        config, split, process_index=process_index, process_count=process_count, num_epochs=1
    )
    return np.concatenate([r["tokens"][r["tokens_segment_ids"] > 0] for r in rows] or [np.zeros(0, np.int32)])


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_single_file_holds_out_the_tail_of_its_tokens(tmp_path, tokenizer, oracle, caplog, encoding):
    text = embedded_documents("kjv")[0][1] + "\n\nThe caf\xe9 at the end."  # latin-1: one bad byte
    path = tmp_path / "book.txt"
    path.write_bytes(text.encode(encoding))
    config = one_file_config(path, tokenizer, eval_fraction=0.01)
    with caplog.at_level(logging.WARNING, logger="elmjax.data"):
        train = split_tokens(config, "train")
    assert "too few to hold out whole documents" in caplog.text  # said at start, by the train pipeline
    held_out = split_tokens(config, "eval")
    decoded = text if encoding == "utf-8" else text.replace("\xe9", "\ufffd")
    document = [1, *oracle.encode(decoded), 2]
    assert len(held_out) == math.ceil(0.01 * len(document)) > 0
    np.testing.assert_array_equal(np.concatenate([train, held_out]), document)
    # the same again: deterministic
    np.testing.assert_array_equal(split_tokens(config, "eval"), held_out)


def test_a_single_file_run_gets_eval_batches(tmp_path, tokenizer):
    (tmp_path / "one.txt").write_text(" ".join(t for _, t in embedded_documents("kjv")[:3]))
    config = one_file_config(tmp_path / "one.txt", tokenizer)  # default eval_fraction 0.01
    config.eval.every_steps = 1
    train = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    next(train)
    batches = list(pipeline.make_eval_iterator(config, process_index=0, process_count=1))
    assert batches and sum(float(b["loss_mask"].sum()) for b in batches) > 0


def test_sources_with_enough_documents_still_hold_out_whole_documents(tmp_path, tokenizer, oracle):
    texts = [f"Document number {i} says something." for i in range(20)]
    (tmp_path / "lines.txt").write_text("\n".join(texts))
    config = one_file_config(tmp_path / "lines.txt", tokenizer, text_unit="line", eval_fraction=0.1)
    held_out = split_tokens(config, "eval")
    documents = {(1, *oracle.encode(t), 2) for t in texts}
    pieces = np.split(held_out, np.flatnonzero(held_out == 1)[1:])
    assert pieces and all(tuple(piece) in documents for piece in pieces)


def test_eval_without_held_out_data_fails_when_the_train_pipeline_is_built(tmp_path, tokenizer):
    (tmp_path / "lines.txt").write_text("\n".join(f"line {i}" for i in range(10)))
    config = one_file_config(tmp_path / "lines.txt", tokenizer, text_unit="line", eval_fraction=0.0)
    pipeline.make_train_iterator(config, process_index=0, process_count=1)  # no evaluation: fine
    config.eval.every_steps = 100
    with pytest.raises(ConfigError) as error:
        pipeline.make_train_iterator(config, process_index=0, process_count=1)
    assert error.value.field == "data.eval_fraction" and "eval.every_steps=100" in str(error.value)


def test_one_document_for_two_processes_fails_at_start(tmp_path, tokenizer):
    (tmp_path / "one.txt").write_text("just one document")
    config = one_file_config(tmp_path / "one.txt", tokenizer)
    with pytest.raises(ConfigError, match="has 1 train documents, fewer than the 2 processes"):
        pipeline.make_train_iterator(config, process_index=0, process_count=2)

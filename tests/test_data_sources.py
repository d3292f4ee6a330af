"""File sources and bad input: fail at start with the path, repair and count, never lose."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elmjax.config import ConfigError, base_config
from elmjax.data import pipeline
from elmjax.data.sources import JsonlSource, ParquetSource, TextSource, open_source, parse_source_list
from elmjax.data.token_store import TokenStoreSource, read_meta



def data_config(source, **fields):
    data = base_config().data
    data.source = source
    for name, value in fields.items():
        data[name] = value
    return data


def test_formats_are_inferred_from_extensions_and_embedded_names():
    specs = parse_source_list(data_config("a/*.jsonl, b.parquet,c/*.txt,embedded:kjv,/stores/s1,seqio:c4"))
    assert [s.kind for s in specs] == ["jsonl", "parquet", "text", "embedded", "token_store", "seqio"]
    assert specs[3].corpora == ("kjv",)


def test_unknown_extension_asks_for_data_format():
    with pytest.raises(ValueError, match="data.format"):
        parse_source_list(data_config("corpus.xyz"))


def test_unknown_embedded_corpus_is_rejected():
    with pytest.raises(ValueError, match="unknown embedded corpus 'homer'"):
        parse_source_list(data_config("embedded:homer"))


def test_missing_file_fails_at_start_with_the_path(tmp_path):
    missing = str(tmp_path / "absent.jsonl")
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        JsonlSource(missing, "text")


def test_empty_glob_fails_at_start_with_the_pattern(tmp_path):
    pattern = str(tmp_path / "shards-*.txt")
    with pytest.raises(FileNotFoundError, match="shards-\\*.txt"):
        TextSource(pattern)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good line\nbad \xff\xfe bytes\nstill \xc3 fine?\n")
    source = TextSource(str(tmp_path / "a.txt"), unit="line")
    assert len(source) == 3
    assert source[1] == "bad \ufffd\ufffd bytes"
    assert source.stats.undecodable_documents == 2
    assert source.stats.replaced_bytes == 3


def test_empty_documents_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n   \ntwo\n")
    (tmp_path / "b.txt").write_text("")
    lines = TextSource(str(tmp_path / "a.txt"), unit="line")
    assert [lines[i] for i in range(len(lines))] == ["one", "two"]
    assert lines.stats.empty_skipped == 2
    files = TextSource(str(tmp_path / "*.txt"), unit="file")
    assert len(files) == 1 and files.stats.empty_skipped == 1


def test_jsonl_reads_the_named_field_and_counts_records_without_it(tmp_path):
    records = [{"text": "alpha"}, {"body": "no text field"}, {"text": ""}, {"text": "beta"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    source = JsonlSource(str(tmp_path / "d.jsonl"), "text")
    assert [source[i] for i in range(len(source))] == ["alpha", "beta"]
    assert source.stats.missing_field == 1 and source.stats.empty_skipped == 2


def test_parquet_reads_the_named_column_across_row_groups(tmp_path):
    table = pa.table({"text": ["first", None, "second", "  ", "third"], "id": [1, 2, 3, 4, 5]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)
    source = ParquetSource(str(tmp_path / "*.parquet"), "text")
    assert [source[i] for i in range(len(source))] == ["first", "second", "third"]
    assert source.stats.empty_skipped == 2
    with pytest.raises(ValueError, match="no column 'body'"):
        ParquetSource(str(tmp_path / "p.parquet"), "body")


def test_long_documents_are_split_over_rows_not_truncated(tmp_path):
    from elmjax.config import validate

    config = base_config()
    config.model.vocab_size = 4096
    config.train.seq_len, config.train.batch_size = 16, 2
    long_text = " ".join(f"w{i}" for i in range(200))
    (tmp_path / "long.txt").write_text(long_text)
    config.data.source = str(tmp_path / "long.txt")
    config.data.eval_fraction = 0.0
    from elmjax.data.sentencepiece_training import embedded_tokenizer

    tokenizer = embedded_tokenizer(1024, ("kjv", "shakespeare"))
    config.data.tokenizer = tokenizer.name
    rows = list(pipeline.build_rows(validate(config), "train", process_index=0, process_count=1, num_epochs=1))
    expected = [1, *tokenizer.encode(long_text), 2]
    assert len(rows) == -(-len(expected) // 17) > 5
    np.testing.assert_array_equal(np.concatenate([r["tokens"] for r in rows])[: len(expected)], expected)


def test_prepare_data_writes_a_token_store_with_counts(tmp_path):
    from tools.prepare_data import main

    (tmp_path / "in.jsonl").write_text('{"text": "To be, or not to be"}\n{"text": ""}\n{"text": "that is"}\n')
    tok = tmp_path / "tok.model"
    from tools.train_tokenizer import main as train

    assert train(["--source=embedded:kjv", "--vocab_size=400", "--max_documents=30", f"--output={tok}"]) == 0
    store = f"file://{tmp_path}/store"
    assert main([f"--source={tmp_path / 'in.jsonl'}", f"--tokenizer={tok}", f"--output={store}"]) == 0
    meta = read_meta(store)
    assert meta["documents"] == 2 and meta["input_stats"]["empty_skipped"] == 1
    source = TokenStoreSource(store)
    from elmjax.data.tokenizer import open_tokenizer

    assert open_tokenizer(tok).decode(source[0]) == "To be, or not to be"
    # an existing store is not overwritten by accident
    assert main([f"--source={tmp_path / 'in.jsonl'}", f"--tokenizer={tok}", f"--output={store}"]) == 2


def test_a_directory_that_is_not_a_token_store_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished token store"):
        open_source(parse_source_list(data_config(str(tmp_path)))[0], data_config(str(tmp_path)))


def test_seqio_source_without_seqio_installed_says_how_to_install():
    try:
        import seqio  # noqa: F401

        pytest.skip("seqio is installed; the missing-extra error cannot be shown")
    except ImportError:
        pass
    spec = parse_source_list(data_config("seqio:c4_v220_span_corruption"))[0]
    with pytest.raises(ImportError, match=r"elmjax\[seqio\]"):
        open_source(spec, data_config("seqio:x"))


def test_remote_globs_go_through_fsspec():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/elmjax_remote/a.jsonl", b'{"text": "one"}\n{"text": "two"}\n')
    fs.pipe("/elmjax_remote/b.jsonl", b'{"text": "three"}\n')
    source = JsonlSource("memory://elmjax_remote/*.jsonl", "text")
    assert [source[i] for i in range(len(source))] == ["one", "two", "three"]


def test_malformed_jsonl_fails_at_start_with_path_and_offset(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: the record at byte 15 is not valid JSON"):
        JsonlSource(str(tmp_path / "bad.jsonl"), "text")


def test_split_long_documents_are_counted_and_logged(tmp_path, caplog):
    import logging

    from elmjax.config import validate
    from elmjax.data.sentencepiece_training import embedded_tokenizer

    (tmp_path / "d.txt").write_text("short\n" + " ".join(["long"] * 100) + "\nshort again\n")
    config = base_config()
    config.model.vocab_size = 4096
    config.train.seq_len, config.train.batch_size = 16, 2
    config.data.source, config.data.text_unit, config.data.eval_fraction = str(tmp_path / "d.txt"), "line", 0.0
    config.data.tokenizer = embedded_tokenizer(1024, ("kjv", "shakespeare")).name
    with caplog.at_level(logging.INFO, logger="elmjax.data"):
        list(pipeline.build_rows(validate(config), "train", process_index=0, process_count=1, num_epochs=1))
    assert "1 of " in caplog.text and "longer than a row of 17 tokens" in caplog.text


def test_an_empty_text_source_fails_at_start_saying_why(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    for unit, pattern, empty in (("file", "empty.txt", 1), ("file", "*.txt", 2), ("line", "*.txt", 3)):
        with pytest.raises(ConfigError) as error:
            TextSource(str(tmp_path / pattern), unit=unit)
        assert error.value.field == "data.source"
        assert f"{pattern}' has no documents ({empty} empty or whitespace-only)" in str(error.value)


def test_a_jsonl_source_whose_records_lack_the_field_fails_at_start_saying_why(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n{"text": " "}\n{"body": "c"}\n')
    with pytest.raises(ConfigError, match=r"d.jsonl' has no documents \(1 empty or whitespace-only, "
                                          r"3 missing the field 'text'\)"):
        JsonlSource(str(tmp_path / "d.jsonl"), "text")


def test_an_empty_source_in_the_pipeline_is_a_clear_error_not_a_type_error(tmp_path):
    from elmjax.config import validate

    (tmp_path / "empty.txt").write_text("")
    config = base_config()
    config.data.source, config.data.tokenizer = str(tmp_path / "empty.txt"), "unused.model"
    with pytest.raises(ConfigError, match="has no documents"):
        pipeline.build_rows(validate(config), "train", process_index=0, process_count=1, num_epochs=1,
                            tokenizer=_FakeTokenizer())


def test_an_empty_parquet_column_fails_at_start(tmp_path):
    pq.write_table(pa.table({"text": [None, "  "]}), tmp_path / "p.parquet")
    with pytest.raises(ConfigError, match=r"p.parquet' has no documents \(2 empty or whitespace-only"):
        ParquetSource(str(tmp_path / "p.parquet"), "text")


class _FakeTokenizer:
    vocab_size, bos_id, eos_id, pad_id, fingerprint = 10, 1, 2, 0, "fake"

    def encode(self, text):
        return [3] * len(text.split())


def binary_bytes(size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("unit", ["file", "line"])
def test_a_binary_file_given_as_text_is_refused_naming_the_file(tmp_path, unit):
    from elmjax.data.sources import MAX_REPLACED_FRACTION

    (tmp_path / "a.txt").write_text("a good text file\n" * 50)
    (tmp_path / "model.bin.txt").write_bytes(binary_bytes(20_000))
    with pytest.raises(ConfigError) as error:
        TextSource(str(tmp_path / "*.txt"), unit=unit)
    assert error.value.field == "data.source"
    message = str(error.value)
    assert f"{tmp_path / 'model.bin.txt'}: " in message and "not UTF-8" in message
    assert "binary file" in message and f"{MAX_REPLACED_FRACTION:.0%}" == "1%"


def test_a_binary_jsonl_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n' + binary_bytes(5_000, seed=1))
    with pytest.raises(ConfigError, match=r"d.jsonl: \d[\d,]* of [\d,]+ characters \(\d+\.\d%\) are"):
        JsonlSource(str(tmp_path / "d.jsonl"), "text")


def test_a_few_undecodable_bytes_are_still_repaired_with_a_warning(tmp_path, caplog):
    import logging

    # 20 bad bytes in 4,000 characters: 0.5%, under the refusal threshold
    lines = [f"line {i} of plain text " + ("caf\xe9" if i % 10 == 0 else "cafe") for i in range(200)]
    (tmp_path / "latin1.txt").write_bytes("\n".join(lines).encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="elmjax.data"):
        source = TextSource(str(tmp_path / "latin1.txt"), unit="file")
    assert source.stats.replaced_bytes == 20 and len(source) == 1
    assert "skipped/repaired documents" in caplog.text

"""Document sources: random-access lists of documents (text, or tokens for a token store).

`config.data.source` is a comma-separated list; each entry is
  - `embedded` (both embedded corpora), `embedded:shakespeare` or `embedded:kjv`;
    `embedded:chat` (conversations, with `data.chat_template`: elmjax/data/chat.py);
  - `seqio:<registered Task or Mixture>` (optional extra, see elmjax/data/seqio.py);
  - a path or glob, local or remote (`gs://...`, via fsspec): text, JSONL (field
    `data.text_field`) or Parquet (column `data.text_field`) files, or a token store
    directory written by tools/prepare_data.py. `data.format = "auto"` picks the format
    from the extension (.txt/.md, .jsonl/.json, .parquet; a directory is a token store).

Every file source is indexed when opened: a missing file or an empty glob fails at once with
the path; empty documents are left out of the index and undecodable bytes are replaced
(U+FFFD). Both are counted in `source.stats` and logged, never silently dropped. A file
whose characters are more than MAX_REPLACED_FRACTION replacements (a binary file) and a
source left with no document fail at once too (DataSourceError, naming the file/source).
"""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from elmjax.data.base import DataSourceError, DocumentSource, RecordError, SourceStats, logger  # noqa: F401  (re-exported)
from elmjax.data.formats import DATA_FORMATS, source_entries

_EXTENSIONS = {
    ".txt": "text", ".md": "text", ".text": "text",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of `data.source`, resolved."""

    kind: str  # "embedded", "seqio", "text", "jsonl", "parquet", "token_store"
    location: str  # glob/path/name as written
    corpora: tuple[str, ...] = ()  # embedded corpora (kind "embedded")


def parse_source_list(data) -> list[SourceSpec]:
    """`config.data.source` -> one SourceSpec per comma-separated entry."""
    from elmjax.data.corpus import EMBEDDED_CHAT, EMBEDDED_CORPORA

    entries = source_entries(data.source)
    if not entries:
        raise ValueError("config field `data.source`: is empty; give `embedded` or paths/globs")
    specs = []
    for entry in entries:
        if entry == "embedded" or entry.startswith("embedded:"):
            names = EMBEDDED_CORPORA if entry == "embedded" else (entry.split(":", 1)[1],)
            for name in names:
                if name not in EMBEDDED_CORPORA + (EMBEDDED_CHAT,):
                    raise ValueError(
                        f"config field `data.source`: unknown embedded corpus {name!r}; "
                        f"available: {', '.join(EMBEDDED_CORPORA + (EMBEDDED_CHAT,))}"
                    )
            specs.append(SourceSpec("embedded", entry, tuple(names)))
        elif entry.startswith("seqio:"):
            specs.append(SourceSpec("seqio", entry.split(":", 1)[1]))
        else:
            kind = data.format
            if kind == "auto":
                kind = _infer_format(entry)
            specs.append(SourceSpec(kind, entry))
    return specs


def _infer_format(entry: str) -> str:
    stem = entry.rstrip("/").rsplit("/", 1)[-1]
    for extension, kind in _EXTENSIONS.items():
        if stem.endswith(extension) or stem.endswith(extension + "*"):
            return kind
    if "." not in stem and "*" not in stem:
        return "token_store"
    raise ValueError(
        f"config field `data.format`: is 'auto' but the format of {entry!r} cannot be told "
        f"from its extension (known: {', '.join(sorted(_EXTENSIONS))}); set data.format to "
        f"one of {', '.join(DATA_FORMATS[1:])}"
    )


def expand_glob(pattern: str) -> list[str]:
    """Files matching `pattern` (local or remote), sorted; fails with the pattern if none."""
    import fsspec

    from elmjax import storage

    if storage.is_remote(pattern):
        storage.require_gcs(pattern)  # one line naming the extra, not fsspec's ImportError
    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    paths = sorted(p for p in paths if not fs.isdir(p))
    if not paths:
        raise FileNotFoundError(
            f"data source {pattern!r} matches no file; check the path/glob in `data.source`"
        )
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if protocol == "file" else f"{protocol}://{p}" for p in paths]


def _decode(raw: bytes, stats: SourceStats | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        if stats is not None:
            stats.undecodable_documents += 1
            # Strictly decodable text may hold U+FFFD itself; count only what we added.
            original = raw.count("\ufffd".encode())
            stats.replaced_bytes += text.count("\ufffd") - original
        return text


# A file more than this fraction of whose characters are U+FFFD replacements of bytes that
# are not UTF-8 is refused as binary (or as text in another encoding), once it has at least
# MIN_REPLACED_TO_REFUSE of them: a few stray bytes in a short text file are repaired.
MAX_REPLACED_FRACTION = 0.01
MIN_REPLACED_TO_REFUSE = 16


class _DecodeCheck:
    """Decodes one file's records, counting its characters and replacements, and refuses
    the file when too many of its bytes are not UTF-8."""

    def __init__(self, path: str, stats: SourceStats):
        self.path, self.stats = path, stats
        self.replaced_before = stats.replaced_bytes
        self.characters = 0

    def decode(self, raw: bytes) -> str:
        text = _decode(raw, self.stats)
        self.characters += len(text)
        return text

    def refuse_if_binary(self) -> None:
        replaced = self.stats.replaced_bytes - self.replaced_before
        if replaced >= MIN_REPLACED_TO_REFUSE and replaced > MAX_REPLACED_FRACTION * self.characters:
            raise DataSourceError(
                f"{self.path}: {replaced:,} of {self.characters:,} characters "
                f"({replaced / self.characters:.1%}) are replacements of bytes that are not UTF-8, "
                f"more than the {MAX_REPLACED_FRACTION:.0%} a text file may have; it looks like a "
                "binary file or text in another encoding: remove it from data.source or convert "
                "it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
            )


def _open(path: str):
    import fsspec

    return fsspec.open(path, "rb").open()


class EmbeddedSource(DocumentSource):
    """The embedded public-domain corpora (elmjax/data/corpus.py), in memory."""

    def __init__(self, corpora):
        from elmjax.data.corpus import embedded_documents

        self.name = "embedded:" + "+".join(corpora)
        self._docs = [doc for name in corpora for doc in embedded_documents(name)]
        self.stats = SourceStats(documents=len(self._docs))

    def __len__(self):
        return len(self._docs)

    def __getitem__(self, index):
        return self._docs[index][1]

    def key(self, index):
        return self._docs[index][0]


class _OffsetIndexedSource(DocumentSource):
    """Documents = byte ranges of files (one per file, or one per line / JSONL record)."""

    field_setting = "data.text_field"  # the config field naming `field`, for error messages

    def __init__(self, pattern: str, per_line: bool, field: str | None = None):
        self.name = pattern
        self._paths = expand_glob(pattern)
        self._field = field
        self.stats = SourceStats()
        files, starts, ends = [], [], []
        for file_index, path in enumerate(self._paths):
            check = _DecodeCheck(path, self.stats)
            for start, raw in _records(path, per_line):
                text = check.decode(raw)
                try:
                    document = self._document(text, self.stats)
                except json.JSONDecodeError as error:
                    check.refuse_if_binary()  # binary bytes are the likelier cause
                    raise ValueError(
                        f"{path}: the record at byte {start} is not valid JSON ({error.msg}); "
                        "JSONL needs one JSON object per line"
                    ) from None
                except RecordError as error:
                    raise DataSourceError(f"{path}: the record at byte {start} {error}") from None
                if document is not None:
                    files.append(file_index), starts.append(start), ends.append(start + len(raw))
            check.refuse_if_binary()
        self._file = np.asarray(files, np.int32)
        self._start = np.asarray(starts, np.int64)
        self._end = np.asarray(ends, np.int64)
        self.stats.documents = len(self._file)
        self.log_stats()
        self.require_documents(field, self.field_setting)

    def _field_value(self, text: str, stats: SourceStats | None):
        """The value of the record's field in a line's decoded text, or None for a blank line
        or a record without the field (each counted)."""
        record = json.loads(text) if text.strip() else {}
        if not isinstance(record, dict):
            raise json.JSONDecodeError("not a JSON object", text, 0)
        if self._field not in record:
            if stats is not None:
                if text.strip():
                    stats.missing_field += 1
                else:
                    stats.empty_skipped += 1
            return None
        return record[self._field]

    def _document(self, text: str, stats: SourceStats | None) -> str | None:
        """The document in a record's decoded text, or None when it is empty (counted)."""
        if self._field is not None:
            value = self._field_value(text, stats)
            if value is None:
                return None
            text = str(value)
        if not text.strip():
            if stats is not None:
                stats.empty_skipped += 1
            return None
        return text

    def __len__(self):
        return len(self._file)

    def __getitem__(self, index):
        start, end = int(self._start[index]), int(self._end[index])
        with _open(self._paths[self._file[index]]) as f:
            f.seek(start)
            raw = f.read(end - start)
        return self._document(_decode(raw, None), None) or ""

    def key(self, index):
        return f"{self._paths[self._file[index]]}@{self._start[index]}"


def _records(path: str, per_line: bool):
    """(byte offset, bytes) of each line of a file (streamed), or of the whole file."""
    with _open(path) as f:
        if not per_line:
            yield 0, f.read()
            return
        offset = 0
        for line in f:
            yield offset, line.rstrip(b"\n")
            offset += len(line)


class TextSource(_OffsetIndexedSource):
    """Text files: a document per file (`data.text_unit="file"`) or per line."""

    def __init__(self, pattern: str, unit: str = "file"):
        super().__init__(pattern, per_line=(unit == "line"))


class JsonlSource(_OffsetIndexedSource):
    """JSON-lines files; each record's `field` is a document."""

    def __init__(self, pattern: str, field: str):
        super().__init__(pattern, per_line=True, field=field)


class ParquetSource(DocumentSource):
    """Parquet files; each row's `column` is a document."""

    def __init__(self, pattern: str, column: str):
        import pyarrow.parquet as pq

        self.name = pattern
        self._paths = expand_glob(pattern)
        self._column = column
        self.stats = SourceStats()
        rows = []  # (file, row group, row)
        for file_index, path in enumerate(self._paths):
            check = _DecodeCheck(path, self.stats)
            with _open(path) as f:
                parquet = pq.ParquetFile(f)
                if column not in parquet.schema_arrow.names:
                    raise ValueError(
                        f"config field `data.text_field`: Parquet file {path!r} has no column "
                        f"{column!r}; its columns are {parquet.schema_arrow.names}"
                    )
                for group in range(parquet.num_row_groups):
                    values = parquet.read_row_group(group, columns=[column]).column(0)
                    for row, value in enumerate(values.to_pylist()):
                        if isinstance(value, bytes):
                            value = check.decode(value)
                        if self._as_text(value, self.stats) is not None:
                            rows.append((file_index, group, row))
            check.refuse_if_binary()
        self._rows = np.asarray(rows, np.int64).reshape(-1, 3)
        self.stats.documents = len(self._rows)
        self.log_stats()
        self.require_documents(column)

    @staticmethod
    def _as_text(value, stats: SourceStats | None) -> str | None:
        text = _decode(value, stats) if isinstance(value, bytes) else ("" if value is None else str(value))
        if not text.strip():
            if stats is not None:
                stats.empty_skipped += 1
            return None
        return text

    @functools.lru_cache(maxsize=4)
    def _row_group(self, file_index: int, group: int) -> list:
        import pyarrow.parquet as pq

        with _open(self._paths[file_index]) as f:
            return pq.ParquetFile(f).read_row_group(group, columns=[self._column]).column(0).to_pylist()

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, index):
        file_index, group, row = (int(v) for v in self._rows[index])
        return self._as_text(self._row_group(file_index, group)[row], None) or ""

    def key(self, index):
        file_index, group, row = (int(v) for v in self._rows[index])
        return f"{self._paths[file_index]}@{group}:{row}"


def open_source(spec: SourceSpec, data) -> DocumentSource:
    """The DocumentSource for one `data.source` entry."""
    if spec.kind == "embedded":
        return EmbeddedSource(spec.corpora)
    if spec.kind == "text":
        return TextSource(spec.location, data.text_unit)
    if spec.kind == "jsonl":
        return JsonlSource(spec.location, data.text_field)
    if spec.kind == "parquet":
        return ParquetSource(spec.location, data.text_field)
    # Imported here so that reading text files needs neither tensorstore nor grain.
    if spec.kind == "token_store":
        from elmjax.data.token_store import TokenStoreSource

        return TokenStoreSource(spec.location)
    if spec.kind == "seqio":
        from elmjax.data.seqio import SeqioSource

        return SeqioSource(spec.location, seed=data.seed)
    raise ValueError(f"config field `data.format`: is {spec.kind!r}; allowed: {', '.join(DATA_FORMATS)}")

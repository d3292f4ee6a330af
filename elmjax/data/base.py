"""The document-source interface every source implements, and the data package's logger.

The modules that provide sources (sources.py for files and the embedded corpus,
token_store.py, seqio.py) import this module; sources.py may import the others, never the
reverse, so the data package's imports form no cycle (tests/test_data_import_graph.py).
"""
from __future__ import annotations

import abc
import dataclasses
import logging

from elmjax.validation import ConfigError

logger = logging.getLogger("elmjax.data")


class DataSourceError(ConfigError):
    """A data source that cannot be used as it is (no documents, a binary file, too few
    documents for the processes). A ConfigError naming `data.source` (a ValueError), so the
    command-line tools print it as one line."""

    def __init__(self, message: str, field: str = "data.source"):
        super().__init__(field, message)


class RecordError(ValueError):
    """A record that parses but is not a usable document (its text completes "the record at
    byte N ..."); file sources turn it into a DataSourceError naming the file."""


@dataclasses.dataclass
class SourceStats:
    """What a source held, and what was skipped or repaired while indexing it."""

    documents: int = 0  # documents in the index (non-empty)
    empty_skipped: int = 0  # empty / whitespace-only documents left out
    undecodable_documents: int = 0  # documents with bytes that are not UTF-8
    replaced_bytes: int = 0  # U+FFFD characters written in place of undecodable bytes
    missing_field: int = 0  # JSONL records without data.text_field (skipped)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class DocumentSource(abc.ABC):
    """A random-access list of documents. Subclasses set `name`, `stats`, `tokenized`."""

    name: str
    stats: SourceStats
    tokenized = False  # True: documents are int token arrays (no BOS/EOS)

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of documents."""

    @abc.abstractmethod
    def __getitem__(self, index: int):
        """Document `index`: a str, or an int token array when `tokenized`."""

    def key(self, index: int) -> str:
        """A stable name of document `index` (decides its train/eval split)."""
        return f"{self.name}#{index}"

    def require_documents(self, field: str | None = None, setting: str = "data.text_field") -> None:
        """Fails, saying why, when indexing left no document (`field`: the JSONL field or
        Parquet column the documents come from; `setting`: the config field that names it)."""
        if self.stats.documents:
            return
        reasons = [f"{self.stats.empty_skipped} empty or whitespace-only"]
        if field is not None:
            reasons.append(f"{self.stats.missing_field} missing the field {field!r}")
        hint = "check the files in data.source" + (f" and {setting}" if field is not None else "")
        raise DataSourceError(f"data source {self.name!r} has no documents ({', '.join(reasons)}); {hint}")

    def log_stats(self) -> None:
        logger.info("data source %s: %s", self.name, self.stats.as_dict())
        if self.stats.empty_skipped or self.stats.undecodable_documents or self.stats.missing_field:
            logger.warning("data source %s skipped/repaired documents: %s", self.name, self.stats.as_dict())

"""The training and evaluation input pipelines, on grain's dataset API.

Per source:  documents (split train/eval by a hash of each document's key; a source with
     too few documents, e.g. one text file, splits each document's tokens instead, the tail
     for eval: elmjax/data/split.py)
  -> this JAX process's shard (`ds[process_index::process_count]`)
  -> shuffle documents with the seed, a new order each epoch, repeat forever (train only)
  -> tokenise (or read the token store), add BOS/EOS per document (and, under a token
     split, keep this split's part of the document's tokens)
  -> pack into rows of seq_len + 1 tokens with grain's ConcatThenSplit packing: documents
     are concatenated and cut at row boundaries, so a long document is split over rows and
     no token is dropped; each row carries segment ids (1.. per document piece) and positions.
     The piece of a split document that starts a row restarts its positions at 0: RoPE and
     ALiBi see only relative positions within a segment, so attention is unchanged.
With `data.chat_template` set, documents are conversations (elmjax/data/chat.py): each is
rendered with the template and carries a per-token target weight (1 on assistant tokens),
packed next to the tokens as a second feature, so the batch's loss_mask covers only the
assistant's tokens.
Then sources are mixed by weight (rows, i.e. tokens, in proportion), batched, turned into the
model's inputs/targets, and optionally prefetched by worker processes.

The iterators are grain DatasetIterators: `get_state()` is a small dict (document indices and
packing offsets, no data) and `set_state()` resumes exactly; the training loop saves it with
`grain.checkpoint.CheckpointSave`. Determinism holds for a fixed seed, process count and
`data.num_workers` (worker processes each pack their own slice of the documents).
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from elmjax.validation import ConfigError
from elmjax.data import chat as chat_lib
from elmjax.data import sources as sources_lib
from elmjax.data.base import DataSourceError, logger
from elmjax.data.formats import chat_header, parse_mixture_weights
from elmjax.data.split import is_eval_document, plan_split, split_indices, token_part  # noqa: F401
from elmjax.data.tokenizer import Tokenizer
from elmjax.data.tokenizer_choice import load_tokenizer

ROW_FEATURE = "tokens"


def mixture_weights(data, num_sources: int) -> list[float]:
    """`data.mixture_weights` parsed: one positive weight per source (empty = equal)."""
    try:
        return parse_mixture_weights(data.mixture_weights, num_sources)
    except ValueError as error:
        raise ConfigError("data.mixture_weights", str(error)) from None


@dataclasses.dataclass
class _Documents:
    """grain random-access source: the documents of one split of one source."""

    source: sources_lib.DocumentSource
    indices: np.ndarray

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.source[int(self.indices[index])]


@dataclasses.dataclass
class _ToTokens:
    """Document (text or token array) -> {"tokens": int32 [n]} with BOS/EOS as configured."""

    tokenizer: Tokenizer | None
    bos_id: int | None
    eos_id: int | None
    row_length: int
    source_name: str
    split: str = "train"
    token_split_fraction: float = 0.0  # > 0: keep only this split's part of each document
    # Counts in this process (each worker process counts its own share).
    documents: int = 0
    split_documents: int = 0

    def __call__(self, document):
        if isinstance(document, str):
            ids = self.tokenizer.encode_array(document)  # in bounded pieces when long
        else:
            ids = document
        self.documents += 1
        if len(ids) + (self.bos_id is not None) + (self.eos_id is not None) > self.row_length:
            self.split_documents += 1
            if self.split_documents & (self.split_documents - 1) == 0:  # 1, 2, 4, 8, ...
                logger.info(
                    "%s: %d of %d documents read so far are longer than a row of %d tokens "
                    "(split over rows, not truncated)",
                    self.source_name, self.split_documents, self.documents, self.row_length,
                )
        prefix = [self.bos_id] if self.bos_id is not None else []
        suffix = [self.eos_id] if self.eos_id is not None else []
        tokens = np.concatenate(
            [np.asarray(prefix, np.int32), np.asarray(ids, np.int32), np.asarray(suffix, np.int32)]
        )
        if self.token_split_fraction > 0:
            tokens = token_part(tokens, self.token_split_fraction, self.split)
        return {ROW_FEATURE: tokens}


@dataclasses.dataclass
class _ToModelInputs:
    """Packed rows [batch, seq+1] -> the CONTRACTS.md dict of [batch, seq] arrays."""

    pad_id: int
    batch_size: int  # rows in a full batch; a short final eval batch is padded to it

    def __call__(self, rows):
        tokens = rows[ROW_FEATURE]
        segments = rows[f"{ROW_FEATURE}_segment_ids"]
        positions = rows[f"{ROW_FEATURE}_positions"]
        # Chat rows carry each token's weight as a target; other rows train on every token.
        weights = rows.get(chat_lib.WEIGHT_FEATURE, np.ones_like(tokens))
        missing = self.batch_size - tokens.shape[0]
        if missing > 0:  # padding rows: segment 0, masked out of the loss
            pad = lambda a: np.concatenate([a, np.zeros((missing, a.shape[1]), a.dtype)])
            tokens, segments, positions, weights = pad(tokens), pad(segments), pad(positions), pad(weights)
        tokens = np.where(segments > 0, tokens, self.pad_id).astype(np.int32)
        same_document = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": segments[:, :-1].astype(np.int32),
            "positions": positions[:, :-1].astype(np.int32),
            "loss_mask": (same_document & (weights[:, 1:] > 0)).astype(np.float32),
        }


def _process_shard(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def local_batch_size(config, process_count: int) -> int:
    batch = config.train.batch_size
    if batch % process_count:
        raise ValueError(
            f"config field `train.batch_size`: {batch} is not divisible by the "
            f"{process_count} JAX processes; each process loads batch_size // process_count rows"
        )
    return batch // process_count


def pad_id_for(config, tokenizer: Tokenizer | None) -> int:
    if config.data.pad_id >= 0:
        return config.data.pad_id
    return tokenizer.pad_id if tokenizer is not None else 0


def _special_ids(config, tokenizer, source) -> tuple[int | None, int | None]:
    """BOS/EOS ids to add per document (token stores record their tokenizer's ids)."""
    ids = getattr(source, "special_ids", None) or (tokenizer.bos_id, tokenizer.eos_id)
    bos, eos = ids
    for field, wanted, value in (("add_bos", config.data.add_bos, bos), ("add_eos", config.data.add_eos, eos)):
        if wanted and (value is None or value < 0):
            raise ValueError(
                f"config field `data.{field}`: is True but the tokenizer has no such token; "
                f"set data.{field}=False"
            )
    return (bos if config.data.add_bos else None), (eos if config.data.add_eos else None)


def build_rows(
    config,
    split: str,
    *,
    process_index: int,
    process_count: int,
    num_epochs: int | None,
    tokenizer: Tokenizer | None = None,
    opened: list | None = None,
) -> grain.IterDataset:
    """The stream of packed rows {"tokens", "tokens_segment_ids", "tokens_positions"}, each
    [seq_len + 1], before batching. `num_epochs=None` repeats forever (shuffled anew each
    epoch) and mixes sources by `data.mixture_weights`; a finite pass (`num_epochs` set)
    reads every file/store source's documents once, one source after another (a weighted
    mix would stop at the first exhausted source). `opened` collects the opened sources (their
    `.stats`)."""
    streams, weights = build_row_streams(
        config, split, process_index=process_index, process_count=process_count,
        num_epochs=num_epochs, tokenizer=tokenizer, opened=opened,
    )
    if len(streams) == 1:
        return streams[0]
    return grain.IterDataset.mix(streams, weights)


def build_row_streams(
    config,
    split: str,
    *,
    process_index: int,
    process_count: int,
    num_epochs: int | None,
    tokenizer: Tokenizer | None = None,
    opened: list | None = None,
) -> tuple[list[grain.IterDataset], list[float]]:
    """The packed row stream of each source (what `build_rows` mixes, in its order) and the
    mixture weights. A stage boundary re-packs each stream on its own (data/repack.py)."""
    data = config.data
    specs = sources_lib.parse_source_list(data)
    weights = mixture_weights(data, len(specs))
    tokenizer = tokenizer or load_tokenizer(config)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"config field `model.vocab_size`: is {config.model.vocab_size} but the tokenizer "
            f"has {tokenizer.vocab_size} tokens; raise model.vocab_size to at least that"
        )
    row_length = config.train.seq_len + 1
    header = chat_header(data.chat_template) if data.chat_template else None
    features = (ROW_FEATURE,) + ((chat_lib.WEIGHT_FEATURE,) if header else ())
    pack = lambda docs: ConcatThenSplitIterDataset(docs, length_struct={f: row_length for f in features})
    finite = num_epochs is not None
    streams, document_lists = [], []
    for number, spec in enumerate(specs):
        if header:
            source = chat_lib.open_chat_source(spec, data)
        elif spec.kind == "embedded" and chat_lib.EMBEDDED_CHAT in spec.corpora:
            raise ConfigError("data.chat_template", "is empty, but data.source reads embedded:chat "
                              "(conversations); set data.chat_template=openelm")
        else:
            source = sources_lib.open_source(spec, data)
        if opened is not None:
            opened.append(source)
        stored_with = getattr(source, "meta", {}).get("tokenizer_fingerprint")
        if stored_with is not None and stored_with != tokenizer.fingerprint:
            raise ValueError(
                f"config field `data.tokenizer`: token store {source.name!r} was written with "
                f"tokenizer {stored_with}, not the run's ({tokenizer.fingerprint}); use the "
                "store's tokenizer (leave data.tokenizer empty) or re-run tools/prepare_data.py"
            )
        bos, eos = _special_ids(config, tokenizer, source)
        if spec.kind == "seqio":
            _check_seqio_vocabulary(config, tokenizer, source)
            to_tokens = _ToTokens(tokenizer, bos, eos, row_length, source.name)
            docs = source.iter_dataset(split, process_index, process_count, num_epochs)
            streams.append(pack(docs.map(to_tokens)))
            continue
        plan = plan_split(source, data.eval_fraction, process_count)
        _check_split(config, source, plan, split, process_count)
        indices = plan.indices(split)
        fraction = plan.eval_fraction if plan.token_split else 0.0
        to_tokens = _ToTokens(tokenizer, bos, eos, row_length, source.name, split, fraction)
        if header:  # each turn ends in EOS already; data.add_eos does not apply
            to_tokens = chat_lib.ChatToTokens(tokenizer, header, bos is not None, split, fraction)
        _log_split(source, split, indices, row_length)
        docs = grain.MapDataset.source(_Documents(source, indices))
        docs = docs[process_index::process_count]
        if split == "train":
            # Seeded per source; repeat() re-seeds every epoch, so each epoch differs.
            docs = docs.shuffle(seed=(data.seed * 1_000_003 + number) % 2**32)
        if num_epochs != 1:
            docs = docs.repeat(num_epochs)
        document_lists.append(docs.map(to_tokens))
    if finite and document_lists:
        document_lists = [grain.MapDataset.concatenate(document_lists)]
    # (A finite pass that includes seqio streams is still a weighted mix; see docstring.)
    streams = [pack(docs.to_iter_dataset()) for docs in document_lists] + streams
    return streams, weights


def _check_seqio_vocabulary(config, tokenizer: Tokenizer, source) -> None:
    """A seqio Task brings its own token ids: they must fit the model's embedding, and be
    those of `data.tokenizer` (which samples and exports decode with); a tokenizer of another
    size is another vocabulary. seqio's `extra_ids` (sentinels) are not in the model file."""
    size = source.vocab_size
    if size > config.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"is {config.model.vocab_size} but {source.name}'s vocabulary has {size} tokens; "
            "raise model.vocab_size to at least that",
        )
    extra = int(getattr(source.vocabulary, "extra_ids", 0) or 0)
    if tokenizer.vocab_size not in (size, size - extra):
        model_file = source.vocabulary_file()
        raise ConfigError(
            "data.tokenizer",
            f"{tokenizer.name!r} has {tokenizer.vocab_size} tokens but {source.name}'s "
            f"vocabulary has {size}; set data.tokenizer to the Task vocabulary's model file"
            + (f" ({model_file})" if model_file else ""),
        )


def _check_split(config, source, plan, split: str, process_count: int) -> None:
    """Each process needs a document of `split`; building the training pipeline also checks
    the eval split when evaluation is on, so a run fails at start, not at its first eval."""
    checks = [split]
    if split == "train" and getattr(config.get("eval", None), "every_steps", 0):
        checks.append("eval")
    for name in checks:
        count = len(plan.indices(name))
        if count >= process_count:
            continue
        if name == "eval" and config.data.eval_fraction <= 0:
            raise DataSourceError(
                f"is 0, so no document is held out, but eval.every_steps="
                f"{config.eval.every_steps} evaluates on held-out data; raise data.eval_fraction "
                "(e.g. 0.01) or set eval.every_steps=0",
                field="data.eval_fraction",
            )
        raise DataSourceError(
            f"data source {source.name!r} has {count} {name} documents, fewer than the "
            f"{process_count} processes reading it; add data (or split it into more files, or "
            "use data.text_unit=line)"
        )


def _log_split(source, split: str, indices: np.ndarray, row_length: int) -> None:
    """One log line per source: documents in the split, skipped/repaired counts, and (for
    token stores, whose lengths are known) how many documents span several rows."""
    message = f"{source.name} [{split}]: {len(indices)} documents; {source.stats.as_dict()}"
    if hasattr(source, "document_lengths"):
        long = int(np.sum(source.document_lengths()[indices] + 2 > row_length))
        message += f"; {long} longer than a row of {row_length} tokens (split over rows)"
    logger.info(message)


def _has_targets(row) -> bool:
    """Whether a packed chat row has a token to learn (a positive weight on tokens 1.., the
    targets). A row cut from inside a long user or system turn has none: it would cost a
    row's compute for nothing, and a batch of such rows would still move the weights
    (AdamW's momentum and decay act on a zero gradient). A filter keeps the packer's state
    as it is, so checkpoints and stage boundaries see the same stream positions."""
    return bool(np.any(row[chat_lib.WEIGHT_FEATURE][1:] > 0))


def _batched(config, split, process_index, process_count, num_epochs, drop_remainder):
    process_index, process_count = _process_shard(process_index, process_count)
    batch = local_batch_size(config, process_count)
    tokenizer = load_tokenizer(config)
    rows = build_rows(
        config,
        split,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        tokenizer=tokenizer,
    )
    if split == "train" and config.data.chat_template:
        rows = rows.filter(_has_targets)
    ds = rows.batch(batch, drop_remainder=drop_remainder)
    ds = ds.map(_ToModelInputs(pad_id_for(config, tokenizer), batch))
    if config.data.num_workers > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.data.num_workers, per_worker_buffer_size=config.data.prefetch
            )
        )
    return ds


def make_train_iterator(config, *, process_index=None, process_count=None):
    """Endless iterator of this process's share of each step's batch (CONTRACTS.md format):
    inputs/targets/segment_ids/positions int32 and loss_mask float32, all [local_batch, seq]."""
    return iter(_batched(config, "train", process_index, process_count, None, True))


def make_eval_iterator(config, *, process_index=None, process_count=None):
    """One deterministic pass over the held-out documents, same format; the last batch is
    padded with rows whose loss_mask is 0."""
    return iter(_batched(config, "eval", process_index, process_count, 1, False))

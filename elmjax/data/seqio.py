"""A registered seqio Task or Mixture as a data source (optional extra `elmjax[seqio]`).

`data.source = "seqio:<name>"` reads the Task/Mixture's "targets" feature (token ids from the
Task's own vocabulary) from its "train" split, or its "validation" split for evaluation.
The module that registers the Task must be imported before the pipeline is built (e.g. from
the training config file). `data.tokenizer` must name the same vocabulary's model file (the
model and the samples decode with it); the pipeline checks the vocabulary's size against it
and against `model.vocab_size`.

Each document is the "targets" ids as the Task yields them; the pipeline adds BOS/EOS as
`data.add_bos`/`data.add_eos` say, with the vocabulary's ids (a Task whose preprocessors
already append EOS wants `data.add_eos=False`). Training reads the split shuffled with
`data.seed` (seqio's own shuffle, when the Task allows one) and repeats it forever;
evaluation reads the validation split once, in order. Each JAX process reads its shard
(seqio's ShardInfo), and each grain worker process (`data.num_workers > 0`) a finer one;
tf.data already preprocesses on its own threads, so workers mostly add copies of TensorFlow.

seqio (with TensorFlow, ~3 GB) is imported only here, and only when such a source is used.
Resumption: a tf.data pipeline cannot be checkpointed by grain, so the state is the number
of documents consumed; restoring rebuilds the (deterministic) tf.data pipeline and skips that
many inside tf.data: exact, but O(position) in preprocessing work.
"""
from __future__ import annotations

import grain
import numpy as np

from elmjax.data.base import DocumentSource, SourceStats

FEATURE = "targets"


def _import_seqio():
    try:
        import seqio  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(
            "data.source names a seqio Task/Mixture but seqio is not installed; "
            "install the optional extra with `pip install 'elmjax[seqio]'`"
        ) from error
    return seqio


def _token_id(vocabulary, name: str) -> int | None:
    """The vocabulary's `bos_id`/`eos_id`, or None where it has none (seqio's base class
    raises NotImplementedError for bos_id; SentencePiece answers -1)."""
    try:
        value = getattr(vocabulary, name)
    except (AttributeError, NotImplementedError):
        return None
    return None if value is None or value < 0 else int(value)


def _can_shuffle(provider) -> bool:
    """Whether seqio allows get_dataset(shuffle=True): a Task built with
    shuffle_buffer_size=None refuses it unless its source shuffles internally."""
    tasks = getattr(provider, "tasks", None) or [provider]
    return all(
        task.shuffle_buffer_size is not None or task.source.performs_internal_shuffling
        for task in tasks
    )


class SeqioSource(DocumentSource):
    """Token documents of a registered seqio Task or Mixture (sequential, not random access)."""

    tokenized = True

    def __init__(self, name: str, seed: int = 0):
        seqio = _import_seqio()
        self.name = f"seqio:{name}"
        self.task_name = name
        self.seed = int(seed)
        try:
            provider = seqio.get_mixture_or_task(name)
        except ValueError as error:
            raise ValueError(
                f"config field `data.source`: no seqio Task or Mixture named {name!r} is "
                "registered; import the module that registers it before building the pipeline"
            ) from error
        if FEATURE not in provider.output_features:
            raise ValueError(
                f"config field `data.source`: seqio {name!r} has no {FEATURE!r} output feature "
                f"(it has {', '.join(sorted(provider.output_features))}); elmjax reads the "
                f"{FEATURE!r} token ids"
            )
        self.vocabulary = provider.output_features[FEATURE].vocabulary
        self.special_ids = (_token_id(self.vocabulary, "bos_id"), _token_id(self.vocabulary, "eos_id"))
        self.shuffle = _can_shuffle(provider)
        self._provider = provider
        self.stats = SourceStats()

    @property
    def vocab_size(self) -> int:
        return int(self.vocabulary.vocab_size)

    def vocabulary_file(self) -> str | None:
        """The SentencePiece model file of the vocabulary, where it has one."""
        return getattr(self.vocabulary, "sentencepiece_model_file", None)

    def __len__(self):
        raise TypeError(f"{self.name} is a stream; it has no length")

    def __getitem__(self, index):
        raise TypeError(f"{self.name} is a stream; read it with iter_dataset()")

    def iter_dataset(self, split, process_index, process_count, num_epochs) -> grain.IterDataset:
        seqio_split = "validation" if split == "eval" else "train"
        splits = [str(s) for s in self._provider.splits]
        if seqio_split not in splits:
            raise ValueError(
                f"config field `data.source`: seqio {self.task_name!r} has no "
                f"{seqio_split!r} split (it has {', '.join(splits)}), which elmjax reads "
                f"for {split}" + ("; or set eval.every_steps=0" if split == "eval" else "")
            )
        shuffle = split == "train" and self.shuffle
        return _SeqioIterDataset(
            self._provider, seqio_split, shuffle, self.seed, process_index, process_count, num_epochs
        )


class _SeqioIterDataset(grain.IterDataset):
    """The Task/Mixture's documents of one split, this process's shard. It holds the seqio
    object itself (not its name), so grain's spawned worker processes, where the module
    that registered it was never imported, can read it too."""

    def __init__(self, provider, split, shuffle, seed, shard_index, shard_count, num_epochs):
        super().__init__()
        self._provider = provider
        self._read = {"split": split, "shuffle": shuffle, "seed": seed, "num_epochs": num_epochs}
        self._shard = (shard_index, shard_count)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain's worker `i` of `n` reads `[i::n]` of this stream: a finer seqio shard."""
        index, count = self._shard
        if sequential_slice or sl.stop is not None or not 0 <= (sl.start or 0) < (sl.step or 1):
            raise ValueError(f"{self}: only strided worker slices [i::n] are supported, not {sl}")
        self._shard = (index + count * (sl.start or 0), count * (sl.step or 1))

    def __iter__(self):
        return _SeqioIterator(self._provider, self._read, self._shard)

    def __str__(self):
        return f"SeqioIterDataset({self._provider.name}, {self._read['split']}, shard {self._shard})"


class _SeqioIterator(grain.DatasetIterator):
    """Yields int32 token arrays of the "targets" feature; state = documents consumed."""

    def __init__(self, provider, read, shard):
        super().__init__()
        self._provider, self._read, self._shard = provider, read, shard
        self._consumed = 0
        self._stream = None  # opened on first use, so set_state builds the pipeline once

    def _open(self, skip: int):
        seqio = _import_seqio()
        read = self._read
        dataset = self._provider.get_dataset(
            sequence_length=None,
            split=read["split"],
            shuffle=read["shuffle"],
            seed=read["seed"] if read["shuffle"] else None,
            num_epochs=read["num_epochs"],
            shard_info=seqio.ShardInfo(index=self._shard[0], num_shards=self._shard[1]),
        )
        dataset = dataset.map(lambda example: example[FEATURE])
        if skip:
            dataset = dataset.skip(skip)  # inside tf.data: no Python per skipped document
        return dataset.as_numpy_iterator()

    def __next__(self):
        if self._stream is None:
            self._stream = self._open(self._consumed)
        tokens = next(self._stream)
        self._consumed += 1
        return np.asarray(tokens, np.int32)

    def get_state(self):
        return {"consumed": self._consumed}

    def set_state(self, state):
        self._consumed = int(state["consumed"])
        self._stream = None

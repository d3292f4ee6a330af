"""A registered seqio Task or Mixture as a data source (optional extra `elmjax[seqio]`).

`data.source = "seqio:<name>"` reads the Task/Mixture's "targets" feature (token ids from the
Task's own vocabulary, which must match the model's) from its "train" split, or its
"validation" split for evaluation. The module that registers the Task must be imported
before the pipeline is built (e.g. from the training config file).

seqio (with TensorFlow, ~3 GB) is imported only here, and only when such a source is used.
Resumption: a tf.data pipeline cannot be checkpointed by grain, so the state is the number
of documents consumed; restoring re-reads and skips that many (exact, but O(position)).
"""
from __future__ import annotations

import grain
import numpy as np

from elmjax.data.base import DocumentSource, SourceStats


def _import_seqio():
    try:
        import seqio  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(
            "data.source names a seqio Task/Mixture but seqio is not installed; "
            "install the optional extra with `pip install 'elmjax[seqio]'`"
        ) from error
    return seqio


class SeqioSource(DocumentSource):
    """Token documents of a registered seqio Task or Mixture (sequential, not random access)."""

    tokenized = True

    def __init__(self, name: str):
        seqio = _import_seqio()
        self.name = f"seqio:{name}"
        self.task_name = name
        try:
            provider = seqio.get_mixture_or_task(name)
        except ValueError as error:
            raise ValueError(
                f"config field `data.source`: no seqio Task or Mixture named {name!r} is "
                "registered; import the module that registers it before building the pipeline"
            ) from error
        vocabulary = provider.output_features["targets"].vocabulary
        self.special_ids = (getattr(vocabulary, "bos_id", None), vocabulary.eos_id)
        self.stats = SourceStats()

    def __len__(self):
        raise TypeError(f"{self.name} is a stream; it has no length")

    def __getitem__(self, index):
        raise TypeError(f"{self.name} is a stream; read it with iter_dataset()")

    def iter_dataset(self, split, process_index, process_count, num_epochs) -> grain.IterDataset:
        seqio_split = "validation" if split == "eval" else "train"
        return _SeqioIterDataset(self.task_name, seqio_split, process_index, process_count, num_epochs)


class _SeqioIterDataset(grain.IterDataset):
    def __init__(self, name, split, shard_index, shard_count, num_epochs):
        super().__init__()
        self._args = (name, split, shard_index, shard_count, num_epochs)

    def __iter__(self):
        return _SeqioIterator(*self._args)


class _SeqioIterator(grain.DatasetIterator):
    """Yields int32 token arrays of the "targets" feature; state = documents consumed."""

    def __init__(self, name, split, shard_index, shard_count, num_epochs):
        super().__init__()
        self._args = (name, split, shard_index, shard_count, num_epochs)
        self._consumed = 0
        self._stream = self._open()

    def _open(self):
        seqio = _import_seqio()
        name, split, shard_index, shard_count, num_epochs = self._args
        dataset = seqio.get_mixture_or_task(name).get_dataset(
            sequence_length=None,
            split=split,
            shuffle=False,
            num_epochs=num_epochs,
            shard_info=seqio.ShardInfo(index=shard_index, num_shards=shard_count),
        )
        return dataset.as_numpy_iterator()

    def __next__(self):
        example = next(self._stream)
        self._consumed += 1
        return np.asarray(example["targets"], np.int32)

    def get_state(self):
        return {"consumed": self._consumed}

    def set_state(self, state):
        self._stream = self._open()
        self._consumed = 0
        for _ in range(state["consumed"]):
            next(self)

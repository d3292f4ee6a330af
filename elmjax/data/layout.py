"""The same training batches on another number of processes (elastic restarts).

Each process's training iterator reads its shard of the documents (`ds[i::n]`, shuffled per
shard) and packs them into its rows of every global batch, so a run's data *layout* is the
process count n it started with, and a checkpoint holds one iterator state per shard
(`data/process_i-of-n.json`). Those positions cannot be moved onto the shards of another
process count: the new shards hold other documents.

So the layout stays with the run. On m processes, process k serves rows
[k*B/m, (k+1)*B/m) of each global batch of B rows: it opens the iterators of the shards
whose rows overlap that range (shard s packs rows [s*B/n, (s+1)*B/n)), takes its rows of
each and saves those shards' states. Every global batch is the one the n processes would
have produced, so no document is skipped or repeated and the data position is exact in any
direction (n -> m -> ...). The price is host work: with m < n a process packs n/m shards;
with m > n the processes that share a shard each pack it whole and keep their rows. A new
run (`train.init_from`) starts with its own native layout.
"""
from __future__ import annotations

import json
import re

import numpy as np

_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def saved_process_count(data_dir) -> int | None:
    """How many processes wrote the data item of a checkpoint (None: no state files)."""
    counts = {int(m.group(2)) for p in data_dir.iterdir() if (m := _STATE_FILE.match(p.name))}
    if len(counts) > 1:
        raise ValueError(f"{data_dir} mixes data states of {sorted(counts)} processes")
    return counts.pop() if counts else None


def writers_to_restore(step_dir, data_iterator) -> int:
    """How many processes wrote a checkpoint step's data states. Another count than this
    run's needs an iterator that re-reads the layout (`LayoutData`, one-stage runs): refused
    with a CheckpointError, before anything is restored, since such a step is not damaged."""
    import jax

    from elmjax.training.checkpoint_errors import CheckpointError

    try:
        writers = saved_process_count(step_dir / "data") or jax.process_count()
    except (OSError, ValueError):  # unreadable: the restore reports the damage
        return jax.process_count()
    if writers != jax.process_count() and not hasattr(data_iterator, "restore_layout"):
        raise CheckpointError(
            f"checkpoint {step_dir} was written by {writers} processes and this run has "
            f"{jax.process_count()}; a run with train.stages resumes only on {writers} processes")
    return writers


def read_saved_states(data_dir) -> dict[int, dict]:
    """{writing process index: its parsed data state} of a checkpoint's data item."""
    return {int(m.group(1)): json.loads(p.read_text())
            for p in data_dir.iterdir() if (m := _STATE_FILE.match(p.name))}


class LayoutData:
    """This process's rows of each training batch, in the run's data layout (`shards`
    shards; by default this run's process count, which is the plain per-process pipeline).

    It is what checkpoints save: grain's CheckpointSave/Restore call `get_state() -> bytes`
    and `set_state(bytes)`. In the native layout the bytes are the grain iterator's state
    exactly as grain writes it, so checkpoints keep their format.
    """

    def __init__(self, config, *, process_index=None, process_count=None, shards=None, make_iterator=None):
        """`make_iterator(config, process_index=, process_count=)`: one shard's training
        iterator (default the packed pipeline's; DPO passes its preference pairs', whose
        even per-process row counts keep every pair inside one shard's part)."""
        from elmjax.data.pipeline import _process_shard, make_train_iterator

        self.config = config
        self.make_iterator = make_iterator or make_train_iterator
        self.process_index, self.process_count = _process_shard(process_index, process_count)
        self._open(shards or self.process_count)

    def _open(self, shards: int) -> None:
        from elmjax.data.pipeline import local_batch_size

        rows, per_shard = local_batch_size(self.config, self.process_count), local_batch_size(self.config, shards)
        first, end = self.process_index * rows, (self.process_index + 1) * rows
        self.shards = shards
        self.parts = []  # (shard, first row, end row) within that shard's rows of a batch
        for shard in range(shards):
            low, high = max(first, shard * per_shard), min(end, (shard + 1) * per_shard)
            if low < high:
                self.parts.append((shard, low - shard * per_shard, high - shard * per_shard))
        self.iterators = {
            shard: self.make_iterator(self.config, process_index=shard, process_count=shards)
            for shard, _, _ in self.parts
        }

    @property
    def native(self) -> bool:
        return self.shards == self.process_count

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.native:
            return next(self.iterators[self.process_index])
        batches = {shard: next(iterator) for shard, iterator in self.iterators.items()}
        keys = batches[self.parts[0][0]].keys()
        return {key: np.concatenate([batches[s][key][a:b] for s, a, b in self.parts]) for key in keys}

    def get_state(self) -> bytes:
        if self.native:
            return json.dumps(self.iterators[self.process_index].get_state(), indent=4).encode()
        states = {str(shard): iterator.get_state() for shard, iterator in self.iterators.items()}
        return json.dumps({"data_shards": self.shards, "states": states}, indent=1).encode()

    def set_state(self, payload) -> None:
        """Restores this process's file of a checkpoint written by as many processes."""
        state = json.loads(payload)
        if "data_shards" in state:
            self._restore(int(state["data_shards"]), {int(k): v for k, v in state["states"].items()})
        else:
            self._restore(self.process_count, {self.process_index: state})

    def restore_layout(self, saved: dict[int, dict], saved_count: int) -> None:
        """Restores from every data file of a checkpoint written by `saved_count` processes
        (`read_saved_states`), whatever this run's process count."""
        shards, states = None, {}
        for index, state in saved.items():
            if "data_shards" in state:
                layout = int(state["data_shards"])
                states.update({int(k): v for k, v in state["states"].items()})
            else:
                layout = saved_count
                states[index] = state
            if shards not in (None, layout):
                raise ValueError(f"the checkpoint's data files disagree on the layout ({shards} vs {layout} shards)")
            shards = layout
        self._restore(shards, states)

    def _restore(self, shards: int, states: dict[int, dict]) -> None:
        if shards != self.shards:
            self._open(shards)
        missing = sorted(set(self.iterators) - set(states))
        if missing:
            raise ValueError(f"the checkpoint has no data state for shard(s) {missing} of {shards}")
        for shard, iterator in self.iterators.items():
            iterator.set_state(states[shard])

    def start_prefetch(self) -> None:
        """What grain's checkpoint restore calls after `set_state`."""
        for iterator in self.iterators.values():
            start = getattr(iterator, "start_prefetch", None)
            if start is not None:
                start()

    def describe(self) -> str:
        """A log line for a run whose layout is not its own process count."""
        return (f"data: this run's batches keep the layout of the {self.shards} process(es) it started "
                f"with; each of the {self.process_count} process(es) reads its rows of the same global "
                "batches (elmjax/data/layout.py)")

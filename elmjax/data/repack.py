"""Re-packing the training stream at a stage boundary (elmjax/training/stages.py).

A stage boundary changes the row length, so the next stage needs a new pipeline
(`make_train_iterator` with the new `train.seq_len`) that starts exactly where the previous
one stopped. Both pipelines have the same structure (same sources, shuffles and mixing), so
a state of one is a state of the other; what differs is where grain's concat-then-split
packer (ConcatThenSplitIterDataset) saves its position. It saves the position of its last
"checkpoint" (the moment its buffer last held nothing but the unfinished document: the
document iterator's state before that document, plus the slice of it not yet packed) and
the number of rows it has emitted since (`elements_from_buffer_after_checkpoint`, which is
1 after each row on an endless stream). Replaying that row count is only meaningful at the
old row length.

So, per source, the previous stage's packer is restored and asked for one more row: building
that row starts with a fresh checkpoint taken exactly at the boundary (after the last row
the previous stage used). That checkpoint, with no rows to replay, is the next stage's start:
the same documents, the same unfinished document cut at the same token, packed into rows of
the new length. The peeked row itself is thrown away. The result depends only on the saved
state, so a run resumed from any checkpoint crosses the boundary identically.
"""
from __future__ import annotations

import copy

_ROWS_SINCE_CHECKPOINT = "elements_from_buffer_after_checkpoint"


def _at_boundary(stream, state: dict) -> dict:
    """The packer state of `stream` (one source's packed rows) at the point `state` reached,
    with nothing to replay."""
    iterator = iter(stream)
    iterator.set_state(copy.deepcopy(state))
    next(iterator)  # starts with a checkpoint at the boundary
    peeked = iterator.get_state()
    if peeked.get(_ROWS_SINCE_CHECKPOINT) != 1:
        raise RuntimeError(
            "the row packer did not checkpoint at the stage boundary (state "
            f"{peeked}); elmjax's re-packing expects grain's ConcatThenSplit packer with "
            "split_full_length_features=True"
        )
    return dict(peeked, **{_ROWS_SINCE_CHECKPOINT: 0})


def boundary_state(previous_config, state: dict, *, process_index=None, process_count=None) -> dict:
    """The state for the next stage's train pipeline that continues the token stream where
    the pipeline of `previous_config` (the stage that ends) stopped with `state`.

    Only the in-process pipeline (`data.num_workers=0`) is supported; the stage validation
    requires it.
    """
    from elmjax.data.pipeline import _process_shard, build_row_streams

    process_index, process_count = _process_shard(process_index, process_count)
    streams, _ = build_row_streams(
        previous_config, "train", process_index=process_index, process_count=process_count,
        num_epochs=None,
    )
    if len(streams) == 1:  # batching and the model-input map keep the packer's state as it is
        return _at_boundary(streams[0], state)
    parents = state["parents"]  # grain's mix: one state per source, in build_row_streams order
    if len(parents) != len(streams):
        raise RuntimeError(f"the saved mix has {len(parents)} sources, the config {len(streams)}")
    return dict(state, parents=[_at_boundary(s, p) for s, p in zip(streams, parents)])

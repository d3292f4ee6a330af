"""Context-length stages: a run trained at one shape, then another (BTLM: 2048 x 1920
sequences, then 8192 x 480; SPEC §3).

`config.train.stages` lists `(end, seq_len, batch_size)`; each stage trains until its `end`
(cumulative, in `train.stage_unit`: optimizer steps, or tokens, where a stage ends after the
first step that reaches its token count) and the last end is the run's end (`train.steps`).
The learning-rate schedule spans the whole run. At a boundary

- the data loader re-packs: the next stage's pipeline (rows of its own length) continues
  the token stream exactly where the last row of the previous stage ended, mid-document
  included (elmjax/data/repack.py), so no token is skipped or repeated;
- the train step is compiled once for the new batch shape;
- metrics carry the stage (1-based).

A checkpoint holds the data state together with its stage, so a run resumed before, at or
after a boundary continues with the same batches (bitwise on CPU). Without stages a run is
one stage of `train.seq_len` x `train.batch_size` and saves the plain data state, as before.
"""
from __future__ import annotations

import dataclasses
import json

from elmjax.training.stage_plan import STAGE_UNITS, Stage, plan, stage_for_step, validate  # noqa: F401


def stage_config(config, stage: Stage):
    """A copy of `config` whose `train.seq_len` / `train.batch_size` are the stage's: what the
    data pipeline, the compiled step and the metrics of that stage read."""
    copy = config.copy_and_resolve_references()
    copy.train.seq_len, copy.train.batch_size = stage.seq_len, stage.batch_size
    return copy


class StagedData:
    """The training batches of a staged run: the current stage's grain iterator, and its
    successor's when a boundary is crossed (`enter`).

    It is what checkpoints save (grain's CheckpointSave/Restore take any object with
    `get_state() -> bytes` / `set_state(bytes)`): the state is the stage index with that
    stage's iterator state, so a restore opens the right pipeline first.
    """

    def __init__(self, config, stages: list[Stage]):
        self.config = config
        self.stages = stages
        self.stage = stages[0]
        self._iterator = self._open(self.stage)

    def _open(self, stage: Stage):
        from elmjax.data.pipeline import make_train_iterator

        return make_train_iterator(stage_config(self.config, stage))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._iterator)

    def enter(self, stage: Stage) -> bool:
        """Moves to `stage` (the current one or the next); True when the loader re-packed."""
        if stage.index == self.stage.index:
            return False
        if stage.index != self.stage.index + 1:
            raise RuntimeError(f"cannot go from stage {self.stage.index + 1} to stage {stage.index + 1}")
        from elmjax.data.repack import boundary_state

        state = boundary_state(stage_config(self.config, self.stage), self._iterator.get_state())
        iterator = self._open(stage)
        iterator.set_state(state)
        self._iterator, self.stage = iterator, stage
        return True

    def get_state(self) -> bytes:
        """The stage index and that stage's grain iterator state, as JSON bytes."""
        return json.dumps({"stage": self.stage.index, "iterator": self._iterator.get_state()}, indent=1).encode()

    def set_state(self, payload: bytes) -> None:
        """Opens the saved stage's pipeline and restores its iterator state."""
        saved = json.loads(payload)
        if not isinstance(saved, dict) or "stage" not in saved:
            raise ValueError("the checkpoint's data state has no stage; it was saved by a run without "
                             "train.stages")
        self.stage = self.stages[int(saved["stage"])]
        self._iterator = self._open(self.stage)
        self._iterator.set_state(saved["iterator"])

    def start_prefetch(self) -> None:
        """What grain's checkpoint restore calls after `set_state`; passed to the iterator."""
        start = getattr(self._iterator, "start_prefetch", None)
        if start is not None:
            start()


def train_data(config, stages: list[Stage]):
    """The run's batch iterator: for a one-stage run the grain iterator of this process
    (wrapped in `LayoutData`, which keeps the checkpoint format and can resume on another
    process count), `StagedData` otherwise."""
    if len(stages) == 1:
        from elmjax.data.layout import LayoutData

        if config.train.objective == "dpo":  # preference pairs (one stage: validated)
            from elmjax.data.preference import make_preference_iterator

            pairs = lambda config, **shard: make_preference_iterator(config, "train", **shard)
            return LayoutData(config, make_iterator=pairs)
        return LayoutData(config)  # resumable on another process count (elastic restarts)
    return StagedData(config, stages)


@dataclasses.dataclass
class StageRun:
    """What the loop needs for the steps of one stage."""

    stage: Stage
    setup: object  # elmjax.training.setup.Setup with the stage's config
    train_step: object  # the compiled step for the stage's batch shape
    compile_seconds: float


def begin(setup, stages: list[Stage], step: int, data, log=print) -> StageRun:
    """Enters the stage that trains step `step + 1`: re-packs the loader when `data` crosses
    a boundary, and compiles the train step for the stage's shape."""
    from elmjax.training import setup as setup_lib

    stage = stage_for_step(stages, step)
    if isinstance(data, StagedData) and data.enter(stage):
        log(f"{stage.describe()}: the loader re-packs into rows of {stage.seq_len} tokens")
    elif len(stages) > 1:
        log(stage.describe())
    stage_setup = dataclasses.replace(setup, config=stage_config(setup.config, stage))
    compiled, seconds = setup_lib.compile_train_step(stage_setup)
    return StageRun(stage, stage_setup, compiled, seconds)

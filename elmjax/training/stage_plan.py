"""Context stages as data: `train.stages` parsed into `Stage`s and validated (no runtime).

The runtime (re-packing the loader, recompiling the step at a boundary) is
elmjax/training/stages.py; this part is what `elmjax.config.validate` needs.
"""
from __future__ import annotations

import dataclasses
import math

from elmjax.validation import require

STAGE_UNITS = ("steps", "tokens")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: optimizer steps `first_step + 1 .. last_step` at one batch shape."""

    index: int  # 0-based position in the plan
    first_step: int  # steps trained before the stage starts
    last_step: int  # the step that ends it
    seq_len: int
    batch_size: int
    count: int = 1  # stages in the plan (for "stage 2/2")

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one batch of the stage."""
        return self.seq_len * self.batch_size

    def describe(self) -> str:
        """`stage 2/2: steps 5-8 at 4 x 64 tokens`."""
        return (f"stage {self.index + 1}/{self.count}: steps {self.first_step + 1}-{self.last_step} "
                f"at {self.batch_size} x {self.seq_len} tokens")


def _entries(train) -> list[tuple[int, int, int]]:
    """`train.stages` as a list of int triples; ConfigError naming the field otherwise."""
    entries = list(train.stages or ())
    for number, entry in enumerate(entries):
        ok = isinstance(entry, (tuple, list)) and len(entry) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in entry
        )
        require(ok, "train.stages", f"entry {number} is {entry!r}; expected (end, seq_len, batch_size), "
                "three integers >= 1")
    return [tuple(entry) for entry in entries]


def plan(config) -> list[Stage]:
    """The stages of a validated config, first first (one stage when `train.stages` is empty)."""
    train = config.train
    entries = _entries(train)
    if not entries:
        return [Stage(0, 0, int(train.steps), int(train.seq_len), int(train.batch_size))]
    stages, step, tokens = [], 0, 0
    for index, (end, seq_len, batch_size) in enumerate(entries):
        if train.stage_unit == "tokens":
            per_step = seq_len * batch_size
            last = step + max(math.ceil((end - tokens) / per_step), 0)
            tokens += (last - step) * per_step
        else:
            last = end
        stages.append(Stage(index, step, last, seq_len, batch_size, len(entries)))
        step = last
    return stages


def validate(config) -> None:
    """Raises ConfigError naming the first bad stage field (called by `elmjax.config.validate`)."""
    train = config.train
    require(train.stage_unit in STAGE_UNITS, "train.stage_unit",
            f"is {train.stage_unit!r}; allowed: {', '.join(STAGE_UNITS)}")
    entries = _entries(train)
    if not entries:
        return
    for number in range(1, len(entries)):
        require(entries[number][0] > entries[number - 1][0], "train.stages",
                f"entry {number} ends at {entries[number][0]}, not after entry {number - 1}'s "
                f"{entries[number - 1][0]}; stage ends must increase")
    for number, (_, seq_len, batch_size) in enumerate(entries):
        require(seq_len <= config.model.max_seq_len, "train.stages",
                f"entry {number} has seq_len {seq_len} > model.max_seq_len={config.model.max_seq_len}")
        require(batch_size % train.grad_accum_steps == 0, "train.stages",
                f"entry {number} has batch_size {batch_size}, not divisible by "
                f"train.grad_accum_steps={train.grad_accum_steps}")
        first = entries[0][1] * entries[0][2]
        require(not train.stages_equal_tokens or seq_len * batch_size == first, "train.stages",
                f"entry {number} has {seq_len} x {batch_size} = {seq_len * batch_size} tokens per batch, "
                f"entry 0 has {first}; stages must have equal tokens per batch "
                "(or set train.stages_equal_tokens=False)")
    stages = plan(config)
    require(all(s.last_step > s.first_step for s in stages), "train.stages",
            f"a stage of {train.stage_unit} ends before it trains a step: {entries}")
    require(stages[-1].last_step == train.steps, "train.stages",
            f"the stages end at step {stages[-1].last_step} but train.steps is {train.steps}; "
            f"set train.steps={stages[-1].last_step}, or make the last stage end at {train.steps}")
    require(config.data.num_workers == 0, "data.num_workers",
            f"is {config.data.num_workers}; train.stages re-packs the loader's state at a boundary, "
            "which needs the in-process loader (num_workers=0)")


def stage_for_step(stages: list[Stage], step: int) -> Stage:
    """The stage that trains step `step + 1` (the last stage once the run is over)."""
    for stage in stages:
        if step < stage.last_step:
            return stage
    return stages[-1]

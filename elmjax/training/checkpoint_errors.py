"""What goes wrong with checkpoints, as one line each: the error types, the root cause of a
storage failure (an OS error deep in orbax's or tensorstore's exception chain), and the
free-space check that makes a full disk fail at the step that does not fit."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import jax

from elmjax import storage


class CheckpointError(RuntimeError):
    """A workdir or checkpoint cannot be used; the message says why and what to do."""


class DamagedCheckpointError(CheckpointError):
    """A step's arrays do not match the checksums written with them."""


class SaveFailedError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions, storage errors)."""


def _root_cause(error: BaseException) -> str:
    """The first OS error's reason in `error`'s chain (e.g. "No space left on device"), else
    its first line."""
    seen, pending = set(), [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        code = re.search(r"os_error_code='(\d+)'", str(current))  # tensorstore's wording of an OS error
        if code:
            return os.strerror(int(code.group(1)))
        pending += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _last_good(step: int | None) -> str:
    return f"the last good checkpoint is step {step}" if step is not None else "no checkpoint was completed yet"


def save_failed(directory, step: int, error: BaseException, last_good: int | None) -> SaveFailedError:
    """One line for a save of `step` into `directory` that raised `error`."""
    return SaveFailedError(
        f"saving checkpoint step {step} failed: {_root_cause(error)}; {_last_good(last_good)} in {directory}, "
        "and re-running the same command resumes from it once the cause is fixed"
    )


def check_free_space(directory, step: int, state, last_good) -> None:
    """Fails before writing when a local checkpoint directory has less free space than the
    step needs (its arrays plus 5%): a full disk then reads as one line, at the step that does
    not fit, instead of a failure inside orbax's background threads surfacing a save later.
    `last_good()` gives the newest complete step (only asked when failing)."""
    if storage.is_remote(directory):  # object storage has no free space to run out of
        return
    path = Path(str(directory))
    if not path.exists():
        return
    needed = int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)) * 1.05) + 2**20
    free = shutil.disk_usage(path).free
    if free < needed:
        raise SaveFailedError(
            f"saving checkpoint step {step} needs about {needed / 2**20:.1f} MiB but {path} has "
            f"{free / 2**20:.1f} MiB free (No space left on device); {_last_good(last_good())}; free space "
            "or lower checkpoint.max_to_keep, then re-run the same command to resume from it"
        )

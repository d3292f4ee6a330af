"""What goes wrong with checkpoints, as one line each: the error types, the root cause of a
storage failure (an OS error deep in orbax's or tensorstore's exception chain), the
free-space check that makes a full disk fail at the step that does not fit, and the check
that a checkpoint was written for this run's model and optimizer."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import jax

from elmjax import storage
from elmjax.tree import path_name
from elmjax.validation import first_line


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
    return first_line(error)


def one_line(error: BaseException) -> str:
    """`error` as "Type: reason" (`_root_cause`: an OS error's reason from its chain, else
    its first line), without the TensorStore spec dump (60 lines) that orbax appends to a
    failed array read; the array's name is kept from it."""
    full = str(error)
    text = _root_cause(error).split(" See full TensorStore details")[0].rstrip(".")
    arrays = [p for p in re.findall(r"'path': '([^']+?)/?'", full) if not p.startswith(("/", "gs://"))]
    if arrays:
        text += f" of array {arrays[-1]}"
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text


def unreadable(step_dir, error: BaseException, complete, fix: str) -> DamagedCheckpointError:
    """One line for a finished step that cannot be read: the cause, and, in case its files are
    damaged (a storage error reads the same), `fix` formatted with the newest of the `complete`
    steps before it (`{step}`, and `{path}` its directory)."""
    step_dir = storage.path(step_dir)
    failed = int(step_dir.name) if step_dir.name.isdigit() else None
    earlier = sorted(step for step in complete if failed is None or step < failed)
    hint = (fix.format(step=earlier[-1], path=step_dir.parent / str(earlier[-1])) if earlier
            else "there is no earlier complete step to use instead")
    reason = str(error) if isinstance(error, CheckpointError) else one_line(error)
    return DamagedCheckpointError(f"checkpoint {step_dir} cannot be read ({reason}); if its files are damaged, {hint}")


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


def _leaf_shapes(tree) -> dict[str, tuple]:
    """{"a/b/0": shape} for every array leaf of `tree` (arrays, abstract arrays or orbax
    array metadata)."""
    return {
        path_name(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def check_matches(step_dir, abstract_tree, *, resuming: bool) -> None:
    """Raises CheckpointError when `step_dir`'s saved state has other arrays or shapes than
    `abstract_tree` (this run's model and optimizer; only {"params": ...} when `resuming` is
    False or the step is params-only). Unreadable metadata passes: the restore then fails
    and the step is treated as damaged."""
    import orbax.checkpoint as ocp  # here: elmjax/cli.py imports this module for its error types

    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = _leaf_shapes(handler.metadata(storage.absolute(storage.path(step_dir) / "state")).tree)
    except Exception:  # noqa: BLE001 - damaged metadata is the restore's to report
        return
    finally:
        handler.close()
    wanted = _leaf_shapes(abstract_tree)
    if "opt_state" not in abstract_tree:  # a params-only restore reads just the params
        saved = {path: shape for path, shape in saved.items() if path.startswith("params/")}
    missing = sorted(wanted.keys() - saved.keys())
    unexpected = sorted(saved.keys() - wanted.keys())
    reshaped = sorted(path for path in wanted.keys() & saved.keys() if wanted[path] != saved[path])
    differing = missing + unexpected + reshaped
    if not differing:
        return
    details = []
    if missing:
        details.append(f"{len(missing)} arrays this run needs are not in it (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} saved arrays are not in this run (e.g. {unexpected[0]})")
    if reshaped:
        path = reshaped[0]
        details.append(f"{len(reshaped)} have other shapes (e.g. {path}: saved {saved[path]}, "
                       f"this run {wanted[path]})")
    if all(path.startswith("opt_state/") for path in differing):
        advice = ("Only the optimizer state differs (another optimizer, or an older elmjax): train "
                  f"in a new --workdir with --config.train.init_from={step_dir} to keep its "
                  "parameters with a fresh optimizer.")
    elif resuming:
        advice = (f"Resume with the config it was saved with ({storage.path(step_dir) / 'config'}), or train in a "
                  "new --workdir.")
    else:
        advice = f"init_from needs the same model: use the config it was saved with ({storage.path(step_dir) / 'config'})."
    raise CheckpointError(
        f"checkpoint {step_dir} was written for another model or optimizer: {'; '.join(details)}. {advice}"
    )

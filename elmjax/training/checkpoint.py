"""Checkpoints: train state, data-iterator state and the resolved config in one step dir.

Layout (notes/CONTRACTS.md):
  WORKDIR/checkpoints/<step>/state   train state pytree (orbax, OCDBT)
  WORKDIR/checkpoints/<step>/data    grain iterator state, one JSON file per process
  WORKDIR/checkpoints/<step>/config  the resolved config (JSON)
A params-only checkpoint (`save_params_checkpoint`) has `state` = {"params": ...} and no
`data` item; training from it starts a fresh optimizer.

The workdir may be local or gs:// (elmjax/storage.py). Locally orbax writes each step into a
temporary directory and renames it when every item is written; on GCS, which cannot rename,
it writes the step in place and `commit_success.txt` last. Either way a save that dies
halfway never replaces the last good step (what it left is moved aside as
`<step>.incomplete-<time>`). A finished step whose files are damaged is skipped on restore
with a warning (and moved aside as `<step>.damaged-<time>`), and the one before it is used;
when every finished step is damaged the run stops with one line instead of starting over.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain import checkpoint as grain_checkpoint

from elmjax import storage
from elmjax.data import layout

from elmjax.training import checksums
from elmjax.training.orbax_noise import drop_failed_read_echoes
from elmjax.training.checkpoint_errors import (  # noqa: F401  (CheckpointError: part of this module's API)
    CheckpointError,
    DamagedCheckpointError,
    SaveFailedError,
    check_free_space,
    check_matches,
    one_line,
    save_failed,
    unreadable,
)
from elmjax.training.saved_config import config_to_dict, read_config

log = logging.getLogger("elmjax.training.checkpoint")


CHECKPOINTS = "checkpoints"
CHECKSUMS = "checksums"  # item of a step: {array path: checksum} (elmjax/training/checksums.py)
_STEP_MARKER = "_CHECKPOINT_METADATA"  # orbax writes it when a step is finalised
# Orbax writes it last into a finished step. On GCS the step is written in place, so
# _STEP_MARKER (written first there) does not say the step is complete: this file does.
_COMMIT_MARKER = "commit_success.txt"


def checkpoint_dir(workdir) -> epath.Path:
    return storage.path(workdir) / CHECKPOINTS


def prepare_workdir(workdir) -> epath.Path:
    """Creates `workdir` if needed; raises CheckpointError if it is not a writable directory
    (for gs://, StorageError if its bucket cannot be reached)."""
    path = storage.path(workdir)
    if storage.is_remote(path):  # no directories to create or permissions to read on GCS
        storage.check_bucket(path)
        return path
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"workdir {path} exists but is not a directory; pass another --workdir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create workdir {path}: {error}; pass a writable --workdir") from None
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise CheckpointError(f"workdir {path} is not readable and writable; fix its permissions or pass another --workdir")
    return path


def _is_complete(step_dir: epath.Path) -> bool:
    """Whether orbax finalised `step_dir` with its state and config; False (with a warning
    naming the path) for a step directory this process cannot read."""
    state = step_dir / "state"
    try:
        if storage.is_remote(step_dir):
            if not (step_dir / _COMMIT_MARKER).is_file():
                return False
        else:
            os.listdir(step_dir)  # an unreadable directory raises here; epath's is_file() says "missing"
        return (step_dir / _STEP_MARKER).is_file() and (state / "_METADATA").is_file() and (step_dir / "config").is_dir()
    except OSError as error:  # e.g. PermissionError for another user's directory
        log.warning("cannot read checkpoint %s (%s); skipping it", step_dir, error.strerror or error)
        return False


def _step_dirs(path) -> list[epath.Path]:
    root = storage.path(path)
    if (root / CHECKPOINTS).is_dir():
        root = root / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def complete_steps(path) -> list[int]:
    """Finalised steps under a workdir (or its checkpoints dir), oldest first."""
    return [int(p.name) for p in _step_dirs(path) if _is_complete(p)]


def set_aside_incomplete_steps(path) -> None:
    """Sets aside step directories that orbax would take as existing but that cannot be
    restored (a deleted `state`, a lost `_METADATA`): left in place, the next save of that
    step number would fail with StepAlreadyExistsError on every rerun. Readable ones only: an
    unreadable directory is skipped with a warning and left alone."""
    for step_dir in _step_dirs(path):
        try:
            readable = storage.is_remote(step_dir) or os.access(step_dir, os.R_OK | os.X_OK) and all(
                os.access(p, os.R_OK) for p in step_dir.iterdir()
            )
        except OSError:
            readable = False
        if readable and not _is_complete(step_dir):
            log.warning("checkpoint %s is incomplete (no state or metadata); setting it aside", step_dir)
            set_aside(step_dir, "incomplete")


def latest_complete_step(path) -> int | None:
    """The newest finalised step under a workdir, or None if it has none."""
    steps = complete_steps(path)
    return steps[-1] if steps else None


def is_train_checkpoint(step_dir) -> bool:
    """True for a full training checkpoint (has optimizer + data state), False for params-only."""
    return (storage.path(step_dir) / "data").is_dir()


def make_manager(workdir, checkpoint_config) -> ocp.CheckpointManager:
    """The orbax manager for `WORKDIR/checkpoints` with `config.checkpoint`'s policies."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(checkpoint_config.max_to_keep),
        keep_period=int(checkpoint_config.keep_every) or None,
        enable_async_checkpointing=bool(checkpoint_config.async_save),
        create=True,
    )
    return ocp.CheckpointManager(storage.absolute(checkpoint_dir(workdir)), options=options)


def wait(manager) -> None:
    """Waits for the save in flight; its failure is a one-line SaveFailedError naming the step."""
    try:
        manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - any storage failure ends in the same advice
        raise save_failed(manager.directory, getattr(manager, "_elmjax_saving", -1), error,
                          latest_complete_step(manager.directory)) from error


def save(manager, step: int, state, data_iterator, config, *, force: bool = False) -> bool:
    """Starts saving `step` (in the background when async); returns whether a save began.

    The data-iterator state is captured before returning, so training may go on at once. A
    failure of the previous (background) save, or of this one, is a SaveFailedError.
    """
    wait(manager)  # orbax waits for the previous save anyway; this way its failure names its step
    check_free_space(manager.directory, step, state, lambda: latest_complete_step(manager.directory))
    items = {
        "state": ocp.args.StandardSave(state),
        "config": ocp.args.JsonSave(config_to_dict(config)),
        CHECKSUMS: ocp.args.JsonSave(checksums.checksums(state)),
    }
    if data_iterator is not None:
        items["data"] = grain_checkpoint.CheckpointSave(data_iterator)
    manager._elmjax_saving = step
    try:
        return manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as error:  # noqa: BLE001
        raise save_failed(manager.directory, step, error, latest_complete_step(manager.directory)) from error


def set_aside(step_dir: epath.Path, why: str = "damaged") -> str:
    """Moves a damaged (or incomplete) step to `<step>.<why>-<time>`, a name that is not a step
    number, so the manager neither restores nor overwrites it (on GCS a copy and delete: see
    elmjax/storage.py). Only process 0 moves it; every process returns the new name."""
    name = f"{step_dir.name}.{why}-{int(time.time())}"
    if jax.process_index() == 0 and step_dir.exists():
        storage.move(step_dir, step_dir.with_name(name))
    return name


def _damaged_before(root) -> list[str]:
    """Names of the finished steps set aside as damaged by earlier runs."""
    return sorted(path.name for path in storage.path(root).glob("*.damaged-*")) if storage.path(root).exists() else []


def restore_train_state(workdir, abstract_state, data_iterator):
    """Restores the newest complete checkpoint under `workdir` onto `abstract_state`'s
    shardings (any mesh) and `data_iterator`.

    Returns (step, state, kind): kind is "train" (full resume), "params" (a params-only
    checkpoint: state holds fresh-optimizer fields as None) or None when there is nothing to
    restore. Damaged newer steps are skipped with a warning; DamagedCheckpointError when every
    finished step is damaged (now or by an earlier run), rather than starting over at step 0.
    """
    root = checkpoint_dir(workdir)
    set_aside_incomplete_steps(root)
    drop_failed_read_echoes()
    # Listed before this call moves anything (only process 0 moves): every process decides alike.
    damaged_before = _damaged_before(root)
    # A damaged step's restore may have set the iterator already: every fallback starts over.
    initial_data_state = data_iterator.get_state()
    set_aside_now = []

    def skip(step_dir, error):
        log.warning("checkpoint %s is unreadable (%s); skipping it", step_dir, one_line(error))
        set_aside_now.append(set_aside(step_dir))
        data_iterator.set_state(initial_data_state)

    for step in reversed(complete_steps(root)):
        step_dir = root / str(step)
        train_checkpoint = is_train_checkpoint(step_dir)
        # A readable step written for another model or optimizer is not damaged: stop with
        # a clear error instead of setting it (and every older step) aside.
        check_matches(step_dir, abstract_state if train_checkpoint else {"params": abstract_state["params"]},
                       resuming=True)
        writers = layout.writers_to_restore(step_dir, data_iterator) if train_checkpoint else None
        try:
            read_config(step_dir)  # a damaged one is damage; a config of another version is not
        except DamagedCheckpointError as error:
            skip(step_dir, error)
            continue
        try:
            if train_checkpoint:
                items = {"state": ocp.args.StandardRestore(abstract_state)}
                if writers == jax.process_count():  # this process's own file: grain reads it
                    items["data"] = grain_checkpoint.CheckpointRestore(data_iterator)
                restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
                    storage.absolute(step_dir), args=ocp.args.Composite(**items)
                )
                verify(step_dir, restored["state"])
                if writers != jax.process_count():  # an elastic restart (elmjax/data/layout.py)
                    data_iterator.restore_layout(layout.read_saved_states(step_dir / "data"), writers)
                return step, restored["state"], "train"
            params = _restore_params_onto(step_dir, abstract_state["params"])
            verify(step_dir, {"params": params})
            return step, {"params": params}, "params"
        except Exception as error:  # a damaged step: fall back to the one before it
            skip(step_dir, error)
    if damaged_before or set_aside_now:  # starting over would train from step 0 where trained steps were
        names = sorted(damaged_before + set_aside_now)
        raise DamagedCheckpointError(
            f"every checkpoint in {root} is damaged (set aside as {', '.join(names)}), so nothing can be "
            f"resumed; to start over from step 0, move those directories out of {root} (or use a new --workdir)")
    return None, None, None


def verify(step_dir, restored_state) -> None:
    """Raises DamagedCheckpointError when restored arrays differ from what the step wrote
    (checksums item); steps written before checksums existed are not checked."""
    table = storage.path(step_dir) / CHECKSUMS / "metadata"
    if not table.is_file():
        return
    bad = checksums.mismatches(json.loads(table.read_text()), restored_state)
    if bad:
        raise DamagedCheckpointError(
            f"{len(bad)} array(s) differ from what step {storage.path(step_dir).name} wrote (e.g. {bad[0]}): "
            "the files were changed after the save"
        )


def restore_params_for_init(path, abstract_params):
    """(step_dir, params) of the checkpoint at `path` (a workdir or a step directory), placed
    onto `abstract_params`' shardings: the parameters `train.init_from` starts from.

    Raises CheckpointError when the path is unusable or its parameters do not fit.
    """
    step_dir = _resolve_step_dir(path, None)
    check_matches(step_dir, {"params": abstract_params}, resuming=False)
    params = _read_or_explain(step_dir, lambda: _restore_params_onto(step_dir, abstract_params),
                              "point train.init_from at the newest earlier complete step, {path}")
    return step_dir, params


def _restore_params_onto(step_dir: epath.Path, abstract_params):
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    return ocp.PyTreeCheckpointer().restore(storage.absolute(step_dir / "state"), args=args)["params"]


def _read_or_explain(step_dir, read, fix: str) -> dict:
    """`read()`'s parameters, checked against the step's checksums; any failure is one
    `unreadable` line whose `fix` names the newest earlier complete step."""
    drop_failed_read_echoes()
    try:
        params = read()
        verify(step_dir, {"params": params})
    except Exception as error:  # noqa: BLE001 - any read failure means damaged files
        raise unreadable(step_dir, error, complete_steps(step_dir.parent), fix) from error
    return params


def _int_keys(tree):
    """Orbax stores dict keys as strings; layer indices go back to ints (`to_pure_dict`)."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def _resolve_step_dir(path, step):
    path = storage.path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; pass a training workdir or a step directory")
    if not storage.is_remote(path) and not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"checkpoint path {path} is not readable; fix its permissions")
    if path.name.isdigit() and (path / "state").is_dir():
        return path
    steps = complete_steps(path)
    if not steps and (path / "config.json").is_file() and any(path.glob("model*.safetensors")):
        raise CheckpointError(f"{path} is a Hugging Face model directory, not an elmjax checkpoint; import it "
                              f"first: python tools/import_hf.py --hf {path} --out WORKDIR, then pass WORKDIR")
    if not steps:
        raise CheckpointError(f"no complete checkpoint under {path}; train first or pass a step directory")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise CheckpointError(f"step {step} is not a complete checkpoint under {path}; complete steps: {steps}")
    return checkpoint_dir(path) / str(chosen) if (path / CHECKPOINTS).is_dir() else path / str(chosen)


def restore_params(path, step=None):
    """(config, params) of a checkpoint: `path` is a workdir or a step directory.

    Reads only the parameters (no optimizer state); params is a pure dict in the
    `nnx.State.to_pure_dict()` layout, as numpy arrays.
    """
    step_dir = _resolve_step_dir(path, step)
    fix = "the newest earlier complete step is {path} (pass it, or --step {step} where the command takes a step)"
    try:
        config = read_config(step_dir)
    except DamagedCheckpointError as error:
        raise unreadable(step_dir, error, complete_steps(step_dir.parent), fix) from None
    params = _read_or_explain(step_dir, lambda: _read_params(step_dir), fix)
    log.info("restored parameters from %s", step_dir)
    return config, _with_frozen(config, _int_keys(params))


def _read_params(step_dir) -> dict:
    """The parameters of `step_dir` as numpy arrays, whatever mesh wrote them."""
    metadata = ocp.PyTreeCheckpointer().metadata(storage.absolute(step_dir / "state")).item_metadata
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    target = {"params": jax.tree.map(lambda m: np.zeros((), m.dtype), tree["params"], is_leaf=lambda x: hasattr(x, "shape"))}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = ocp.PyTreeCheckpointer().restore(
        storage.absolute(step_dir / "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
    return restored["params"]


def _with_frozen(config, params: dict) -> dict:
    """The trained `params` plus the variables that did not train (elmjax/trainable.py),
    which checkpoints do not hold: under adapters the base model of `train.init_from`, else
    rebuilt from the initialisation seed. Nothing to add when every variable trains (the
    default)."""
    from flax import nnx

    from elmjax import trainable
    from elmjax.layers.decoder import abstract_model, build_model

    _, _, frozen = trainable.split(abstract_model(config.model), config.model)
    if not jax.tree.leaves(frozen):
        return params
    if trainable.adapters_on(config.model):
        merged = restore_params(config.train.init_from)[1]
    else:
        _, _, frozen = trainable.split(build_model(config.model, config.train.seed), config.model)
        merged = jax.tree.map(np.asarray, nnx.to_pure_dict(frozen))

    def overlay(base, update):
        for key, value in update.items():
            base[key] = overlay(base.get(key, {}), value) if isinstance(value, dict) else value
        return base

    return overlay(merged, params)


def load_model(path, step=None):
    """(config, model): the checkpoint's parameters in a model built from its saved config."""
    from flax import nnx

    from elmjax.layers.decoder import abstract_model

    config, params = restore_params(path, step)
    graphdef, state = nnx.split(abstract_model(config.model))
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
    return config, nnx.merge(graphdef, state)


def save_params_checkpoint(workdir, config, params, step: int = 0) -> epath.Path:
    """Writes a params-only checkpoint of `params` (pure dict or nnx.State) at `step`.

    Training on this workdir then fine-tunes from these parameters with a fresh optimizer.
    """
    from flax import nnx

    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    prepare_workdir(workdir)
    manager = ocp.CheckpointManager(
        storage.absolute(checkpoint_dir(workdir)),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
    )
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}),
            config=ocp.args.JsonSave(config_to_dict(config)),
            **{CHECKSUMS: ocp.args.JsonSave(checksums.checksums({"params": params}))},
        ),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
    return checkpoint_dir(workdir) / str(step)

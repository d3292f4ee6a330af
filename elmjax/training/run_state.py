"""What a re-run of the same command finds in its workdir: a finished run, or a config that
changed since the checkpoint it would resume from, and what the run tells the user at the end.
"""
from __future__ import annotations

import datetime
import shlex

from elmjax import storage
from elmjax.training import checkpoint as ckpt
from elmjax.training.checkpoint_errors import DamagedCheckpointError
from elmjax.training.saved_config import config_to_dict, read_config
from elmjax.validation import ConfigError

# Fields a resumed run may change without changing what its remaining steps compute: logging,
# checkpoint and evaluation cadence, placement (a checkpoint restores onto any mesh), kernels
# and rematerialisation (same math), loader parallelism.
RESUME_SAFE_PREFIXES = (
    "train.log_every", "train.stop_check_every", "train.sample_at_end", "train.workdir",
    "train.reuse_host_memory", "train.nonfinite", "train.max_nonfinite_streak",
    "train.allow_config_change", "train.init_from", "checkpoint.", "eval.", "mesh.",
    "model.attention_impl", "model.remat_policy", "data.num_workers", "data.prefetch",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved, current) -> list[tuple[str, object, object]]:
    """(field, saved value, current value) for every field that differs, in field order. The
    adapter settings count only where adapters are on (the default targets of a run without
    them changed with elmjax's versions)."""
    before, after = _flat(config_to_dict(saved)), _flat(config_to_dict(current))
    no_adapters = before.get("model.adapter.kind", "none") == after.get("model.adapter.kind", "none") == "none"
    return [(k, before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k) and not (no_adapters and k.startswith("model.adapter."))]


def check_resume_config(workdir, config, log) -> int | None:
    """Compares `config` with the config of the training checkpoint the run would resume from.

    Logs every changed field; raises ConfigError for changes that alter what the resumed steps
    compute, unless `train.allow_config_change`. Returns that checkpoint's step (None if none).
    """
    root = ckpt.checkpoint_dir(workdir)
    for step in reversed(ckpt.complete_steps(workdir)):
        if not ckpt.is_train_checkpoint(root / str(step)):
            return None
        try:
            saved = read_config(root / str(step))
            break
        except DamagedCheckpointError:  # restoring sets the step aside, with a warning, and uses the one before
            continue
    else:
        return None
    changes = [change for change in config_changes(saved, config)
               if change[0] != "train.allow_config_change"]  # the permission, not a change to report
    if not changes:
        return step
    described = [f"{field} {old!r} -> {new!r}" for field, old, new in changes]
    log(f"config changed since checkpoint step {step}: {'; '.join(described)}")
    breaking = [text for (field, _, _), text in zip(changes, described) if not field.startswith(RESUME_SAFE_PREFIXES)]
    if breaking and not config.train.allow_config_change:
        raise ConfigError(
            "train.allow_config_change",
            f"resuming {workdir} (step {step}) with changes that alter what the remaining steps compute "
            f"({'; '.join(breaking)}), so the run would no longer match an uninterrupted one; re-run with "
            "the saved values, pass --config.train.allow_config_change=true to accept them, or use a new --workdir",
        )
    return step


def duration(seconds: float) -> str:
    """`1:02:03`."""
    return str(datetime.timedelta(seconds=int(round(seconds))))


def finished_summary(workdir, config, step: int, seconds: float | None, last: dict) -> list[str]:
    """Where the run's outputs are and what to run next."""
    steps = ckpt.complete_steps(workdir)
    quoted = shlex.quote(str(workdir))  # commands to copy: a path with spaces stays one argument
    head = f"done: step {step} of {config.train.steps}"
    if seconds is not None:
        head += f" in {duration(seconds)}"
    if last.get("loss") is not None:
        head += f" (last loss {last['loss']:.4f})"
    return [
        head,
        f"  checkpoints  {ckpt.checkpoint_dir(workdir)} (steps {', '.join(map(str, steps))})",
        f"  metrics      {workdir}/metrics.jsonl; TensorBoard: tensorboard --logdir {shlex.quote(str(workdir) + '/tensorboard')}",
        f"  next         python -m elmjax.generate --checkpoint {quoted} "
        + ("--chat --prompt \"Hi! How are you?\"" if config.data.get("chat_template", "") else "--prompt \"The\""),
        f"               python -m elmjax.evaluate --checkpoint {quoted} --tasks openelm_zero_shot --limit 100",
        f"               python tools/export.py --checkpoint {quoted} --to torch --out "
        + shlex.quote(f"{storage.path(workdir).name}-hf" if storage.is_remote(workdir) else f"{workdir}/hf"),
    ]

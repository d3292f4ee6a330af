"""The mean of a workdir's last K checkpoints' parameters, as a params-only checkpoint.

OpenELM's released weights are the average of its last five checkpoints (SPEC §1). The sum
is accumulated in float64 and divided once, so the result is the mean of the float32
values rounded once to float32 (exact for checkpoints of one run, whose values differ by
far less than float64's 29 spare bits of range).
"""
from __future__ import annotations

import json

import numpy as np
from flax import traverse_util

from elmjax import storage


def select_steps(steps: list[int], last: int, workdir) -> list[int]:
    """The newest `last` steps; a clear error when there are fewer."""
    if last < 1:
        raise ValueError(f"--last must be >= 1, got {last}")
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint under {workdir}; train first or pass another --workdir")
    if len(steps) < last:
        raise ValueError(
            f"--last {last} asks for more checkpoints than {workdir} holds: {len(steps)} complete "
            f"(steps {steps}); pass --last {len(steps)} or fewer"
        )
    return steps[-last:]


def average_params(workdir, steps: list[int]):
    """(config of the newest step, mean params as a pure dict of float32 numpy arrays)."""
    from elmjax.training.checkpoint import restore_params

    total: dict[tuple, np.ndarray] = {}
    dtypes: dict[tuple, np.dtype] = {}
    config = model_section = None
    for step in steps:
        step_config, params = restore_params(workdir, step=step)
        section = json.loads(step_config.model.to_json())
        if model_section is not None and section != model_section:
            raise ValueError(f"step {step} has a different model config from step {steps[0]}; cannot average them")
        model_section, config = section, step_config
        flat = traverse_util.flatten_dict(params)
        if total and set(flat) != set(total):
            raise ValueError(f"step {step} has different parameters from step {steps[0]}")
        for path, value in flat.items():
            value = np.asarray(value)
            if path in total:
                total[path] += value  # in float64
            else:
                total[path] = value.astype(np.float64)
                dtypes[path] = value.dtype
        del params, flat
    mean = {path: (value / len(steps)).astype(dtypes[path]) for path, value in total.items()}
    return config, traverse_util.unflatten_dict(mean)


def average_checkpoints(workdir, out, *, last: int = 5, overwrite: bool = False) -> list[int]:
    """Writes the mean of `workdir`'s newest `last` complete checkpoints as a params-only
    checkpoint workdir `out` (at the newest averaged step), plus `out/average.json` naming
    the steps. Nothing is left at `out` on failure. Returns the averaged steps."""
    from elmjax.training.checkpoint import complete_steps, save_params_checkpoint
    from elmjax.convert.outdir import atomic_output_dir, check_output_dir

    check_output_dir(out, overwrite)
    if not storage.path(workdir).is_dir():
        raise FileNotFoundError(f"--workdir {workdir} does not exist; pass a training workdir")
    steps = select_steps(complete_steps(workdir), last, workdir)
    config, mean = average_params(workdir, steps)
    with atomic_output_dir(out, overwrite) as tmp:
        save_params_checkpoint(tmp, config, mean, step=steps[-1])
        with open(tmp / "average.json", "w") as f:
            json.dump({"source": str(storage.absolute(workdir)), "steps": steps}, f, indent=2)
    return steps

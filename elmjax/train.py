"""Pretraining: `python -m elmjax.train --config=configs/tiny.py --workdir=DIR`.

Any config field can be overridden (`--config.train.steps=100`); the fields, their defaults
and allowed values are in elmjax/config.py (shared sections) and the model family's
`model_fields()` (elmjax/models/<family>/family.py); `--config=FILE --help` does not list
them, `python tools/count_params.py --config=FILE` shows a config's model. Re-running the same
command resumes from the newest complete checkpoint in DIR, which may be a gs:// URL
(`pip install -e '.[gcs]'`; see elmjax/storage.py). A local DIR takes one run at a time
(elmjax/training/workdir_lock.py). `--dry_run` compiles the step
for the configured mesh and reports memory instead of training. Multi-process: pass
--coordinator/--num_processes/--process_id, or --distributed on TPU pods / SLURM / GKE TPU,
where `jax.distributed.initialize()` finds them itself (launch/README.md). When a process of
a multi-process run is lost, the others exit within --failure_timeout seconds with exit code
75 (restart the job to resume); a run stopped by SIGTERM/SIGINT saves a checkpoint and exits
4 (not finished: rerun to resume).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import flags

from elmjax import cli, storage

cli.define_config_flag(cli.default_config_path("tiny.py"))
flags.DEFINE_string("workdir", None, "Run directory; default config.train.workdir or runs/<config name>.")
flags.DEFINE_bool("dry_run", False, "Compile the train step and report memory; do not train.")
flags.DEFINE_string("topology", None, "With --dry_run: compile for abstract TPU devices of this topology "
                    "(e.g. v5p:2x2x1) with the TPU compiler; needs libtpu (pip install -e '.[tpu]').")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detected cluster).")
flags.DEFINE_string("coordinator", None, "host:port of process 0, for a manual multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a manual multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a manual multi-process run.")
flags.DEFINE_list("local_device_ids", None, "GPU ids this process uses (e.g. 0,1,2,3,4,5,6,7 for one SLURM task "
                  "per node); default: jax's choice (under SLURM one GPU per task, SLURM_LOCALID).")
flags.DEFINE_integer("failure_timeout", 30, "Seconds after which a lost or hanging peer process ends every "
                     "process of a multi-process run (one line, exit code 75; launch/README.md).")
FLAGS = flags.FLAGS

def _check_distributed_flags() -> None:
    """The multi-process flags' one-line errors, before any process is started."""
    if FLAGS.failure_timeout < 1:
        cli.fail(f"--failure_timeout is {FLAGS.failure_timeout}; need >= 1 (seconds)")
    if FLAGS.local_device_ids and not all(i.strip().isdigit() for i in FLAGS.local_device_ids):
        cli.fail(f"--local_device_ids is {','.join(FLAGS.local_device_ids)}; need device numbers like 0,1,2,3")


def _init_distributed() -> None:
    if not (FLAGS.coordinator or FLAGS.distributed):
        return
    from elmjax.training import peers

    local_ids = [int(i) for i in FLAGS.local_device_ids] if FLAGS.local_device_ids else None
    if FLAGS.coordinator:
        peers.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, local_ids, FLAGS.failure_timeout)
    else:  # the cluster (SLURM, TPU VM, GKE, ...) names the coordinator and this process
        peers.initialize(local_device_ids=local_ids, failure_timeout=FLAGS.failure_timeout)


def _quiet_libraries() -> None:
    """Orbax logs every save step at INFO through absl; keep the console to our lines."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)


def _enable_compilation_cache() -> None:
    """Persistent XLA cache, so re-running or resuming a run skips most of the compile.
    ELMJAX_COMPILATION_CACHE sets the directory; an empty value turns it off."""
    import jax

    directory = os.environ.get("ELMJAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "elmjax" / "xla"))
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _default_workdir(config):
    if config.train.workdir:
        return storage.path(config.train.workdir)
    config_path = getattr(FLAGS["config"], "config_filename", None) or "run"
    return storage.path(Path("runs") / Path(str(config_path).split(":")[0]).stem)


def main(argv) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]}; flags take the form --name=value")
    from elmjax.config import validate

    config = validate(FLAGS.config, reads_inputs=not FLAGS.dry_run)
    _check_distributed_flags()
    from elmjax.training import supervisor

    if (FLAGS.coordinator or FLAGS.distributed) and not FLAGS.dry_run and not supervisor.is_child():
        # A parent process that turns JAX's abort when process 0 dies into our one line.
        workdir = Path(FLAGS.workdir) if FLAGS.workdir else _default_workdir(config)
        raise SystemExit(supervisor.run(workdir, FLAGS.num_processes))
    from elmjax.training import host_memory

    # Before anything starts the XLA backend and its threads (see elmjax/training/host_memory.py).
    # A dry run runs no step on the host: its compiler threads keep the system allocator.
    if not FLAGS.dry_run:
        host_memory.apply(config.train.reuse_host_memory)
    _quiet_libraries()
    if not FLAGS.dry_run:  # a dry run reports compile time; and a TPU executable cannot be read back here
        _enable_compilation_cache()
    _init_distributed()
    if FLAGS.dry_run:
        from elmjax.training.dry_run import dry_run

        dry_run(config, topology=FLAGS.topology)
        return
    if FLAGS.topology:
        cli.fail("--topology needs --dry_run: it compiles for TPU chips that are not here")
    # A line per print also into a pipe or a log collector (which get 8 KiB blocks by default):
    # progress shows as it happens, and a closed pipe is noticed at the next line.
    sys.stdout.reconfigure(line_buffering=True)
    workdir = storage.path(FLAGS.workdir) if FLAGS.workdir else _default_workdir(config)
    if not FLAGS.workdir:
        print(f"no --workdir given; using {workdir}")
    from elmjax.training.loop import train

    try:
        last = train(config, workdir)
    except FloatingPointError as error:  # train.nonfinite=abort: exit 3, not a config problem
        if FLAGS.debug:
            raise
        cli.fail(str(error), code=3)
    except Exception as error:  # a collective's (a save's too), when a peer was lost: the line says which
        from elmjax.training import peers
        from elmjax.training.checkpoint_errors import SaveFailedError

        if not isinstance(error, cli.user_errors()) or isinstance(error, SaveFailedError):
            peers.exit_if_a_peer_was_lost(workdir)
        raise
    if last.get("stopped"):  # saved but not finished: a rerun resumes
        from elmjax.training.loop import STOPPED_EXIT

        raise SystemExit(STOPPED_EXIT)


if __name__ == "__main__":
    cli.run(main)

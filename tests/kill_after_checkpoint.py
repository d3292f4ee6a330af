"""`python -m elmjax.train`, killed like a preemption without warning (SIGKILL): once the
checkpoint of step K (env KILL_AFTER_CHECKPOINT=K) is on disk and step K+1 has run.

    python tests/kill_after_checkpoint.py --config=... --workdir=DIR [--config.x=...]

The fault is injected here, around the real command, so the training loop carries no test hooks.
"""
import os
import signal
import sys
import time

from absl import app

from elmjax import storage
from elmjax import train as command
from elmjax.training import setup


def kill_after_checkpoint(step: int, workdir) -> None:
    """Wraps the loop's per-step batch placement: fetching step K+2's batch waits for
    checkpoint K to be finalised and then SIGKILLs the process. WORKDIR may be gs://."""
    # Orbax writes it last, locally into the temporary directory it then renames into place
    # and on GCS into the step itself: its presence means the step is finalised either way.
    marker = storage.path(workdir) / "checkpoints" / str(step) / "commit_success.txt"
    place_batch = setup.global_batch
    calls = 0

    def global_batch(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == step + 2:
            while not marker.exists():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return place_batch(*args, **kwargs)

    setup.global_batch = global_batch


if __name__ == "__main__":
    workdir = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--workdir="))
    kill_after_checkpoint(int(os.environ["KILL_AFTER_CHECKPOINT"]), workdir)
    app.run(command.main)

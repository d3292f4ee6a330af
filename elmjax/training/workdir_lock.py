"""One training run per workdir: process 0 holds an advisory lock on WORKDIR/.train.lock for as
long as it trains, so a second run started into the same workdir stops in one line instead of
writing interleaved checkpoints and metrics.

The lock is the kernel's (`fcntl.flock`), so it goes with the process: a run that was killed
leaves nothing to clean up. gs:// workdirs, and file systems without such locks, are not
locked (the second run is then not detected).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket

from elmjax import storage
from elmjax.training.checkpoint_errors import CheckpointError

LOCK_NAME = ".train.lock"


@contextlib.contextmanager
def holding(workdir):
    """Holds WORKDIR's lock for the block; CheckpointError (naming the holder) when another run has it."""
    if storage.is_remote(workdir):
        yield
        return
    path = os.path.join(storage.absolute(workdir), LOCK_NAME)
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise CheckpointError(f"cannot open the workdir's lock file {path} ({error.strerror or error}); fix its "
                              "permissions or train in another --workdir") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise CheckpointError(f"workdir {workdir} is in use by another training run ({holder}); wait for it "
                                  "to end, or train in another --workdir") from None
        except OSError:  # no locks on this file system: train unlocked
            pass
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock

"""Multi-process runs that fail cleanly: when a process dies or hangs, every other process
exits within a bounded time with one line and exit code `PEER_LOST_EXIT`, so a launcher can
restart the job (which resumes from the last checkpoint).

Both bounded by `failure_timeout` seconds (`--failure_timeout`, default 30), in `Watchdog`:

- A process that dies: JAX's coordination service (in process 0) stops hearing its
  heartbeats and, after `heartbeat_timeout_seconds` (= failure_timeout), no longer lists it
  as live. By default JAX would then abort every other process with a C++ `LOG(FATAL)` (a
  stack trace, up to 100 s late); `initialize` turns on JAX's recoverable mode, where the
  service only reports the task as dead, and the watchdog asks the service which processes
  are live (once a second) and exits with the line naming the lost one.
- A process that hangs (alive, so its heartbeats go on) stalls every process in the next
  collective: the watchdog notices that no step finished for max(2 x failure_timeout, 5 x
  the slowest step so far) and exits the same way. (Twice the timeout: a process that died
  also stops the steps, and the peer check, which names it, needs up to the timeout plus a
  heartbeat to notice; the stall check must not win that race.) The step check is paused while compiling,
  saving and evaluating, and armed from the first finished step.
- A process whose collective fails in its main thread (Gloo's "Connection closed by peer",
  also inside a checkpoint save) would print that exception: `exit_if_a_peer_was_lost`
  asks the service first, and a lost peer gets the same line.

When process 0 (which hosts the service) dies, the others' next RPC to it fails at once and
JAX aborts them itself (C++ stack trace, SIGABRT); JAX offers no way to replace that from
Python (its client callback cannot take a Python function: converting the status fails).
elmjax/training/supervisor.py, a parent process, turns that abort into the same line.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": the job can be
# restarted as it is (2 = a user error, 3 = non-finite loss; see elmjax/train.py).
PEER_LOST_EXIT = 75
DEFAULT_FAILURE_TIMEOUT = 30

_settings = {"failure_timeout": None, "steps_over": False}


def initialize(coordinator=None, num_processes=None, process_id=None, local_device_ids=None,
               failure_timeout: int = DEFAULT_FAILURE_TIMEOUT) -> None:
    """`jax.distributed.initialize` (arguments left None are auto-detected: SLURM, TPU VMs,
    GKE, ...) with a heartbeat timeout of `failure_timeout`, in JAX's recoverable mode: the
    coordination service then reports a dead process as no longer live instead of aborting
    every other process, and `Watchdog` turns that into the one-line exit."""
    import jax

    # CPU processes need a collectives backend; this setting does not affect accelerators.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)
    _settings["failure_timeout"] = failure_timeout
    jax.distributed.initialize(
        coordinator, num_processes, process_id, local_device_ids=local_device_ids,
        heartbeat_timeout_seconds=failure_timeout,
        shutdown_timeout_seconds=max(failure_timeout, 60),
    )
    if jax.process_index() == 0 and jax.process_count() > 1:
        # Registered after JAX's own exit handler, so it runs before JAX shuts down.
        atexit.register(_outlive_the_others, failure_timeout)


def _client():
    """JAX's coordination-service client (None without jax.distributed). It is not public
    API; jax.experimental.multihost_utils reaches it the same way."""
    from jax._src import distributed as jax_distributed

    return getattr(jax_distributed.global_state, "client", None)


def last_saved(workdir) -> str:
    """'step N (WORKDIR/checkpoints/N)', or that there is none yet."""
    if workdir is None:
        return "unknown (no workdir yet)"
    from elmjax.training import checkpoint as ckpt

    try:
        step = ckpt.latest_complete_step(workdir)
    except OSError:
        step = None
    return "none yet" if step is None else f"step {step} ({ckpt.checkpoint_dir(workdir) / str(step)})"


_exiting = threading.Lock()  # the watchdog and the main thread may both find the lost peer


def exit_now(what: str, workdir) -> None:
    """Prints the one line (what happened, WORKDIR's last saved step, the exit code) and
    exits at once: the main thread may be blocked in a collective that will never finish.
    A second caller waits for the first to end the process."""
    if not _exiting.acquire(blocking=False):
        while True:
            time.sleep(60)
    line = (f"error: {what}; the last saved step is {last_saved(workdir)}; restart the "
            f"job to resume from it (exit code {PEER_LOST_EXIT})")
    try:
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
    finally:
        os._exit(PEER_LOST_EXIT)


class Watchdog:
    """Ends this process (`exit_now`) when the coordination service no longer lists a peer as
    live, or when no training step finishes for max(2 x timeout, 5 x slowest step) seconds while
    the step check is armed (from the first `step_done`, outside `paused()`). Inactive when
    `timeout` is None (one process)."""

    def __init__(self, timeout: float | None, workdir=None, client=None, process_count: int = 1):
        self.timeout = timeout
        self.workdir = workdir  # whose last saved step the line names
        self._last = None  # monotonic time of the last finished step; None = disarmed
        self._slowest = 0.0
        self._step = 0
        self._stopped = threading.Event()
        if not timeout:
            return
        threading.Thread(target=self._watch_steps, name="elmjax-step-watchdog", daemon=True).start()
        if client is not None:
            threading.Thread(target=self._watch_peers, args=(client, process_count),
                             name="elmjax-peer-watchdog", daemon=True).start()

    def limit(self) -> float:
        return max(2 * (self.timeout or 0), 5 * self._slowest)

    def step_done(self, step: int) -> None:
        now = time.monotonic()
        if self._last is not None:
            self._slowest = max(self._slowest, now - self._last)
        self._last, self._step = now, step

    @contextlib.contextmanager
    def paused(self):
        """Compiling, saving and evaluating are not steps: no step limit while they run (a
        lost peer is still noticed)."""
        last, self._last = self._last, None
        try:
            yield
        finally:
            self._last = time.monotonic() if last is not None else None

    def stop(self) -> None:
        self._stopped.set()
        _settings["steps_over"] = True

    def _watch_steps(self) -> None:
        while not self._stopped.wait(1.0):
            last = self._last
            if last is not None and time.monotonic() - last > self.limit():
                exit_now(f"no training step finished for {self.limit():.0f} s after step {self._step}: "
                         "a process hangs (e.g. in a collective) or was lost", self.workdir)

    def _watch_peers(self, client, process_count: int) -> None:
        everyone = list(range(process_count))
        # GetAliveTasks is a barrier of the live tasks: it returns once each live process has
        # asked, and a process counts as dead `timeout` seconds after its last heartbeat.
        while not self._stopped.wait(1.0):
            try:
                live = client.get_live_nodes(everyone)
            except Exception:  # noqa: BLE001 - the service is gone; JAX itself ends the process
                return
            lost = sorted(set(everyone) - set(live))
            if lost and not self._stopped.is_set():  # not a peer that finished normally
                exit_now(_lost(lost, process_count, self.timeout), self.workdir)


def watch(workdir) -> Watchdog:
    """The watchdog of a run in `workdir` (inactive with one process or without
    `initialize`)."""
    import jax

    if jax.process_count() == 1 or _settings["failure_timeout"] is None:
        return Watchdog(None)
    return Watchdog(_settings["failure_timeout"], workdir, _client(), jax.process_count())


def exit_if_a_peer_was_lost(workdir) -> None:
    """Before an error ends this process of a multi-process run: a failed collective (e.g.
    Gloo's "Connection reset by peer", raised as such or inside a checkpoint save) means a
    peer was lost, most likely. Asks the coordination service which processes are live (at
    most twice the failure timeout: a dead one is dropped once its heartbeat lapses) and, if
    one is not, ends this process with the watchdog's one line naming it. Returns when every
    process is live (the error is this process's own, for the caller to raise), and once the
    training steps are over."""
    import jax

    client, timeout = _client(), _settings["failure_timeout"]
    if client is None or not timeout or jax.process_count() == 1 or _settings["steps_over"]:
        return  # after the steps the others may have finished and disconnected: not lost
    everyone, answer = list(range(jax.process_count())), []

    def ask():
        try:
            answer.append(client.get_live_nodes(everyone))
        except Exception:  # noqa: BLE001 - the service is gone (process 0 lost): JAX ends this process
            pass

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(2 * timeout + 1)
    lost = sorted(set(everyone) - set(answer[0])) if answer else []
    if lost:
        exit_now(_lost(lost, len(everyone), timeout), workdir)


def _lost(lost: list[int], process_count: int, timeout: float) -> str:
    return (f"lost process {', '.join(map(str, lost))} of {process_count} (no heartbeat for {timeout} s: it died, "
            "or its host or network failed)")


def _outlive_the_others(timeout: float) -> None:
    """At the exit of process 0, which hosts the coordination service: wait (at most
    `timeout` seconds) until the other processes have disconnected. In recoverable mode
    JAX's shutdown does not wait for them, and a process whose service vanishes while it is
    still connected is aborted by JAX, e.g. after an error that every process raises."""
    import jax

    client = _client()
    if client is None:
        return
    everyone = list(range(jax.process_count()))
    deadline = time.monotonic() + timeout

    def wait():
        # GetAliveTasks returns once each live listed task has asked too: the others' own
        # watchdogs may answer it; otherwise it returns when they have disconnected.
        while time.monotonic() < deadline and len(client.get_live_nodes(everyone)) > 1:
            time.sleep(0.1)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(max(0.0, deadline - time.monotonic()))

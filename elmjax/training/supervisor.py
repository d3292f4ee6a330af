"""A parent for each process of a multi-process run, for the one failure JAX handles itself.

When process 0 (which hosts JAX's coordination service) dies, JAX aborts every other process
at once: a fatal log line, a C++ stack trace and Python's dump of every thread, by SIGABRT.
Python cannot replace that reaction (elmjax/training/peers.py). So `python -m elmjax.train`
with --coordinator or --distributed runs its own command line again as a child (marked by
ELMJAX_SUPERVISED=1) and stays as its parent:

- the child's stdout is the parent's (inherited); its stderr passes through line by line
  until JAX's "Terminating process because the JAX distributed service detected fatal
  errors", after which the rest (the stack dumps) is dropped;
- SIGTERM and SIGINT are passed on (the loop saves a checkpoint on them);
- the parent exits as the child did, except after JAX's fatal error, where it prints the
  one line of peers.exit_now (naming process 0 and the last saved step) and exits 75.

The child dies with its parent (PR_SET_PDEATHSIG, Linux), so killing the parent (as a
launcher does) kills the run.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

MARK = "ELMJAX_SUPERVISED"
_JAX_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
_RECOVERABLE_NOTICE = b"Using experimental recoverable task feature"
# glog lines (W/E + date) of JAX's coordination client and preemption watcher, and the
# gRPC detail lines that continue them.
_SERVICE_LOG = re.compile(rb"^([WE]\d{4} .*(coordination_service_agent|preemption_sync_manager)\.cc|"
                          rb"Additional GRPC error information|:UNKNOWN:Error received from peer)")


def is_child() -> bool:
    return os.environ.get(MARK) == "1"


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG=1)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the child outlives a killed parent
        pass


def _pass_stderr(stream, fatal: list) -> None:
    """Copies the child's stderr to ours until JAX's fatal line (kept in `fatal`). JAX's log
    lines about the failing service just before it are held back and dropped with it, and
    its notice that recoverable mode (which elmjax turns on) is experimental is dropped."""
    held = []
    for line in stream:
        if not fatal and _JAX_FATAL in line:
            fatal.append(line)
        if fatal or _RECOVERABLE_NOTICE in line:
            continue
        if _SERVICE_LOG.match(line):
            held.append(line)
            continue
        sys.stderr.buffer.write(b"".join(held) + line)
        sys.stderr.buffer.flush()
        held.clear()
    if held and not fatal:
        sys.stderr.buffer.write(b"".join(held))
        sys.stderr.buffer.flush()


def run(workdir, process_count: int | None) -> int:
    """Runs this command line as a supervised child; returns the exit code to exit with
    (after a death by signal, the parent dies by the same signal instead)."""
    child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env={**os.environ, MARK: "1"},
                             stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    fatal = []  # JAX's fatal line, once seen
    reader = threading.Thread(target=_pass_stderr, args=(child.stderr, fatal), daemon=True)
    reader.start()
    code = child.wait()
    # The rest of the child's output; not until end of file, which processes the child left
    # behind (data-loader workers) could hold back.
    reader.join(timeout=5)
    if fatal:
        fatal = fatal[0]
        from elmjax.training import peers

        of = f" of {process_count}" if process_count else ""
        if b"coordination service" in fatal and (b"leader task" in fatal or b"Failed to send RPC" in fatal):
            what = f"lost process 0{of} (the coordinator, which hosts JAX's coordination service)"
        else:
            what = f"JAX's distributed service reported a fatal error ({fatal.decode(errors='replace').strip()[:200]})"
        peers.exit_now(what, workdir)
    if code < 0:  # end as the child ended, so a launcher sees the same signal
        if -code in (signal.SIGTERM, signal.SIGINT):  # ours forward; SIGKILL has no handler
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code

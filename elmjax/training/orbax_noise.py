"""What orbax prints that elmjax reports itself, dropped: its warnings about item metadata,
and the echoes of a restore that failed (reads still in flight failing after it gave up).
Importing this module installs the logging filters; `drop_failed_read_echoes()` the hook."""
from __future__ import annotations

import logging
import sys


class _NoItemMetadataWarning(logging.Filter):
    """Orbax warns on every read of a step's `state` item that the item has no
    `_CHECKPOINT_METADATA` of its own; the step directory has it, so the warning says nothing.
    Its warning that a damaged `_METADATA` could not be read is dropped too: the restore then
    fails, and that error names the step and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Metadata file does not exist" not in message and "Failed to get item metadata" not in message


logging.getLogger("absl").addFilter(_NoItemMetadataWarning())

# What orbax's reads still in flight raise once a restore has failed (see below).
_FAILED_READ_ECHOES = ("Event loop is closed", "Encountered error while reading array index")


def _is_failed_read_echo(error: BaseException | None) -> bool:
    """Whether `error`, or an exception it came from, is one of a failed restore's echoes."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if str(error).startswith(_FAILED_READ_ECHOES):
            return True
        error = error.__cause__ or error.__context__
    return False


class _NoFailedReadEchoes(logging.Filter):
    """asyncio logs the reads' tasks that failed after the restore gave up ("Task exception was
    never retrieved", with a traceback): echoes of the failure the caller reports once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_failed_read_echo(record.exc_info[1]))


logging.getLogger("asyncio").addFilter(_NoFailedReadEchoes())


def drop_failed_read_echoes() -> None:
    """Orbax's restore stops at the first array it cannot read and closes its event loop; the
    reads still in flight then fail in TensorStore's threads, and Python prints each as an
    ignored exception with its traceback (over a hundred for one truncated file). The failure
    is reported once by the caller, so these echoes are dropped. Installed at each restore,
    over whatever hook is current (a test runner may have replaced it); anything else still
    goes to that hook. It stays for the process: an "Event loop is closed" that another
    library's callbacks hit later is dropped too (Python was ignoring it there as well)."""
    current = sys.unraisablehook
    if getattr(current, "drops_failed_read_echoes", False):
        return

    def hook(unraisable):
        if not _is_failed_read_echo(unraisable.exc_value):
            current(unraisable)

    hook.drops_failed_read_echoes = True
    sys.unraisablehook = hook

"""Where a run's files live: a local path or a gs:// URL, behind one small interface.

Everything that touches a workdir goes through `path()`, which gives an `etils.epath.Path`:
pathlib's API for local files, gcsfs (fsspec) behind gs:// URLs. Orbax takes the same paths
(its arrays go through tensorstore's own GCS driver). The few operations whose meaning differs
on object storage have a helper here instead of an `if gs://` at each caller:

  - `write_text`: replace a file whole. Locally a temporary file is renamed over it; on GCS
    one object upload is already all-or-nothing (readers see the old object or the new one).
  - `AppendFile` (metrics.jsonl): GCS objects cannot be appended to, so each write uploads
    the new lines as a small object and composes [file, new lines] into the file; a compose
    replaces the object atomically, so a killed run leaves every line it had written.
  - `move` (setting a damaged checkpoint step aside): one rename locally. GCS has no directory
    rename: the objects are copied, then the originals deleted. An interrupted move leaves the
    original (still incomplete, so set aside again by the next run) plus a partial copy under
    a name that is not a step number, which nothing reads.
  - `is_remote`: free-space and permission checks only mean something for local disks.

Checkpoint steps keep their atomicity from orbax: locally a temporary directory renamed when
complete, on GCS a `commit_success.txt` written last (elmjax/training/checkpoint.py reads it).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

from etils import epath

from elmjax.validation import first_line

GCS_PREFIX = "gs://"


class StorageError(RuntimeError):
    """A path cannot be used (missing package, unreachable bucket); the message says the fix."""


def is_remote(location) -> bool:
    """Whether `location` (a str or path) is on object storage rather than a local disk."""
    return str(location).startswith(GCS_PREFIX)


def require_gcs(location) -> None:
    """Raises StorageError naming the install command when gs:// cannot be read here."""
    if importlib.util.find_spec("gcsfs") is None:
        raise StorageError(f"{location} is on Google Cloud Storage, which needs gcsfs: "
                           "pip install 'elmjax[gcs]' (or pip install gcsfs)")


def path(location) -> epath.Path:
    """A local path (with ~ expanded) or a gs:// URL as an epath.Path; other URL schemes are
    refused, since nothing here is tested with them."""
    text = os.fspath(location) if not isinstance(location, str) else location
    if is_remote(text):
        require_gcs(text)
        return epath.Path(text)
    if "://" in text:
        raise StorageError(f"{text}: only local paths and gs:// URLs are supported for run files")
    return epath.Path(os.path.expanduser(text))


def absolute(location) -> epath.Path:
    """`location` made absolute (orbax needs that for local paths); gs:// URLs already are
    (epath's `absolute()` would glue the working directory in front of them)."""
    p = path(location)
    return p if is_remote(p) else p.absolute()


@functools.cache
def _configure_gcsfs() -> None:
    """No listing cache for gcsfs: a run's files are also written by tensorstore (orbax's
    arrays, token stores), which gcsfs cannot see, so a cached listing would hide new steps."""
    import fsspec

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


_configure_gcsfs()  # before any gcsfs instance exists (epath and fsspec share the instance)


def _gcs():
    """The gcsfs filesystem epath uses for gs:// (the same cached instance)."""
    import fsspec

    return fsspec.filesystem("gcs", finalize_on_close=True)


def check_bucket(location) -> None:
    """Raises StorageError when the bucket of a gs:// `location` cannot be reached or does not
    exist: one line at the start of a run instead of a stack trace at its first write."""
    if not is_remote(location):
        return
    require_gcs(location)
    bucket = str(location)[len(GCS_PREFIX):].split("/", 1)[0]
    # gcsfs logs each failed attempt of its retries with a traceback; the error below is the
    # one line that says it (after the retries: about a minute when the host is unreachable).
    gcsfs_log = logging.getLogger("gcsfs")
    level = gcsfs_log.level
    gcsfs_log.setLevel(logging.CRITICAL)
    try:
        found = _gcs().exists(bucket)
    except Exception as error:  # noqa: BLE001 - auth, network and HTTP errors all end the same way
        raise StorageError(f"cannot reach bucket gs://{bucket} ({type(error).__name__}: {first_line(error)}); check "
                           "the network and credentials (gcloud auth application-default login)") from None
    finally:
        gcsfs_log.setLevel(level)
    if not found:
        raise StorageError(f"bucket gs://{bucket} does not exist or these credentials cannot see it; "
                           f"create it (gcloud storage buckets create gs://{bucket}) or use another path")


def write_text(location, text: str) -> None:
    """Replaces the file at `location` with `text` as one step (see the module docstring)."""
    write_bytes(location, text.encode())


def write_bytes(location, payload: bytes) -> None:
    """Replaces the file at `location` with `payload` as one step (see the module docstring)."""
    p = path(location)
    if is_remote(p):
        p.write_bytes(payload)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")  # open() keeps the umask's file mode
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, p)


def move(source, target) -> None:
    """Moves a file or directory tree (see the module docstring for GCS)."""
    source, target = path(source), path(target)
    if not is_remote(source):
        source.rename(target)
        return
    fs = _gcs()
    # gcsfs's own move tries an API that emulators lack and then falls back to this anyway.
    fs.copy(str(source), str(target), recursive=True)
    fs.rm(str(source), recursive=True)


class AppendFile:
    """A text file that grows by whole writes: append mode locally, compose on GCS."""

    def __init__(self, location):
        self.path = path(location)
        self._local = None
        if not is_remote(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._local = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps its lines
            return
        self._key = str(self.path)
        self._piece = self._key + ".append"  # the lines of one write, until composed in
        self._exists = _gcs().exists(self._key)

    def write(self, text: str) -> None:
        if self._local is not None:
            self._local.write(text)
            return
        fs = _gcs()
        if not self._exists:
            fs.pipe_file(self._key, text.encode())
            self._exists = True
            return
        fs.pipe_file(self._piece, text.encode())
        fs.merge(self._key, [self._key, self._piece])  # GCS compose: the object is replaced at once
        fs.rm_file(self._piece)

    def close(self) -> None:
        if self._local is not None:
            self._local.close()

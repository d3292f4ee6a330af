"""bench/cpu_step_profile.py: the CPU train step's kernel times, named from the compiled HLO."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_names_the_kernels_of_one_step_and_their_shares_add_up():
    result = subprocess.run([sys.executable, "bench/cpu_step_profile.py", "--model=tiny", "--batch=2", "--seq=64"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\s*([\d.]+) ms\s+([\d.]+)%  (.+)$", result.stdout, re.M)
    categories = {name for _, _, name in rows}
    # the profiler saw kernels the HLO names (not only runtime spans), the matmuls among them
    assert "matrix products (dot kernels)" in categories
    assert "optimizer update (the finite-step conditional, wall time)" in categories
    assert abs(sum(float(share) for _, share, _ in rows) - 100.0) < 0.5
    traced = float(re.search(r"wall, (\d+) ms in the kernels below", result.stdout).group(1))
    assert abs(sum(float(ms) for ms, _, _ in rows) - traced) <= len(rows)

"""Numbers the README states come from commands in the repository."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_unigram_baseline_in_the_readme_is_what_its_command_prints():
    result = subprocess.run([sys.executable, "bench/unigram_baseline.py", "--config=configs/tiny.py"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    held_out = float(re.search(r"unigram held-out loss: ([\d.]+) nats", result.stdout).group(1))
    entropy = float(re.search(r"unigram entropy of the training stream: ([\d.]+) nats", result.stdout).group(1))
    readme = (ROOT / "README.md").read_text()
    assert f"against {held_out:.2f} for a unigram model" in readme
    assert f"unigram entropy of the training stream: {entropy:.2f} nats" in readme

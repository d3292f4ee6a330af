"""bench/cpu_step_profile.py: the CPU train step's kernel times, named from the compiled HLO."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cpu_step_profile import category

ROOT = Path(__file__).resolve().parents[1]

ATTENTION = "attention scores: mask, softmax and their layout copies"


@pytest.mark.parametrize("shape, expected", [
    ("f32[4,5,4,256,256]", ATTENTION),  # [batch, kv heads, group, queries, keys]
    ("f32[4,4,1024,256]", ATTENTION),  # group folded into the queries
    ("f32[4,256]", "other forward elementwise work and copies"),  # a norm's or the loss's [batch, seq]
    ("f32[4,256,1280]", "other forward elementwise work and copies"),  # hidden states; 1280 = 5 x 256
])
def test_attention_scores_are_told_apart_from_tensors_that_merely_end_in_the_sequence_length(shape, expected):
    assert category(False, shape, "jit(run)/jvp()/div", 256) == expected


def test_the_optimizers_kernels_count_by_their_conditional_only():
    assert category(False, "f32[1280,1024]", "jit(run)/cond/branch_1_fun/add", 256) is None
    assert category(False, "", "", 256, name="cond.793").startswith("optimizer update")
    assert category(True, "f32[1024,1280]", "jit(run)/transpose(jvp())/dot_general", 256).startswith("matrix products")


def test_a_profile_of_tiny_names_its_kernels_from_the_hlo():
    result = subprocess.run([sys.executable, "bench/cpu_step_profile.py", "--model=tiny", "--batch=2", "--seq=64"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    shares = {name: float(share) for _, share, name in re.findall(r"^\s*([\d.]+) ms\s+([\d.]+)%  (.+)$", result.stdout, re.M)}
    assert shares.get("matrix products (dots and fusions around them)", 0) > 20  # the dots were found in the HLO
    assert "optimizer update (the finite-step conditional, wall time)" in shares
    assert shares.get("kernels the HLO dump does not name", 0) < 5

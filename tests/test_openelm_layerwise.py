"""Layer-wise scaling reproduces the published OpenELM shapes and parameter counts (SPEC §1)."""
import os
import subprocess
import sys

import pytest

from elmjax.config import load_config_file, validate
from elmjax.layers.decoder import abstract_model, count_params
from elmjax.models.openelm.layerwise import interpolate_multipliers, make_divisible, schedule_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
    return validate(load_config_file(os.path.join(ROOT, "configs", f"{name}.py")))


def expand(runs):
    return [value for value, count in runs for _ in range(count)]


SPEC_SCHEDULES = {
    "270m": (
        expand([(12, 5), (16, 7), (20, 4)]),
        expand([(3, 5), (4, 7), (5, 4)]),
        [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840, 4352, 4608, 4864, 5120],
    ),
    "450m": (
        expand([(12, 3), (16, 7), (20, 6), (24, 4)]),
        expand([(3, 3), (4, 7), (5, 6), (6, 4)]),
        [768, 1024, 1280, 1536, 1792, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, 4352, 4608,
         5120, 5376, 5632, 5888, 6144],
    ),
    "1_1b": (
        expand([(16, 3), (20, 7), (24, 8), (28, 6), (32, 4)]),
        expand([(4, 3), (5, 7), (6, 8), (7, 6), (8, 4)]),
        [1024, 1280, 1536, 1792, 2048, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, 4608, 4608,
         5120, 5376, 5632, 5888, 6144, 6400, 6656, 6912, 7168, 7424, 7680, 7936, 8192],
    ),
    "3b": (
        expand([(12, 4), (16, 14), (20, 12), (24, 6)]),
        expand([(3, 4), (4, 14), (5, 12), (6, 6)]),
        [1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 4096, 4352, 4608, 4864, 5120, 5632, 5888,
         6144, 6400, 6656, 7168, 7424, 7680, 7936, 8192, 8704, 8960, 9216, 9472, 9728, 10240,
         10496, 10752, 11008, 11264, 11776, 12032, 12288],
    ),
}

SPEC_PARAMS = {  # (vocab 32000, vocab 32128)
    "270m": (271_527_168, 271_691_008),
    "450m": (457_179_136, 457_375_744),
    "1_1b": (1_079_891_456, 1_080_153_600),
    "3b": (3_036_647_424, 3_037_040_640),
}


def test_make_divisible_rounds_to_nearest_multiple():
    assert make_divisible(640, 256) == 768  # 640 + 128 = 768 -> 768
    assert make_divisible(1400, 256) == 1280  # rounds down: 1280 >= 0.9 * 1400
    assert make_divisible(100, 256) == 256  # never below the divisor


def test_make_divisible_never_drops_more_than_ten_percent():
    # 1151 rounds to 1024 (int(1279) // 256 * 256), which is < 0.9 * 1151, so one divisor is added.
    assert make_divisible(1151, 256) == 1280


def test_multipliers_are_linspace_rounded_to_two_decimals():
    assert interpolate_multipliers((0.5, 4.0), 16)[:4] == [0.5, 0.73, 0.97, 1.2]
    assert interpolate_multipliers((0.5, 1.0), 3) == [0.5, 0.75, 1.0]


@pytest.mark.parametrize("variant", sorted(SPEC_SCHEDULES))
def test_per_layer_schedule_matches_spec(variant):
    query_heads, kv_heads, ffn_dims = SPEC_SCHEDULES[variant]
    schedule = schedule_from_config(load_config(variant).model)
    assert [s.num_query_heads for s in schedule] == query_heads
    assert [s.num_kv_heads for s in schedule] == kv_heads
    assert [s.ffn_dim for s in schedule] == ffn_dims


@pytest.mark.parametrize("variant", sorted(SPEC_PARAMS))
def test_parameter_count_matches_spec(variant):
    config = load_config(variant)
    assert count_params(abstract_model(config.model)) == SPEC_PARAMS[variant][0]
    config.model.vocab_size = 32128  # the padded training vocabulary
    assert count_params(abstract_model(config.model)) == SPEC_PARAMS[variant][1]


def test_count_params_tool_prints_params_line_and_schedule():
    result = subprocess.run(
        [sys.executable, "tools/count_params.py", "--config=configs/270m.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "params: 271527168"
    assert "trainable params: 271527168" in lines
    assert "family: openelm" in lines
    assert "query heads: 12x5, 16x7, 20x4" in lines
    assert "kv heads: 3x5, 4x7, 5x4" in lines


def test_count_params_tool_rejects_bad_config_with_field_name():
    result = subprocess.run(
        [sys.executable, "tools/count_params.py", "--config=configs/tiny.py", "--config.model.num_layers=0"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "model.num_layers" in result.stderr


def test_count_params_takes_the_dpo_recipe_before_its_preference_file_is_named():
    """The recipe leaves data.source to the user; counting reads no data (SPEC §1's count)."""
    result = subprocess.run(
        [sys.executable, "tools/count_params.py", "--config=configs/dpo_openelm_instruct.py:270m"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == "params: 271527168"

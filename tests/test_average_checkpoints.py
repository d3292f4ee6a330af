"""tools/average_checkpoints.py: the exact mean of the last K checkpoints, as a checkpoint."""
import json
import os

import numpy as np
import pytest

from elmjax.training.checkpoint import complete_steps, restore_params, save_params_checkpoint
from elmjax.convert.average import average_checkpoints
from elmjax.convert.export import export_checkpoint
from tests.export_support import random_params, tiny_config
from tools import average_checkpoints as average_tool

STEPS = (10, 20, 30, 40, 50, 60)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Six params-only checkpoints of one tiny model with different random weights."""
    path = tmp_path_factory.mktemp("run") / "workdir"
    config = tiny_config(num_layers=2, model_dim=64, head_dim=16, ffn_dim_divisor=32, vocab_size=512)
    for seed, step in enumerate(STEPS):
        save_params_checkpoint(path, config, random_params(config.model, seed=seed), step=step)
    return path, config


def flat(tree, prefix=""):
    """A pure params dict as {"layers/0/attn/qkv_proj/kernel": array}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def test_the_average_is_the_exact_mean_of_the_last_k(workdir, tmp_path):
    path, _ = workdir
    assert average_checkpoints(path, tmp_path / "avg", last=5) == list(STEPS[1:])
    stacked = [flat(restore_params(path, step=step)[1]) for step in STEPS[1:]]
    config, averaged = restore_params(tmp_path / "avg")
    averaged = flat(averaged)
    assert set(averaged) == set(stacked[0])
    for name, value in averaged.items():
        expected = np.mean(np.stack([s[name] for s in stacked]).astype(np.float64), axis=0).astype(np.float32)
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, expected, err_msg=name)
    assert complete_steps(tmp_path / "avg") == [STEPS[-1]]
    assert json.loads((tmp_path / "avg" / "average.json").read_text())["steps"] == list(STEPS[1:])
    assert config.model.to_json() == workdir[1].model.to_json()


def test_export_accepts_the_averaged_checkpoint(workdir, tmp_path):
    path, _ = workdir
    average_checkpoints(path, tmp_path / "avg", last=2)
    export_checkpoint(tmp_path / "avg", tmp_path / "hf", target="torch", with_tokenizer=False)
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_asking_for_more_checkpoints_than_exist_is_a_clear_error(workdir, tmp_path, capsys):
    path, _ = workdir
    code = average_tool.main(["--workdir", str(path), "--last", "7", "--out", str(tmp_path / "avg")])
    assert code == 2
    assert "--last 7 asks for more checkpoints than" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_workdir_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = average_tool.main(["--workdir", str(tmp_path / "empty"), "--out", str(tmp_path / "avg")])
    assert code == 2 and "no complete checkpoint under" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["empty"]


def test_an_existing_output_needs_overwrite(workdir, tmp_path, capsys):
    path, _ = workdir
    (tmp_path / "avg").mkdir()
    code = average_tool.main(["--workdir", str(path), "--last", "2", "--out", str(tmp_path / "avg")])
    assert code == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert os.listdir(tmp_path / "avg") == []
    code = average_tool.main(["--workdir", str(path), "--last", "2", "--out", str(tmp_path / "avg"), "--overwrite"])
    assert code == 0 and complete_steps(tmp_path / "avg") == [STEPS[-1]]

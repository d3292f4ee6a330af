"""Hugging Face OpenELM directory -> elmjax config and parameters."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from elmjax.training.checkpoint import complete_steps, restore_params, save_params_checkpoint
from elmjax.config import openelm_config
from elmjax.convert.export import export_checkpoint, export_params
from elmjax.convert.hf_import import HFConfigError, config_from_hf, load_hf_dir
from elmjax.data.tokenizer_choice import load_tokenizer
from tests.export_support import random_params, tiny_config
from tools import import_hf as import_tool

# Apple's OpenELM-270M config.json (the keys import reads; per-layer lists as published).
OPENELM_270M_CONFIG = {
    "model_type": "openelm",
    "activation_fn_name": "swish",
    "ffn_dim_divisor": 256,
    "ffn_multipliers": [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37, 2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0],
    "ffn_with_glu": True,
    "head_dim": 64,
    "max_context_length": 2048,
    "model_dim": 1280,
    "normalization_layer_name": "rms_norm",
    "normalize_qk_projections": True,
    "num_gqa_groups": 4,
    "num_kv_heads": [3] * 5 + [4] * 7 + [5] * 4,
    "num_query_heads": [12] * 5 + [16] * 7 + [20] * 4,
    "num_transformer_layers": 16,
    "qkv_multipliers": [0.5, 1.0],
    "rope_freq_constant": 10000,
    "share_input_output_layers": True,
    "vocab_size": 32000,
}


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(num_layers=4, model_dim=128, head_dim=16, ffn_dim_divisor=32, vocab_size=300)
    return config, random_params(config.model, seed=3)


def test_openelm_270m_config_json_gives_the_270m_model():
    model = config_from_hf(OPENELM_270M_CONFIG).model
    expected = openelm_config(num_layers=16, model_dim=1280, head_dim=64, peak_lr=5.3e-3).model
    for field in ("num_layers", "model_dim", "head_dim", "num_gqa_groups", "qkv_multipliers",
                  "ffn_multipliers", "ffn_dim_divisor", "vocab_size", "max_seq_len", "rope_theta",
                  "norm_eps", "qk_norm", "tie_embeddings"):
        assert tuple(np.atleast_1d(model[field])) == tuple(np.atleast_1d(expected[field])), field


def test_per_layer_heads_that_contradict_the_scaling_rule_are_a_clear_error():
    edited = dict(OPENELM_270M_CONFIG, num_query_heads=[12] * 6 + [16] * 6 + [20] * 4)
    with pytest.raises(HFConfigError, match=r"num_query_heads=.*differs from the layer-wise scaling rule"):
        config_from_hf(edited)


def test_per_layer_ffn_multipliers_that_contradict_the_rule_are_a_clear_error():
    multipliers = list(OPENELM_270M_CONFIG["ffn_multipliers"])
    multipliers[3] = 1.25
    with pytest.raises(HFConfigError, match="ffn_multipliers"):
        config_from_hf(dict(OPENELM_270M_CONFIG, ffn_multipliers=multipliers))


def test_a_non_openelm_config_is_refused():
    with pytest.raises(HFConfigError, match="model_type='llama'"):
        config_from_hf(dict(OPENELM_270M_CONFIG, model_type="llama"))


def test_an_elmjax_workdir_given_as_a_hugging_face_model_is_named_as_such():
    with pytest.raises(HFConfigError, match="an elmjax run's config.*needs no import"):
        config_from_hf(json.loads(tiny_config().to_json()))


def test_elmjax_to_hf_to_elmjax_is_bit_exact_in_float32(tiny, tmp_path):
    config, params = tiny
    # Sharded (many small files + index), so import's index reading is covered too.
    export_params(tmp_path / "hf", config.model, params, target="torch", max_shard_bytes=50_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    imported_config, imported = load_hf_dir(tmp_path / "hf")
    original = dict(nnx.to_flat_state(params))
    restored = dict(nnx.to_flat_state(imported))
    assert set(original) == set(restored)
    for path, variable in original.items():
        value = np.asarray(restored[path][...])
        assert value.dtype == np.float32, path
        np.testing.assert_array_equal(value, np.asarray(variable[...]), err_msg=str(path))
    for field in ("num_layers", "model_dim", "head_dim", "ffn_dim_divisor", "vocab_size", "max_seq_len"):
        assert imported_config.model[field] == config.model[field]


def test_bfloat16_weights_import_as_float32(tiny, tmp_path):
    config, params = tiny
    export_params(tmp_path / "hf", config.model, params, target="torch", dtype="bfloat16")
    _, imported = load_hf_dir(tmp_path / "hf")
    embedding = np.asarray(imported["token_embeddings"][...])
    assert embedding.dtype == np.float32
    expected = np.asarray(params["token_embeddings"][...]).astype(ml_dtypes.bfloat16).astype(np.float32)
    assert not np.array_equal(expected, np.asarray(params["token_embeddings"][...]))  # the rounding shows
    np.testing.assert_array_equal(embedding, expected)


def test_weights_that_do_not_match_config_json_are_a_clear_error(tiny, tmp_path):
    config, params = tiny
    export_params(tmp_path / "hf", config.model, params, target="torch")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf_config["vocab_size"] = 400  # the stored embedding has 300 rows
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(ValueError, match=r"token_embeddings has shape \(300, 128\); config.json implies \(400, 128\)"):
        load_hf_dir(tmp_path / "hf")


def test_a_directory_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(OPENELM_270M_CONFIG))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf_dir(tmp_path / "hf")


# --- tools/import_hf.py -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    """An HF directory (with tokenizer files) exported from a params-only checkpoint."""
    root = tmp_path_factory.mktemp("hf_export")
    config = tiny_config(num_layers=2, model_dim=64, head_dim=16, ffn_dim_divisor=32, vocab_size=512)
    params = random_params(config.model, seed=11)
    save_params_checkpoint(root / "workdir", config, params, step=3)
    export_checkpoint(root / "workdir", root / "hf", target="torch")
    return root, config


def test_import_tool_writes_a_checkpoint_with_the_same_params_and_tokenizer(hf_export, tmp_path, capsys):
    root, config = hf_export
    assert import_tool.main(["--hf", str(root / "hf"), "--out", str(tmp_path / "imported")]) == 0
    imported_config, imported = restore_params(tmp_path / "imported")
    _, original = restore_params(root / "workdir")
    assert complete_steps(tmp_path / "imported") == [0]
    np.testing.assert_array_equal(imported["token_embeddings"], original["token_embeddings"])
    np.testing.assert_array_equal(
        imported["layers"][1]["ffn"]["proj_1"]["kernel"], original["layers"][1]["ffn"]["proj_1"]["kernel"]
    )
    assert imported_config.data.tokenizer.startswith(str((tmp_path / "imported" / "tokenizer").absolute()))
    text = "Thou shalt not"
    assert load_tokenizer(imported_config).encode(text) == load_tokenizer(config).encode(text)


def test_import_tool_refuses_an_existing_out_and_a_missing_hf_dir(hf_export, tmp_path, capsys):
    root, _ = hf_export
    (tmp_path / "out").mkdir()
    assert import_tool.main(["--hf", str(root / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert import_tool.main(["--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "new")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == []


def test_exported_config_json_of_the_270m_model_matches_apples_lists():
    from elmjax.convert.hf import hf_config

    model = openelm_config(num_layers=16, model_dim=1280, head_dim=64, peak_lr=5.3e-3).model
    exported = hf_config(model)
    for key, value in OPENELM_270M_CONFIG.items():
        assert exported[key] == value, key


def test_a_quantized_mlx_directory_is_refused(tiny, tmp_path):
    config, params = tiny
    export_params(tmp_path / "q4", config.model, params, target="mlx", quantize=4, group_size=32)
    with pytest.raises(HFConfigError, match="holds mlx-lm quantized weights"):
        load_hf_dir(tmp_path / "q4")

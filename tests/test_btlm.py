"""The BTLM family (SPEC §3): ALiBi against transformers' BLOOM, the 3B config's parameter
count, config errors, and Cerebras' Hugging Face layout checked by a PyTorch forward written
here from SPEC §3's formulas alone."""
import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file
from transformers.models.bloom.modeling_bloom import (
    _get_alibi_slopes,
    build_alibi_tensor,
)

from configs.btlm_3b_8k import get_config as btlm_3b_config
from elmjax import trainable
from elmjax.config import ConfigError, family_config, validate
from elmjax.convert.export import export_params
from elmjax.convert.hf_import import load_hf_dir
from elmjax.kernels.reference import alibi_bias
from elmjax.layers.decoder import abstract_model
from elmjax.layers.positions import alibi_slopes
from elmjax.tree import path_name
from tests.export_support import logits as elmjax_logits

HEAD_COUNTS = (32, 12, 20)


# ---- ALiBi ------------------------------------------------------------------------------


def exact_slopes(num_heads):
    """SPEC §3 in float64: 2^(-8h/n) for the nearest lower power of two n, then every other
    slope of the 2n set, each rounded once to float32."""
    def power_of_two(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    lower = 2 ** int(np.floor(np.log2(num_heads)))
    slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: num_heads - lower]
    return np.asarray(slopes, np.float32)


def cerebras_slopes(num_heads):
    """What Cerebras' `AlibiPositionEmbeddingLayer._get_alibi_slopes` stores (SPEC §3's rule
    as `start * ratio**i` in Python floats), as a float32 tensor."""
    def power_of_two(n):
        start = 2 ** (-(2 ** -(np.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    lower = 2 ** int(np.floor(np.log2(num_heads)))
    return np.asarray(power_of_two(lower) + power_of_two(2 * lower)[0::2][: num_heads - lower], np.float32)


# BLOOM raises a float32-rounded base to the power h in float32, so its slope h carries up to
# h times the base's rounding error (2^-24 relative): at most n_heads x 2^-24 for n_heads.
def bloom_tolerance(num_heads):
    return num_heads * 2.0**-24


@pytest.mark.parametrize("num_heads", HEAD_COUNTS)
def test_alibi_slopes_are_specs_cerebras_and_blooms(num_heads):
    ours = np.asarray(alibi_slopes(num_heads))
    np.testing.assert_array_equal(ours, exact_slopes(num_heads))  # correctly rounded
    np.testing.assert_array_equal(ours, cerebras_slopes(num_heads))  # what BTLM's checkpoint stores
    bloom = _get_alibi_slopes(num_heads, torch.device("cpu")).numpy()
    np.testing.assert_allclose(ours, bloom, rtol=bloom_tolerance(num_heads), atol=0)


@pytest.mark.parametrize("num_heads", HEAD_COUNTS)
def test_alibi_bias_gives_blooms_attention(num_heads):
    """BLOOM's tensor is `slope * key_position` (the query's own `-slope * i` is a constant
    per row, which softmax ignores): ours differs from it by exactly that constant, and both
    give the same causal attention weights."""
    seq = 24
    mask = torch.ones(1, seq, dtype=torch.long)
    bloom = build_alibi_tensor(mask, num_heads, torch.float32).reshape(num_heads, seq).numpy()
    positions = np.arange(seq)
    ours = np.asarray(alibi_bias(alibi_slopes(num_heads), positions, positions))  # [heads, q, k]
    slopes = np.asarray(alibi_slopes(num_heads))
    np.testing.assert_allclose(ours + slopes[:, None, None] * positions[None, :, None],
                               np.broadcast_to(bloom[:, None, :], ours.shape),
                               rtol=bloom_tolerance(num_heads), atol=seq * 2e-7)
    logits = np.random.default_rng(0).normal(size=(num_heads, seq, seq)).astype(np.float32)
    causal = positions[None, :] <= positions[:, None]

    def attention(bias):
        scores = torch.tensor(np.where(causal, logits + bias, -np.inf))
        return torch.softmax(scores, dim=-1).numpy()

    np.testing.assert_allclose(attention(ours), attention(bloom[:, None, :]), atol=2e-6)


def test_alibi_bias_with_left_padding_matches_bloom_positions():
    """Decoding indexes ALiBi by cache slot; left padding shifts query and key slots alike,
    as BLOOM's cumulative-sum positions do."""
    heads, pad, seq = 12, 5, 16
    mask = torch.tensor([[0] * pad + [1] * (seq - pad)])
    bloom = build_alibi_tensor(mask, heads, torch.float32).reshape(heads, seq).numpy()
    slots = np.arange(seq)
    ours = np.asarray(alibi_bias(alibi_slopes(heads), slots, slots))
    real = slice(pad, seq)
    shifted = ours[:, real, real] + np.asarray(alibi_slopes(heads))[:, None, None] * (slots[real] - pad)[None, :, None]
    np.testing.assert_allclose(shifted, np.broadcast_to(bloom[:, None, real], shifted.shape),
                               rtol=bloom_tolerance(heads), atol=seq * 2e-7)


# ---- the 3B config ----------------------------------------------------------------------


def test_btlm_3b_config_is_specs_model_with_2_646_255_744_parameters():
    config = validate(btlm_3b_config())
    model = config.model
    assert (model.num_layers, model.model_dim, model.num_heads, model.head_dim) == (32, 2560, 32, 80)
    assert (model.ffn_dim, model.vocab_size, model.max_seq_len) == (6826, 50257, 8192)
    trainable_count, total = trainable.count(abstract_model(model), model)
    # The ALiBi slopes are derived, not parameters; with them (32 more) the count would differ.
    assert trainable_count == total == 2_646_255_744


def test_count_params_tool_prints_the_spec_count():
    from tools.count_params import describe

    assert describe(validate(btlm_3b_config()))[0] == "params: 2646255744"


def test_btlm_3b_uses_the_mup_multipliers_of_spec():
    from elmjax import mup

    model = validate(btlm_3b_config()).model
    assert mup.width_scale(model) == pytest.approx(0.1)
    assert mup.logit_multiplier(model) == pytest.approx(0.222)
    assert mup.attention_scale(model) == 1 / 80
    assert model.embedding_scale == 14.6


def small_config(**overrides):
    fields = dict(
        num_layers=2, model_dim=48, head_dim=8, num_heads=6, ffn_dim=40, vocab_size=96, max_seq_len=64,
        norm_type="layer_norm", norm_eps=1e-5, qk_norm="none", position_encoding="alibi", use_bias=True,
        embedding_scale=14.6, mup_base_width=16, mup_output_alpha=2.22, mup_init_std=0.073,
    )
    fields.update(overrides)
    config = family_config("btlm", peak_lr=1e-3, **fields)
    config.train.seq_len = 32
    return config


@pytest.mark.parametrize("overrides, field, message", [
    (dict(num_heads=5), "model.num_heads", "5 heads do not divide model.model_dim=48"),
    (dict(head_dim=6), "model.head_dim", "need head_dim=8"),
    (dict(alibi_scaling_factor=2.0, alibi_train_seq_len=16), "model.alibi_train_seq_len", "set at most one"),
    (dict(alibi_scaling_factor=0.0), "model.alibi_scaling_factor", "need > 0"),
    (dict(alibi_train_seq_len=0), "model.alibi_train_seq_len", "need >= 1"),
    (dict(position_encoding="rope", alibi_train_seq_len=16), "model.alibi_train_seq_len", "needs position_encoding='alibi'"),
    (dict(mup_base_width=-1), "model.mup_base_width", "need a width > 0 for muP, or 0"),
    (dict(mup_init_std=0.0), "model.mup_init_std", "need a positive number"),
])
def test_bad_btlm_configs_are_one_line_errors_naming_the_field(overrides, field, message):
    with pytest.raises(ConfigError) as error:
        validate(small_config(**overrides))
    assert error.value.field == field
    assert message in str(error.value) and "\n" not in str(error.value)


# ---- Hugging Face layout ----------------------------------------------------------------


def random_btlm_params(model_config, seed=0) -> nnx.State:
    """Random weights everywhere: kernels ~ N(0, in^-1/2), the embedding ~ N(0, 0.5),
    projection biases ~ N(0, 0.1), LayerNorm weights 1 + N(0, 0.1) and biases N(0, 0.1)
    (perturbed, so a swapped or dropped norm parameter changes the logits)."""
    rng = np.random.default_rng(seed)

    def draw(path, variable):
        name, shape = path_name(path), variable.shape
        if name.endswith("kernel"):
            value = rng.normal(0.0, shape[0] ** -0.5, shape)
        elif name == "token_embeddings":
            value = rng.normal(0.0, 0.5, shape)
        elif name.endswith("norm/weight"):
            value = 1.0 + rng.normal(0.0, 0.1, shape)
        else:  # biases, of norms and projections
            value = rng.normal(0.0, 0.1, shape)
        return path, variable.replace(value=value.astype(np.float32))

    abstract = nnx.state(abstract_model(model_config), nnx.Param)
    return nnx.from_flat_state([draw(path, v) for path, v in nnx.to_flat_state(abstract)])


def reference_btlm_logits(hf_dir, tokens) -> np.ndarray:
    """BTLM's forward written from SPEC §3 alone, in float32 PyTorch, on the exported files:
    h = wte[ids] * mup_embeddings_scale; pre-LN GPT-2 blocks h += attn(ln_1(h)),
    h += mlp(ln_2(h)); ln_f; logits = (h @ wte^T) * mup_output_alpha * mup_width_scale.
    Attention: q.k / head_dim (mup_scale_qk_dot_by_d), future keys set to the dtype's minimum,
    then the ALiBi bias -slope * |i - j| with the STORED slopes (divided by the alibi_scaling
    factor), softmax. MLP: c_proj(c_fc(x) * silu(c_fc2(x))). Conv1D weights are [in, out]."""
    config = json.loads((hf_dir / "config.json").read_text())
    w = load_file(str(hf_dir / "model.safetensors"))
    d, heads = config["n_embd"], config["n_head"]
    hd, eps = d // heads, config["layer_norm_epsilon"]
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    batch, seq = ids.shape
    h = w["transformer.wte.weight"][ids] * config["mup_embeddings_scale"]
    slopes = w["transformer.relative_pe.slopes"].reshape(heads)
    scaling = config["alibi_scaling"]
    if scaling is not None:
        factor = scaling.get("factor") or max(seq / scaling["train_seq_len"], 1.0)
        slopes = slopes / factor
    position = torch.arange(seq)
    distance = (position[:, None] - position[None, :]).abs().float()
    alibi = -slopes[:, None, None] * distance  # [heads, seq, seq]
    future = position[None, :] > position[:, None]
    divisor = hd if config["mup_scale_qk_dot_by_d"] else hd**0.5

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, (d,), w[name + ".weight"], w[name + ".bias"], eps)

    def conv1d(x, name):
        return x @ w[name + ".weight"] + w[name + ".bias"]

    for layer in range(config["n_layer"]):
        p = f"transformer.h.{layer}."
        q, k, v = conv1d(norm(h, p + "ln_1"), p + "attn.c_attn").split(d, dim=-1)
        q, k, v = (t.view(batch, seq, heads, hd).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / divisor
        scores = scores.masked_fill(future, torch.finfo(torch.float32).min) + alibi
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, seq, d)
        h = h + conv1d(attended, p + "attn.c_proj")
        x = norm(h, p + "ln_2")
        h = h + conv1d(conv1d(x, p + "mlp.c_fc") * torch.nn.functional.silu(conv1d(x, p + "mlp.c_fc2")), p + "mlp.c_proj")
    h = norm(h, "transformer.ln_f")
    # transformers' convention: the head is wte unless tie_word_embeddings is false
    head = w["transformer.wte.weight"] if config.get("tie_word_embeddings", True) else w["lm_head.weight"]
    logits = h @ head.T * config["mup_output_alpha"] * config["mup_width_scale"]
    return logits.numpy()


@pytest.fixture(scope="module")
def small():
    config = validate(small_config())
    return config, random_btlm_params(config.model, seed=1)


TOKENS = np.random.default_rng(5).integers(0, 96, size=(2, 32)).astype(np.int32)


@pytest.mark.parametrize("scaling", [{}, {"alibi_scaling_factor": 2.5}, {"alibi_train_seq_len": 16}])
def test_pytorch_reference_of_spec_on_the_export_gives_elmjaxs_logits(small, tmp_path, scaling):
    config, params = small
    model_config = validate(small_config(**scaling)).model
    export_params(tmp_path / "hf", model_config, params, target="torch")
    ours = elmjax_logits(model_config, params, TOKENS)
    theirs = reference_btlm_logits(tmp_path / "hf", TOKENS)
    assert np.abs(ours).max() > 0.5  # the comparison is not between near-zero logits
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_export_writes_cerebras_names_shapes_and_config_keys(small, tmp_path):
    config, params = small
    export_params(tmp_path / "hf", config.model, params, target="torch")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    d, inner = 48, 40
    assert tensors["transformer.wte.weight"].shape == (96, d)
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (d, 3 * d)  # Conv1D [in, out]
    assert tensors["transformer.h.1.mlp.c_fc2.weight"].shape == (d, inner)
    assert tensors["transformer.h.1.mlp.c_proj.weight"].shape == (inner, d)
    assert tensors["transformer.relative_pe.slopes"].shape == (6, 1)
    assert "lm_head.weight" not in tensors  # tied to wte
    assert len(tensors) == 1 + 2 + 1 + 2 * 14
    # The gate half of proj_1 is c_fc2, the other half c_fc.
    proj_1 = np.asarray(params["layers"][0]["ffn"]["proj_1"]["kernel"][...])
    np.testing.assert_array_equal(tensors["transformer.h.0.mlp.c_fc2.weight"].numpy(), proj_1[:, :inner])
    np.testing.assert_array_equal(tensors["transformer.h.0.mlp.c_fc.weight"].numpy(), proj_1[:, inner:])
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["model_type"] == "btlm" and hf["architectures"] == ["BTLMLMHeadModel"]
    assert hf["auto_map"]["AutoModelForCausalLM"] == "cerebras/btlm-3b-8k-base--modeling_btlm.BTLMLMHeadModel"
    expected = {"n_embd": 48, "n_layer": 2, "n_head": 6, "n_inner": 40, "n_positions": 64, "vocab_size": 96,
                "activation_function": "swiglu", "position_embedding_type": "alibi", "layer_norm_epsilon": 1e-5,
                "mup_width_scale": 16 / 48, "mup_embeddings_scale": 14.6, "mup_output_alpha": 2.22,
                "mup_scale_qk_dot_by_d": True, "alibi_scaling": None, "bos_token_id": 50256, "eos_token_id": 50256}
    assert {key: hf[key] for key in expected} == expected


def test_a_merged_embedding_adapter_exports_an_untied_head_that_the_reference_and_import_read(tmp_path):
    """The family's default adapter targets include token_embeddings (SPEC §1's recipe).
    Merged, the lookup changes and the head keeps the base table, so the export unties them:
    tie_word_embeddings false and lm_head.weight (export had refused, so a default LoRA run
    could not be shipped)."""
    from elmjax.convert import adapters as adapter_export

    config = small_config()
    config.model.adapter.kind = "lora"
    config = validate(config, reads_inputs=False)  # no base workdir: the weights are drawn here
    assert config.model.adapter.targets.startswith("token_embeddings,")
    params = nnx.to_pure_dict(random_btlm_params(config.model, seed=2))  # adapters ~ N(0, 0.1): not a no-op
    merged_config, merged = adapter_export.merge(config, params)
    export_params(tmp_path / "hf", merged_config.model, merged, target="torch")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    adapted = elmjax_logits(config.model, params, TOKENS)
    np.testing.assert_allclose(reference_btlm_logits(tmp_path / "hf", TOKENS), adapted, atol=1e-4, rtol=0)
    imported_config, imported = load_hf_dir(tmp_path / "hf")
    assert imported_config.model.tie_embeddings is False
    np.testing.assert_allclose(elmjax_logits(imported_config.model, imported, TOKENS), adapted, atol=1e-5, rtol=0)


def test_hf_round_trip_is_bit_exact_with_the_same_model_fields(small, tmp_path):
    config, params = small
    model_config = validate(small_config(alibi_train_seq_len=16)).model
    export_params(tmp_path / "hf", model_config, params, target="torch", max_shard_bytes=20_000)
    imported_config, imported = load_hf_dir(tmp_path / "hf")
    original, restored = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(imported))
    assert set(original) == set(restored)
    for path, variable in original.items():
        np.testing.assert_array_equal(np.asarray(restored[path][...]), np.asarray(variable[...]), err_msg=str(path))
    for field in ("family", "num_layers", "model_dim", "num_heads", "head_dim", "ffn_dim", "vocab_size",
                  "max_seq_len", "norm_type", "norm_eps", "use_bias", "position_encoding", "embedding_scale",
                  "mup_base_width", "mup_output_alpha", "mup_init_std", "alibi_train_seq_len",
                  "alibi_scaling_factor", "logit_scale", "attention_scale"):
        assert imported_config.model[field] == model_config[field], field
    np.testing.assert_array_equal(elmjax_logits(imported_config.model, imported, TOKENS),
                                  elmjax_logits(model_config, params, TOKENS))


def test_the_3b_config_json_round_trips_to_the_same_model(tmp_path):
    from elmjax.convert.hf import hf_config
    from elmjax.convert.hf_import import config_from_hf

    model = validate(btlm_3b_config()).model
    hf = hf_config(model)
    assert (hf["mup_width_scale"], hf["mup_output_alpha"], hf["initializer_range"]) == (0.1, 2.22, 0.073)
    back = config_from_hf(hf).model
    for field in ("num_layers", "model_dim", "num_heads", "ffn_dim", "vocab_size", "max_seq_len",
                  "mup_base_width", "mup_output_alpha", "embedding_scale", "attention_scale"):
        assert back[field] == model[field], field


def test_import_refuses_slopes_that_are_not_alibis(small, tmp_path):
    from safetensors.numpy import load_file as load_numpy
    from safetensors.numpy import save_file

    config, params = small
    export_params(tmp_path / "hf", config.model, params, target="torch")
    tensors = load_numpy(str(tmp_path / "hf" / "model.safetensors"))
    tensors["transformer.relative_pe.slopes"] = tensors["transformer.relative_pe.slopes"] * 2
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ValueError, match="are not ALiBi.s slopes for 6 heads"):
        load_hf_dir(tmp_path / "hf")


def test_import_accepts_a_tied_lm_head_and_flat_slopes(small, tmp_path):
    from safetensors.numpy import load_file as load_numpy
    from safetensors.numpy import save_file

    config, params = small
    export_params(tmp_path / "hf", config.model, params, target="torch")
    tensors = load_numpy(str(tmp_path / "hf" / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    tensors["transformer.relative_pe.slopes"] = tensors["transformer.relative_pe.slopes"].reshape(6)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    _, imported = load_hf_dir(tmp_path / "hf")
    np.testing.assert_array_equal(np.asarray(imported["token_embeddings"][...]),
                                  np.asarray(params["token_embeddings"][...]))


def test_export_to_mlx_is_refused_with_one_line(small, tmp_path, capsys):
    from elmjax.training.checkpoint import save_params_checkpoint
    from tools import export as export_tool

    config, params = small
    with pytest.raises(ValueError, match="'btlm' family has no mlx-lm layout"):
        export_params(tmp_path / "mlx", config.model, params, target="mlx")
    save_params_checkpoint(tmp_path / "ckpt", config, params)
    code = export_tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--to", "mlx", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "no mlx-lm layout" in error
    assert not (tmp_path / "out").exists()


def test_bfloat16_export_imports(small, tmp_path):
    config, params = small
    export_params(tmp_path / "hf", config.model, params, target="torch", dtype="bfloat16")
    _, imported = load_hf_dir(tmp_path / "hf")  # slopes checked at bfloat16 precision
    expected = np.asarray(params["norm"]["bias"][...]).astype("bfloat16").astype(np.float32)
    np.testing.assert_array_equal(np.asarray(imported["norm"]["bias"][...]), expected)


def test_export_and_import_tools_carry_the_gpt2_tokenizer(small, tmp_path, capsys):
    from elmjax.convert.export import export_checkpoint
    from elmjax.data.tokenizer_choice import load_tokenizer
    from elmjax.training.checkpoint import restore_params, save_params_checkpoint
    from tools import import_hf as import_tool

    config = small_config(vocab_size=50257)
    config.data.tokenizer = "gpt2"
    config = validate(config)
    save_params_checkpoint(tmp_path / "ckpt", config, random_btlm_params(config.model, seed=4))
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", target="torch")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["vocab_size"]) == (50256, 50256, 50257)
    assert import_tool.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    imported_config, imported = restore_params(tmp_path / "imported")
    _, original = restore_params(tmp_path / "ckpt")
    np.testing.assert_array_equal(imported["layers"][1]["ffn"]["proj_1"]["kernel"],
                                  original["layers"][1]["ffn"]["proj_1"]["kernel"])
    text = "And God said, Let there be light"
    assert load_tokenizer(imported_config).encode(text) == load_tokenizer(config).encode(text)

"""Every validation rule rejects a bad value with an error naming the field."""
import pytest

from elmjax.config import ConfigError, base_config, openelm_config, validate


def tiny():
    config = openelm_config(num_layers=4, model_dim=128, head_dim=32, peak_lr=1e-3, ffn_dim_divisor=64)
    config.train.seq_len = 64
    config.model.max_seq_len = 64
    return config


def test_defaults_are_valid():
    validate(base_config())
    validate(tiny())


BAD_VALUES = [
    # (field path, bad value, text the message must contain)
    ("model.num_layers", 0, "need >= 1"),
    ("model.model_dim", 0, "need >= 1"),
    ("model.head_dim", 48, "does not divide model.model_dim=128"),
    ("model.head_dim", 3, "even number"),
    ("model.num_gqa_groups", 0, "need >= 1"),
    ("model.qkv_multipliers", (1.0, 0.5), "greater than max"),
    ("model.qkv_multipliers", (0.0, 0.5), "must be > 0"),
    ("model.ffn_multipliers", (4.0, 0.5), "greater than max"),
    ("model.ffn_multipliers", (1.0,), "expected two numbers"),
    ("model.ffn_dim_divisor", 0, "need >= 1"),
    ("model.vocab_size", 1, "need >= 2"),
    ("model.max_seq_len", 0, "need >= 1"),
    ("model.rope_theta", 0.0, "need > 0"),
    ("model.norm_eps", 0.0, "0 < eps < 1"),
    ("model.norm_type", "batch_norm", "allowed: rms_norm, layer_norm"),
    ("model.qk_norm", "l2", "allowed: per_head, full, none"),
    ("model.position_encoding", "learned", "allowed: rope, alibi"),
    ("model.family", "gpt", "known families: btlm, olmoe, openelm"),
    ("model.attention_impl", "flash", "allowed: auto, xla, pallas, cudnn"),
    ("model.compute_dtype", "float64", "allowed: float32, bfloat16, float16"),
    ("model.param_dtype", "int8", "allowed: float32, bfloat16, float16"),
    ("model.remat_policy", "some", "allowed: none, full"),
    ("model.embedding_scale", 0.0, "positive number"),
    ("model.logit_scale", -1.0, "positive number"),
    ("model.attention_scale", -0.1, "need > 0"),
    ("train.steps", 0, "need >= 1"),
    ("train.batch_size", 0, "need >= 1"),
    ("train.seq_len", 0, "need >= 1"),
    ("train.seq_len", 65, "exceeds model.max_seq_len=64"),
    ("train.grad_accum_steps", 0, "need >= 1"),
    ("train.grad_accum_steps", 3, "does not divide train.batch_size"),
    ("train.log_every", 0, "need >= 1"),
    ("train.stop_check_every", 0, "need >= 1"),
    ("train.z_loss", -1.0, "need >= 0"),
    ("train.nonfinite", "ignore", "allowed: skip, abort"),
    ("train.reuse_host_memory", "yes", "allowed: auto, on, off"),
    ("optim.peak_lr", 0.0, "need > 0"),
    ("optim.init_lr", -1.0, "need >= 0"),
    ("optim.final_lr_ratio", 1.5, "0 <= ratio <= 1"),
    ("optim.warmup_steps", -1, "need >= 0"),
    ("optim.schedule", "step", "allowed: cosine, linear, constant"),
    ("optim.b1", 1.0, "0 <= b < 1"),
    ("optim.b2", -0.1, "0 <= b < 1"),
    ("optim.eps", 0.0, "need > 0"),
    ("optim.weight_decay", -0.1, "need >= 0"),
    ("optim.clip_norm", -1.0, "need >= 0"),
    ("checkpoint.every_steps", 0, "need >= 1"),
    ("checkpoint.max_to_keep", 0, "need >= 1"),
    ("checkpoint.keep_every", -1, "need >= 0"),
    ("mesh.fsdp", 0, "need -1 or >= 1"),
    ("mesh.expert", 2, "has no experts to shard"),
]


@pytest.mark.parametrize("field,value,message", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_bad_value_is_rejected_with_field_name(field, value, message):
    config = tiny()
    section, name = field.split(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert error.value.field == field or error.value.field.startswith(field)
    assert f"`{error.value.field}`" in str(error.value)
    assert message in str(error.value)


def test_two_mesh_axes_taking_the_rest_is_rejected():
    config = tiny()
    config.mesh.data = -1
    config.mesh.fsdp = -1
    with pytest.raises(ConfigError, match="at most one axis may take the devices left over"):
        validate(config)


def test_openelm_config_rejects_unknown_model_field():
    with pytest.raises(ConfigError, match="`model.num_heads`: is not a model field of the 'openelm' family"):
        openelm_config(num_layers=2, model_dim=64, head_dim=16, peak_lr=1e-3, num_heads=4)


def test_a_family_field_missing_from_the_config_names_the_field_and_the_fix():
    config = tiny()
    with config.unlocked():
        del config.model["ffn_dim_divisor"]
    with pytest.raises(ConfigError, match=r"`model.ffn_dim_divisor`: is missing for family 'openelm'; build"):
        validate(config)


def test_adapter_settings_of_runs_without_adapters_do_not_block_a_resume():
    """An OLMoE run saved while the default targets were OpenELM's resumes without a config
    change; with adapters on, a change of targets is one."""
    from elmjax.training.run_state import config_changes

    saved, current = base_config("olmoe"), base_config("olmoe")
    saved.model.adapter.targets = "token_embeddings,qkv_proj,out_proj,proj_1,proj_2"
    assert config_changes(saved, current) == []
    saved.model.adapter.kind = current.model.adapter.kind = "lora"
    assert config_changes(saved, current) == [("model.adapter.targets", "token_embeddings,qkv_proj,out_proj,proj_1,proj_2",
                                               "token_embeddings,qkv_proj,out_proj")]


@pytest.mark.parametrize("name", ["every_steps", "batches"])
def test_eval_counts_set_to_none_are_a_config_error_not_a_type_error(name):
    config = base_config()
    config.eval[name] = None  # what a config file may write (the command line's flags refuse it)
    with pytest.raises(ConfigError, match=f"config field `eval.{name}`: is None; need an integer"):
        validate(config)

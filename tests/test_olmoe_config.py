"""OLMoE's configuration: SPEC §2's numbers (parameter counts, active parameters, FLOPs), the
paper's recipe (truncated-normal init, weight decay on every parameter), and one-line errors
naming the field for every bad value."""
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from elmjax.config import ConfigError, load_config_file, validate
from elmjax.layers.init import host_value
from elmjax.training import metrics as mt
from elmjax.training.optim import make_optimizer, weight_decay_mask
from olmoe_support import micro_moe_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def olmoe():
    return validate(load_config_file(ROOT / "configs" / "olmoe_1b_7b.py"))


def test_count_params_prints_spec_total_and_active_parameters():
    result = subprocess.run(
        [sys.executable, "tools/count_params.py", "--config=configs/olmoe_1b_7b.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "params: 6919161856" in lines  # SPEC §2
    assert "active_params: 1282017280" in lines


def test_count_params_prints_active_equal_to_total_for_a_dense_family():
    result = subprocess.run(
        [sys.executable, "tools/count_params.py", "--config=configs/tiny.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "params: 2152384" in result.stdout.splitlines()
    assert "active_params: 2152384" in result.stdout.splitlines()


def test_olmoe_config_holds_the_spec_numbers(olmoe):
    model, optim, train = olmoe.model, olmoe.optim, olmoe.train
    assert (model.num_layers, model.model_dim, model.num_heads, model.head_dim, model.num_kv_heads) == (16, 2048, 16, 128, 16)
    assert (model.vocab_size, model.max_seq_len, model.tie_embeddings, model.use_bias) == (50304, 4096, False, False)
    assert (model.norm_type, model.norm_eps, model.qk_norm, model.rope_theta) == ("rms_norm", 1e-5, "full", 10000.0)
    assert (model.num_experts, model.num_experts_per_tok, model.ffn_dim, model.norm_topk_prob) == (64, 8, 1024, False)
    assert (model.load_balance_weight, model.router_z_loss_weight) == (0.01, 0.001)
    assert (model.init_std, model.init_cutoff) == (0.02, 3.0)
    assert (optim.peak_lr, optim.warmup_steps, optim.schedule, optim.final_lr_ratio) == (4e-4, 2500, "cosine", 0.1)
    assert (optim.weight_decay, optim.weight_decay_on, optim.b1, optim.b2, optim.eps, optim.clip_norm) == (
        0.1, "all", 0.9, 0.95, 1e-8, 1.0)
    assert (train.batch_size, train.seq_len, train.z_loss) == (1024, 4096, 0.0)


def test_flops_count_the_router_and_k_of_e_experts(olmoe):
    """SPEC §4 per layer: 6 * (attention 4 d^2 + router d E + k * 3 d I) + 6 s q hd, plus the
    output head: the experts a token does not use cost nothing."""
    d, layers, seq = 2048, 16, 4096
    per_layer = 6 * (4 * d * d + d * 64 + 8 * 3 * d * 1024) + 6 * seq * 16 * 128
    assert mt.flops_per_token(olmoe.model, seq) == layers * per_layer + 6 * 50304 * d


def test_truncated_normal_init_is_cut_at_three_sigma_with_the_right_spread():
    """A truncated N(0, 0.02^2) at +-3 sigma: no value beyond 0.06, and the sample agrees with
    scipy's truncated normal (Kolmogorov-Smirnov); the same (seed, path) gives the same values."""
    value = host_value("layers/0/ffn/experts/gate_up", (64, 2048), np.float32, ("truncated_normal", 0.02, 3.0), seed=0)
    assert np.abs(value).max() <= 0.06
    assert np.abs(value).max() > 0.055  # the tails are there, not clipped away
    result = stats.kstest(value.reshape(-1) / 0.02, stats.truncnorm(-3, 3).cdf)
    assert result.pvalue > 0.01
    np.testing.assert_array_equal(
        value, host_value("layers/0/ffn/experts/gate_up", (64, 2048), np.float32, ("truncated_normal", 0.02, 3.0), 0))


def test_weight_decay_on_all_decays_norms_too(olmoe):
    """OLMoE's recipe decays every parameter: with zero gradients Adam's update is 0, so the
    update is -lr * wd * p for norm weights as for matrices."""
    params = {"kernel": jnp.full((2, 3), 2.0), "norm": {"weight": jnp.full((3,), 2.0)}}
    assert weight_decay_mask(params, decay_on="all") == {"kernel": True, "norm": {"weight": True}}
    assert weight_decay_mask(params) == {"kernel": True, "norm": {"weight": False}}
    optim = olmoe.optim.copy_and_resolve_references()
    optim.init_lr, optim.warmup_steps, optim.schedule = 4e-4, 0, "constant"
    optimizer = make_optimizer(optim, 10)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    np.testing.assert_allclose(updates["norm"]["weight"], -4e-4 * 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["kernel"], -4e-4 * 0.1 * 2.0, rtol=1e-6)


BAD_VALUES = [
    # (field, bad value, text the message must contain)
    ("model.num_experts_per_tok", 9, "need 1 <= top-k <= model.num_experts=8"),
    ("model.num_experts_per_tok", 0, "need 1 <= top-k"),
    ("model.num_experts", 0, "need >= 1"),
    ("model.num_kv_heads", 3, "does not divide model.num_heads=4"),
    ("model.num_heads", 0, "need >= 1"),
    ("model.ffn_dim", 0, "need >= 1"),
    ("model.load_balance_weight", -0.01, "need >= 0"),
    ("model.router_z_loss_weight", -1.0, "need >= 0"),
    ("model.init_std", 0.0, "need > 0"),
    ("model.init_cutoff", 0.0, "need > 0"),
    ("model.moe_matmul", "einsum", "allowed: auto, tiled, ragged_dot, megablox"),
    ("model.moe_dispatch", "gather", "allowed: auto, dense, ragged"),
    ("model.moe_tile", 12, "multiple of 8"),
    ("mesh.expert", 3, "is 3; it must divide model.num_experts=8"),
    ("mesh.expert", 0, "need -1 or >= 1"),
    ("optim.weight_decay_on", "vectors", "allowed: matrices, all"),
]


@pytest.mark.parametrize("field,value,message", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_bad_value_is_one_line_error_naming_the_field(field, value, message):
    config = micro_moe_config()
    section, name = field.split(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert error.value.field == field
    assert str(error.value).startswith(f"config field `{field}`: ")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_config_on_the_command_line_exits_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "elmjax.train", "--config=configs/tiny_moe.py", f"--workdir={tmp_path}",
         "--config.model.num_experts_per_tok=9"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config field `model.num_experts_per_tok`: is 9; need 1 <= top-k <= model.num_experts=8")

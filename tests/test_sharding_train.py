"""Meshes and parameter placement: any factorisation of 8 host devices trains like 1 device."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from elmjax.parallel import sharding as shd
from elmjax.training.setup import build_setup, compile_train_step, fresh_params, global_batch
from elmjax.training import step as ts
from tests.train_micro_config import get_config, synthetic_batch

STEPS = 5


def mesh_config(**sizes):
    config = get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    config.mesh.update(sizes)
    return config


def train_losses(config, devices):
    setup = build_setup(config, devices)
    state = jax.jit(lambda p: ts.init_train_state(p, setup.optimizer),
                    out_shardings=setup.state_shardings)(fresh_params(setup))
    step, _ = compile_train_step(setup)
    losses = []
    for index in range(STEPS):
        state, metrics = step(state, setup.abstract_frozen, global_batch(setup, synthetic_batch(config, seed=index)))
        losses.append(float(metrics["loss"]))
    return setup, state, losses


@pytest.fixture(scope="module")
def single_device_losses():
    return train_losses(mesh_config(), jax.devices()[:1])[2]


@pytest.mark.parametrize("sizes", [
    {"data": 8},  # data parallel
    {"fsdp": 8},  # fully sharded
    {"data": 2, "tensor": 4},  # tensor parallel (and data)
], ids=["data8", "fsdp8", "data2_tensor4"])
def test_mesh_matches_single_device_losses(sizes, single_device_losses):
    _, _, losses = train_losses(mesh_config(**sizes), jax.devices())
    np.testing.assert_allclose(losses, single_device_losses, rtol=2e-5)


def test_params_and_moments_carry_the_rule_shardings():
    setup, state, _ = train_losses(mesh_config(data=2, fsdp=2, tensor=2), jax.devices())
    params = state["params"]
    # default rules: vocab -> tensor, embed -> fsdp, heads/mlp -> tensor, norm -> replicated
    assert params["token_embeddings"].sharding.spec == P("tensor", "fsdp")
    assert params["layers"][0]["attn"]["qkv_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert params["layers"][1]["ffn"]["proj_2"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert params["norm"]["weight"].sharding.spec == P(None)
    adam = state["opt_state"].inner_states["decay"].inner_state[0]  # the decayed group's scale_by_adam
    assert adam.mu["layers"][0]["attn"]["out_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert state["step"].sharding.spec == P()


def test_dimension_the_mesh_cannot_split_stays_replicated():
    mesh = shd.make_mesh(mesh_config(data=1, tensor=8).mesh)
    # 3 kv-heads worth of columns (48) on 8 tensor shards: 48 % 8 == 0 splits, 20 does not
    assert shd.fit_spec_to_shape(P("fsdp", "tensor"), (64, 48), mesh) == P("fsdp", "tensor")
    assert shd.fit_spec_to_shape(P(None, "tensor"), (64, 20), mesh) == P(None, None)
    assert shd.fit_spec_to_shape(P(("data", "tensor")), (12,), mesh) == P(None)


def test_mesh_sizes_minus_one_takes_the_rest_and_bad_sizes_say_which_fields():
    config = mesh_config(data=-1, fsdp=2, tensor=2)
    assert shd.resolve_mesh_shape(config.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    with pytest.raises(ValueError, match="config field `mesh`"):
        shd.resolve_mesh_shape(mesh_config(data=3).mesh, 8)
    with pytest.raises(ValueError, match="does not divide"):
        shd.resolve_mesh_shape(mesh_config(data=-1, tensor=3).mesh, 8)
    mesh = shd.make_mesh(config.mesh)
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)

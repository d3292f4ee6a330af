"""Expert parallelism trains like one device: a micro OLMoE (8 experts, top-2) on 8 host
devices, experts split over the expert axis (composed with data, fsdp and tensor axes),
gives the single-device losses and auxiliary terms for 5 steps; parameters carry the
`expert` axis."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from elmjax.config import ConfigError
from elmjax.training import step as ts
from elmjax.training.setup import build_setup, compile_train_step, fresh_params, global_batch
from olmoe_support import micro_moe_config
from train_micro_config import synthetic_batch

STEPS = 5


def mesh_config(**sizes):
    config = micro_moe_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.expert = 1, 1, 1, 1
    config.mesh.update(sizes)
    return config


def train(config, devices):
    setup = build_setup(config, devices)
    state = jax.jit(lambda p: ts.init_train_state(p, setup.optimizer),
                    out_shardings=setup.state_shardings)(fresh_params(setup))
    step, _ = compile_train_step(setup)
    records = []
    for index in range(STEPS):
        state, metrics = step(state, setup.abstract_frozen, global_batch(setup, synthetic_batch(config, seed=index)))
        records.append({key: float(value) for key, value in metrics.items() if key == "loss" or key.startswith("aux/")})
    return state, records


@pytest.fixture(scope="module")
def single_device():
    return train(mesh_config(), jax.devices()[:1])[1]


@pytest.mark.parametrize("sizes", [
    {"data": 8},  # data parallel, all experts everywhere
    {"expert": 8},  # one expert per device; the expert axis also splits the batch
    {"data": 2, "expert": 4},
    {"fsdp": 2, "expert": 4},
    {"expert": 2, "tensor": 4},
], ids=["data8", "expert8", "data2_expert4", "fsdp2_expert4", "expert2_tensor4"])
def test_mesh_matches_single_device_losses(sizes, single_device):
    _, records = train(mesh_config(**sizes), jax.devices())
    for step, (ours, reference) in enumerate(zip(records, single_device)):
        assert set(ours) == set(reference) == {
            "loss", "aux/load_balance", "aux/router_z_loss", "aux/layer0/expert_load", "aux/layer1/expert_load"}
        for key in reference:
            np.testing.assert_allclose(ours[key], reference[key], rtol=2e-5, err_msg=f"step {step} {key}")


def test_expert_parameters_and_moments_carry_the_expert_axis():
    state, _ = train(mesh_config(data=2, expert=2, tensor=2), jax.devices())
    ffn = state["params"]["layers"][0]["ffn"]
    # default rules: expert -> expert, embed -> fsdp (size 1 here), mlp -> tensor
    assert ffn["experts"]["gate_up"].sharding.spec == P("expert", "fsdp", None, "tensor")
    assert ffn["experts"]["down"].sharding.spec == P("expert", "tensor", "fsdp")
    assert ffn["router"]["kernel"].sharding.spec == P("fsdp", None)
    adam = state["opt_state"].inner_states["decay"].inner_state[0]
    assert adam.mu["layers"][1]["ffn"]["experts"]["down"].sharding.spec == P("expert", "tensor", "fsdp")
    assert ffn["experts"]["gate_up"].addressable_shards[0].data.shape == (4, 64, 2, 16)  # 8 experts / 2


def test_an_expert_axis_taking_the_devices_left_must_divide_the_experts():
    """mesh.expert=-1 resolves to 8 devices / (data 1); 8 does not divide 12 experts."""
    config = mesh_config(expert=-1)
    config.model.num_experts = 12
    with pytest.raises(ConfigError, match=r"`mesh.expert`: is 8; it must divide model.num_experts=12"):
        build_setup(config, jax.devices())


def test_configs_tiny_moe_expert_parallel_matches_one_device():
    """configs/tiny_moe.py itself (8 experts, top-2, d 192): expert axis 8 and data 2 x expert 4
    give the single-device losses for 5 steps."""
    from pathlib import Path

    from elmjax.config import load_config_file, validate

    def tiny_moe(**sizes):
        config = load_config_file(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe.py")
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.expert = 1, 1, 1, 1
        config.mesh.update(sizes)
        return validate(config)

    reference = [r["loss"] for r in train(tiny_moe(), jax.devices()[:1])[1]]
    for sizes in ({"expert": 8}, {"data": 2, "expert": 4}):
        losses = [r["loss"] for r in train(tiny_moe(**sizes), jax.devices())[1]]
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=str(sizes))

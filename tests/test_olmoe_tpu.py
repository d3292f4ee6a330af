"""The expert-parallel ragged path through the real TPU compiler, on this CPU-only machine.

XLA:CPU does not implement `ragged_all_to_all` (jax 0.10.2), so the GPU/TPU dispatch cannot
run here; with libtpu's abstract v5p devices (see tests/test_flash_attention_tpu.py) the whole
train step of a micro OLMoE (megablox grouped matmuls, ragged all-to-all over an expert axis
of 4) and the MoE layer with XLA's ragged_dot compile for TPU, forward and backward.
Skipped without libtpu. Numerics of the ragged path are not checked here (no device).
"""
import os

import pytest

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytest.importorskip("libtpu", reason="the TPU compiler comes with libtpu (jax[tpu])")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from elmjax.config import DEFAULT_SHARDING_RULES  # noqa: E402
from elmjax.layers.moe import dispatch  # noqa: E402
from elmjax.parallel import sharding as shd  # noqa: E402
from elmjax.training.setup import build_setup, compile_train_step  # noqa: E402
from olmoe_support import micro_moe_config  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def v5p_devices():
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    except Exception as error:  # libtpu present but unusable here
        pytest.skip(f"libtpu cannot describe v5p:2x2x1: {error}")


def test_train_step_with_megablox_and_ragged_all_to_all_compiles_for_tpu(v5p_devices):
    config = micro_moe_config(moe_matmul="megablox", moe_dispatch="ragged", attention_impl="xla",
                              compute_dtype="bfloat16", moe_tile=128)
    config.mesh.data, config.mesh.expert = 1, 4
    compiled, _ = compile_train_step(build_setup(config, v5p_devices))
    text = compiled.as_text()
    assert text.count("ragged-all-to-all") >= 3  # rows and expert ids out, results back (+ backward)
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_moe_layer_with_ragged_dot_and_ragged_all_to_all_compiles_for_tpu(v5p_devices):
    mesh = jax.make_mesh((1, 1, 1, 4), shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                         devices=v5p_devices)
    rules = DEFAULT_SHARDING_RULES
    batch, seq, d, experts, k, inner = 8, 256, 512, 16, 4, 256

    def abstract(shape, dtype, axes):
        spec = shd.fit_spec_to_shape(shd.logical_to_spec(axes, rules), shape, mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    args = (abstract((batch, seq, d), jnp.bfloat16, ("batch", "seq", "embed")),
            abstract((batch, seq, k), jnp.float32, ("batch", "seq", None)),
            abstract((batch, seq, k), jnp.int32, ("batch", "seq", None)),
            abstract((experts, d, 2, inner), jnp.float32, ("expert", "embed", None, "mlp")),
            abstract((experts, inner, d), jnp.float32, ("expert", "mlp", "embed")))

    def loss(x, weights, chosen, gate_up, down):
        with shd.use_rules(mesh, rules):
            out = dispatch.moe(x, weights, chosen, gate_up, down, impl="ragged_dot", tile=128,
                               dispatch="ragged", compute_dtype=jnp.bfloat16)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 3, 4))).lower(*args).compile()
    assert compiled.as_text().count("ragged-all-to-all") >= 3

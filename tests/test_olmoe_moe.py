"""The MoE layer's parts against independent references: grouped matmuls against per-group
numpy products (and jax's own ragged_dot gradients), and dropless dispatch, on one device
and expert-parallel over 8 host devices, against a numpy all-experts-on-all-tokens MoE, for
routings up to the most unbalanced (every token to the same experts)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from elmjax.config import DEFAULT_SHARDING_RULES
from elmjax.layers.moe import dispatch
from elmjax.layers.moe.grouped import grouped_matmul
from elmjax.parallel import sharding as shd

GROUP_SIZES = [50, 0, 7, 120, 60, 3]  # an empty group, one smaller than a tile; 240 of 300 rows


@pytest.fixture(scope="module")
def grouped_problem():
    rng = np.random.default_rng(0)
    lhs = rng.normal(size=(300, 24)).astype(np.float32)
    rhs = rng.normal(size=(len(GROUP_SIZES), 24, 40)).astype(np.float32)
    expected = np.zeros((300, 40), np.float64)
    start = 0
    for group, size in enumerate(GROUP_SIZES):
        expected[start : start + size] = lhs[start : start + size].astype(np.float64) @ rhs[group]
        start += size
    return lhs, rhs, np.asarray(GROUP_SIZES, np.int32), expected


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot", "megablox"])
def test_grouped_matmul_equals_per_group_products(grouped_problem, impl):
    """Rows past the groups come out 0; megablox runs in Pallas interpret mode on CPU."""
    lhs, rhs, sizes, expected = grouped_problem
    out = jax.jit(functools.partial(grouped_matmul, impl=impl, tile=16))(lhs, rhs, sizes)
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-5)
    assert not np.any(np.asarray(out)[sum(GROUP_SIZES):])


@pytest.mark.parametrize("impl", ["tiled", "megablox"])
def test_grouped_matmul_gradients_equal_ragged_dot_autodiff(grouped_problem, impl):
    lhs, rhs, sizes, _ = grouped_problem
    cotangent = np.random.default_rng(1).normal(size=(300, 40)).astype(np.float32)

    def gradients(matmul):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(matmul(a, b) * cotangent), argnums=(0, 1)))(lhs, rhs)

    ours = gradients(lambda a, b: grouped_matmul(a, b, sizes, impl=impl, tile=16))
    theirs = gradients(lambda a, b: jax.lax.ragged_dot(a, b, sizes))
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(reference), atol=1e-4, rtol=1e-5)


def test_tiled_grouped_matmul_does_the_useful_work_only():
    """XLA's cost analysis of the tiled loop body times its trip count is the useful FLOPs
    plus at most one partial tile per group; ragged_dot on CPU multiplies every row by every
    group's matrix."""
    rows, k, n, groups, tile = 512, 32, 64, 8, 64
    sizes = np.full(groups, rows // groups, np.int32)  # 64 each: whole tiles, 8 visits
    args = (jnp.zeros((rows, k)), jnp.zeros((groups, k, n)), sizes)
    useful = 2 * rows * k * n

    def flops(impl):
        compiled = jax.jit(functools.partial(grouped_matmul, impl=impl, tile=tile)).lower(*args).compile()
        return compiled.cost_analysis()["flops"]

    # The while loop's body is counted once: one tile product per visit.
    assert flops("tiled") == pytest.approx(2 * tile * k * n, rel=0.05)
    assert flops("ragged_dot") >= groups * useful * 0.95


def numpy_moe(x, weights, experts, gate_up, down):
    """Every expert on every token in float64, then the chosen ones weighted: the dense
    reference that drops nothing by construction."""
    x, gate_up, down = (np.asarray(a, np.float64) for a in (x, gate_up, down))
    gate = np.einsum("td,edi->tei", x, gate_up[:, :, 0])
    up = np.einsum("td,edi->tei", x, gate_up[:, :, 1])
    every = np.einsum("tei,eid->ted", gate / (1 + np.exp(-gate)) * up, down)  # [T, E, d]
    chosen = np.take_along_axis(every, np.asarray(experts)[:, :, None], axis=1)  # [T, k, d]
    return np.einsum("tkd,tk->td", chosen, np.asarray(weights, np.float64))


TOKENS, D, I, E, K = 64, 16, 8, 8, 2

ROUTINGS = {
    "random": lambda rng: np.stack([rng.permutation(E)[:K] for _ in range(TOKENS)]),
    "all_to_experts_0_1": lambda rng: np.tile([0, 1], (TOKENS, 1)),  # one device's experts
    "all_to_experts_7_6": lambda rng: np.tile([7, 6], (TOKENS, 1)),
}


@pytest.fixture(scope="module")
def moe_inputs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(TOKENS, D)).astype(np.float32)
    gate_up = (0.3 * rng.normal(size=(E, D, 2, I))).astype(np.float32)
    down = (0.3 * rng.normal(size=(E, I, D))).astype(np.float32)
    weights = rng.uniform(0.1, 1.0, size=(TOKENS, K)).astype(np.float32)
    return x, weights, gate_up, down


def run_moe(x, weights, experts, gate_up, down, *, impl="tiled", mesh_sizes=None):
    """dispatch.moe on [8, 8, d] tokens; with `mesh_sizes`, under sharding rules on the 8
    host devices (the train step's setting)."""
    shape = lambda a: a.reshape(8, TOKENS // 8, *a.shape[1:])  # noqa: E731
    args = (shape(x), shape(weights), shape(experts.astype(np.int32)), gate_up, down)
    call = functools.partial(dispatch.moe, impl=impl, tile=16, dispatch="dense", compute_dtype=jnp.float32)
    if mesh_sizes is None:
        return np.asarray(jax.jit(call)(*args)).reshape(TOKENS, D)
    config = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **mesh_sizes}
    mesh = shd.make_mesh(config)
    rules = DEFAULT_SHARDING_RULES

    def place(array, axes):
        spec = shd.fit_spec_to_shape(shd.logical_to_spec(axes, rules), array.shape, mesh)
        return jax.device_put(array, NamedSharding(mesh, spec))

    placed = [place(a, ("batch", "seq", None)) for a in args[:3]]
    placed += [place(gate_up, ("expert", "embed", None, "mlp")), place(down, ("expert", "mlp", "embed"))]

    def sharded(*arrays):
        with shd.use_rules(mesh, rules):
            return call(*arrays)

    return np.asarray(jax.jit(sharded)(*placed)).reshape(TOKENS, D)


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("impl", ["tiled", "ragged_dot", "megablox"])
def test_one_device_moe_drops_nothing(moe_inputs, routing, impl):
    x, weights, gate_up, down = moe_inputs
    experts = ROUTINGS[routing](np.random.default_rng(3))
    out = run_moe(x, weights, experts, gate_up, down, impl=impl)
    np.testing.assert_allclose(out, numpy_moe(x, weights, experts, gate_up, down), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("mesh_sizes", [
    {"expert": 8},  # one expert per device
    {"expert": 4, "data": 2},  # two experts per device; "all to 0, 1" fills device 0's worst-case buffer
    {"expert": 2, "tensor": 4},  # experts' inner dimension split over tensor, summed back
    {"data": 8},  # no expert axis: every device runs all experts on its tokens
], ids=["expert8", "expert4_data2", "expert2_tensor4", "data8"])
def test_expert_parallel_moe_drops_nothing(moe_inputs, routing, mesh_sizes):
    """Dense all-to-all: whatever the routing, every assignment reaches its expert's device
    and comes back (the outputs equal the all-experts reference)."""
    x, weights, gate_up, down = moe_inputs
    experts = ROUTINGS[routing](np.random.default_rng(3))
    out = run_moe(x, weights, experts, gate_up, down, mesh_sizes=mesh_sizes)
    np.testing.assert_allclose(out, numpy_moe(x, weights, experts, gate_up, down), atol=1e-5, rtol=1e-5)

"""What the flash kernel costs and where it lowers, checked from this CPU-only machine.

Lowering: jax 0.10.2 lowers a pallas_call for another platform without that device
(`jax.jit(f).trace(...).lower(lowering_platforms=(platform,))`). For TPU this runs the
Pallas -> Mosaic lowering and serialises the kernel into a `tpu_custom_call`; for CUDA with
Triton compiler params it runs Pallas -> Triton IR into a `__gpu$xla.gpu.triton` call. The
final device compilation (Mosaic -> TPU code, Triton -> PTX) happens only on the device.

Memory: at seq 4096 the reference's gradient materialises [seq, seq] logits and
probabilities; the kernel's gradient has no array with two dims of length seq anywhere,
kernel bodies included, and XLA's temp memory stays below one seq x seq float32 matrix.
"""
import re

import jax
import jax.numpy as jnp
import pytest

from elmjax.kernels.flash_attention import flash_attention
from elmjax.kernels.reference import attention
from elmjax.layers.positions import alibi_slopes

LONG_SEQ = 4096


def grad_of(attend):
    return jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))


def long_inputs(seq=LONG_SEQ):
    q = jax.ShapeDtypeStruct((1, seq, 2, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, seq, 1, 64), jnp.float32)
    return q, kv, kv


def largest_square_arrays(jaxpr, seq):
    """Shapes of every value in `jaxpr` (and its sub-jaxprs) with >= 2 dims of size >= seq."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                if sum(d >= seq for d in shape) >= 2:
                    found.append(shape)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(jaxpr)
    return found


def test_kernel_backward_never_materialises_seq_by_seq():
    ref_jaxpr = jax.make_jaxpr(grad_of(attention))(*long_inputs()).jaxpr
    kernel_jaxpr = jax.make_jaxpr(grad_of(flash_attention))(*long_inputs()).jaxpr
    assert largest_square_arrays(ref_jaxpr, LONG_SEQ)  # the check can see seq x seq arrays
    assert largest_square_arrays(kernel_jaxpr, LONG_SEQ) == []


def test_kernel_backward_temp_memory_is_below_one_seq_by_seq_matrix():
    one_matrix = LONG_SEQ * LONG_SEQ * 4  # bytes of one float32 [seq, seq]
    memory = {}
    for name, attend in (("reference", attention), ("kernel", flash_attention)):
        compiled = jax.jit(grad_of(attend)).lower(*long_inputs()).compile()
        memory[name] = compiled.memory_analysis().temp_size_in_bytes
    assert memory["reference"] >= one_matrix, memory
    assert memory["kernel"] < one_matrix / 2, memory


# (query heads, kv heads, head_dim, seq, ALiBi + 1/d scale): 270M's first layer at an odd
# length with GQA 4; 3B's head_dim 128; BTLM-like head_dim 80 with ALiBi and muP scaling.
LOWERING_CASES = [(12, 3, 64, 200, False), (16, 4, 128, 256, False), (8, 8, 80, 136, True)]
# backend -> (lowering platform, custom call target that carries the compiled kernel)
PLATFORMS = {"mosaic_tpu": ("tpu", "tpu_custom_call"), "triton": ("cuda", "__gpu$xla.gpu.triton")}


@pytest.mark.parametrize("backend", sorted(PLATFORMS))
@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}s{c[3]}")
def test_forward_and_backward_lower_for_accelerator_without_one(backend, case):
    heads, kv_heads, head_dim, seq, muP_alibi = case
    platform, target = PLATFORMS[backend]
    q = jax.ShapeDtypeStruct((2, seq, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, seq, kv_heads, head_dim), jnp.bfloat16)
    segment_ids = jax.ShapeDtypeStruct((2, seq), jnp.int32)

    def attend(q, k, v, segment_ids):
        return flash_attention(
            q, k, v, segment_ids=segment_ids, backend=backend,
            alibi_slopes=alibi_slopes(heads) if muP_alibi else None,
            scale=1.0 / head_dim if muP_alibi else None,
        )

    def loss_grads(q, k, v, segment_ids):
        return grad_of(lambda q, k, v: attend(q, k, v, segment_ids))(q, k, v)

    for fn, kernels in ((attend, 1), (loss_grads, 3)):  # forward; forward + dq + dk/dv
        text = jax.jit(fn).trace(q, kv, kv, segment_ids).lower(lowering_platforms=(platform,)).as_text()
        calls = re.findall(r"custom_call @([\w$.]+)", text)
        assert calls.count(target) == kernels, calls


def test_cpu_cannot_compile_a_non_interpreted_kernel():
    """Pallas has no CPU code generator: on CPU the kernel must run with interpret=True."""
    q = jnp.zeros((1, 16, 2, 16))
    with pytest.raises(ValueError, match="Only interpret mode is supported on CPU"):
        jax.jit(lambda q: flash_attention(q, q, q, backend="triton"))(q)

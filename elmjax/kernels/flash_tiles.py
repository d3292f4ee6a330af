"""Pieces shared by the flash-attention forward and backward kernels.

`FlashConfig` is the static description of one attention call (shapes after padding, masks,
backend); `tile_logits` computes one [block_q, block_k] tile of scaled, biased, masked logits
inside a kernel; the remaining helpers build the backend-specific pallas_call arguments.

Inside the kernels every array is in [batch, heads, seq, head_dim] layout ("BHSD"), so a
block's last two dims are (seq, head_dim): what TPU tiling wants, and plain strides on GPU.
Per-row vectors (logsumexp, delta, query segment ids) are stored as [..., seq, 1] columns and
key segment ids as [batch, 1, seq] rows, so that they broadcast against a [block_q, block_k]
tile without any in-kernel reshape.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# The same finite mask value as the reference, so fully masked rows agree (uniform, not NaN).
from elmjax.kernels.reference import MASK_VALUE

BACKENDS = ("interpret", "triton", "mosaic_tpu")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static facts of one flash-attention call; hashable, so it is a custom_vjp nondiff arg.

    q_len / kv_len are the true lengths, q_pad / kv_pad the lengths padded to whole blocks.
    `offset` = kv_len - q_len aligns causal masking to the end (as in the reference).
    """

    scale: float
    causal: bool
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    q_pad: int
    kv_pad: int
    groups: int  # query heads per kv head
    has_segments: bool
    has_alibi: bool
    backend: str  # one of BACKENDS
    num_warps: int = 4  # Triton only
    num_stages: int = 2  # Triton only

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def num_q_blocks(self) -> int:
        return self.q_pad // self.block_q

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_pad // self.block_k

    @property
    def keys_padded(self) -> bool:
        return self.kv_pad != self.kv_len


def tile_logits(cfg: FlashConfig, q, k, q_start, k_start, q_seg=None, kv_seg=None, slope=None):
    """Scaled logits of one tile, float32 [block_q, block_k], with ALiBi and masks applied.

    q [block_q, head_dim] and k [block_k, head_dim] are tiles starting at query row `q_start`
    and key row `k_start`; q_seg [block_q, 1] and kv_seg [1, block_k] are their segment ids;
    `slope` is this head's ALiBi slope (a scalar). Masked logits become MASK_VALUE.
    """
    logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    logits = logits * cfg.scale
    shape = logits.shape
    if cfg.causal or cfg.has_alibi or cfg.keys_padded:
        # Absolute positions: query row r sits at key position r + offset.
        q_pos = q_start + cfg.offset + lax.broadcasted_iota(jnp.int32, shape, 0)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    if cfg.has_alibi:
        logits = logits - slope * (q_pos - k_pos).astype(jnp.float32)
    mask = None
    if cfg.causal:
        mask = q_pos >= k_pos
    if cfg.keys_padded:  # keys past the true length are padding added by the wrapper
        valid = k_pos < cfg.kv_len
        mask = valid if mask is None else mask & valid
    if cfg.has_segments:
        same = q_seg == kv_seg  # [block_q, 1] == [1, block_k] -> [block_q, block_k]
        mask = same if mask is None else mask & same
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    return logits


def causal_kv_block_end(cfg: FlashConfig, q_block):
    """Number of key blocks that query block `q_block` can see (a traced int32).

    Key blocks after it are fully masked and never loaded; without causal masking it is all.
    """
    if not cfg.causal:
        return cfg.num_kv_blocks
    last_q_pos = q_block * cfg.block_q + cfg.block_q - 1 + cfg.offset
    return lax.min(lax.div(last_q_pos, cfg.block_k) + 1, cfg.num_kv_blocks)


def causal_q_block_start(cfg: FlashConfig, kv_block):
    """First query block that can see key block `kv_block` (a traced int32); 0 if not causal."""
    if not cfg.causal:
        return 0
    first_row = lax.max(kv_block * cfg.block_k - cfg.offset, 0)
    return lax.div(first_row, cfg.block_q)


def compiler_params(cfg: FlashConfig, num_dims: int):
    """Backend compiler parameters for a grid of `num_dims` independent dimensions."""
    if cfg.backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_dims)
    return None


def scalar_table_spec(cfg: FlashConfig):
    """BlockSpec for a small per-head table read with a dynamic scalar index (ALiBi slopes).

    On TPU scalars must come from SMEM; elsewhere the whole array is the block.
    """
    if cfg.backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def call_kwargs(cfg: FlashConfig, num_dims: int, name: str) -> dict:
    """The keyword arguments every flash pallas_call shares."""
    return dict(
        compiler_params=compiler_params(cfg, num_dims),
        interpret=cfg.backend == "interpret",
        name=name,
    )


def default_backend() -> str:
    """The kernel backend for jax's default platform: Triton on GPU, Mosaic on TPU."""
    platform = jax.default_backend()
    if platform == "gpu":
        return "triton"
    if platform == "tpu":
        return "mosaic_tpu"
    return "interpret"

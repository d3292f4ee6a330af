"""Pieces shared by the flash-attention forward and backward kernels.

`FlashConfig` is the static description of one attention call (shapes after padding, masks,
backend); `tile_logits` computes one [block_q, block_k] tile of scaled, biased, masked logits
inside a kernel; the remaining helpers build the backend-specific pallas_call arguments.

Inside the kernels every array is in [batch, heads, seq, head_dim] layout ("BHSD"), so a
block's last two dims are (seq, head_dim): what TPU tiling wants, and plain strides on GPU.

Two kernel families share these pieces:
- "streamed" (Mosaic TPU, and interpret mode): K/V blocks stream through an innermost grid
  axis, so VMEM holds a few tiles whatever the sequence length (flash_streamed.py);
- "loop" (Triton): one program per query block loops over key blocks inside the kernel
  (flash_attention.py, flash_attention_bwd.py).
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
    kernels: str = "streamed"  # "streamed" (TPU, interpret) or "loop" (Triton)
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


def tile_logits(cfg: FlashConfig, q, k, q_start, k_start, q_seg=None, kv_seg=None, slope=None,
                *, keys_major: bool = False):
    """Scaled logits of one tile, float32 [block_q, block_k], with ALiBi and masks applied.

    q [block_q, head_dim] and k [block_k, head_dim] are tiles starting at query row `q_start`
    and key row `k_start`; q_seg [block_q, 1] and kv_seg [1, block_k] are their segment ids;
    `slope` is this head's ALiBi slope (a scalar). Masked logits become MASK_VALUE.

    keys_major=True gives the transposed tile, [block_k, block_q] = k @ q^T (the dk/dv
    kernel's orientation, where per-query vectors are lane-dense rows); then q_seg is a
    [1, block_q] row and kv_seg a [block_k, 1] column.
    """
    a, b = (k, q) if keys_major else (q, k)
    logits = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    logits = logits * cfg.scale
    shape = logits.shape
    q_axis, k_axis = (1, 0) if keys_major else (0, 1)
    if cfg.causal or cfg.has_alibi or cfg.keys_padded:
        # Absolute positions: query row r sits at key position r + offset.
        q_pos = q_start + cfg.offset + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
    if cfg.has_alibi:
        logits = logits - slope * (q_pos - k_pos).astype(jnp.float32)
    mask = None
    if cfg.causal:
        mask = q_pos >= k_pos
    if cfg.keys_padded:  # keys past the true length are padding added by the wrapper
        valid = k_pos < cfg.kv_len
        mask = valid if mask is None else mask & valid
    if cfg.has_segments:
        same = q_seg == kv_seg  # a column == a row -> the tile's shape
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


def visible_tiles(cfg: FlashConfig) -> int:
    """(query block, key block) tiles one head computes: all, or those not fully masked by
    causality (the diagonal's partial tiles count whole). A Python int, for cost estimates."""
    if not cfg.causal:
        return cfg.num_q_blocks * cfg.num_kv_blocks
    return sum(
        min((i * cfg.block_q + cfg.block_q - 1 + cfg.offset) // cfg.block_k + 1, cfg.num_kv_blocks)
        for i in range(cfg.num_q_blocks)
    )


def compiler_params(cfg: FlashConfig, semantics):
    """Backend compiler parameters; `semantics` is the grid's TPU dimension semantics, or
    an int n for n independent ("parallel") dimensions."""
    if isinstance(semantics, int):
        semantics = ("parallel",) * semantics
    if cfg.backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=tuple(semantics))
    return None


def scalar_table_spec(cfg: FlashConfig):
    """BlockSpec for a small per-head table read with a dynamic scalar index (ALiBi slopes).

    On TPU scalars must come from SMEM; elsewhere the whole array is the block.
    """
    if cfg.backend == "mosaic_tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def call_kwargs(cfg: FlashConfig, semantics, name: str, cost=None) -> dict:
    """The keyword arguments every flash pallas_call shares.

    `cost` is the kernel's pl.CostEstimate: XLA cannot see inside a custom call, so without
    it the compiled cost analysis (flops, optimal_seconds) leaves attention out.
    """
    return dict(
        compiler_params=compiler_params(cfg, semantics),
        interpret=cfg.backend == "interpret",
        name=name,
        cost_estimate=cost,
    )


def cost_estimate(cfg: FlashConfig, num_heads: int, head_dim: int, matmuls: int,
                  bytes_accessed: int):
    """pl.CostEstimate of a kernel that, on every visible tile of `num_heads` (batch x heads)
    attention heads, does `matmuls` products of [block_q, block_k] by head_dim (2 flops per
    multiply-add) and one exp per logit."""
    tiles = num_heads * visible_tiles(cfg)
    logits = tiles * cfg.block_q * cfg.block_k
    return pl.CostEstimate(
        flops=int(2 * matmuls * logits * head_dim),
        transcendentals=int(logits),
        bytes_accessed=int(bytes_accessed),
    )


def default_backend(platform: str | None = None) -> str:
    """The kernel backend for `platform` (default: jax's default platform): Triton on GPU,
    Mosaic on TPU, interpret mode elsewhere."""
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "triton"
    if platform == "tpu":
        return "mosaic_tpu"
    return "interpret"


def split_optional_refs(cfg: FlashConfig, refs):
    """(q_seg_ref, kv_seg_ref, slopes_ref, rest) from the optional inputs at the head of refs."""
    q_seg_ref = kv_seg_ref = slopes_ref = None
    if cfg.has_segments:
        q_seg_ref, kv_seg_ref, *refs = refs
    if cfg.has_alibi:
        slopes_ref, *refs = refs
    return q_seg_ref, kv_seg_ref, slopes_ref, refs

"""LoRA and DoRA adapters on named linear layers and on the token embedding (SPEC §1, §5).

`config.model.adapter` names the adapter: `kind` ("none", "lora" or "dora"), `rank` r,
`alpha`, `dropout`, `rslora` and `targets` (attribute names of layers: `qkv_proj`,
`out_proj`, `proj_1`, `proj_2`, `token_embeddings`, `lm_head`, ...). `attach` gives each
targeted layer a `LowRank` module; the model's forward pass then computes, for a kernel
W [in, out] (a linear layer's, or the embedding table read as a one-hot product):

  LoRA:  y = x W + s (dropout(x) A) B                       A [in, r], B [r, out]
  DoRA:  y = (m / n) (x W + s (x A) B),  n = ||W + s A B|| per output column (no gradient)

with s = alpha / r (alpha / sqrt(r) with rsLoRA). With dropout active, DoRA's base term is
split as peft does: x W + (m/n - 1) dropout(x) W + (m/n) s (dropout(x) A) B. Initialisation
follows peft: a linear layer's A ~ U(+-1/sqrt(in)) and B = 0; the embedding's A = 0 and
B ~ N(0, 1); DoRA's m = n at the start (`init_magnitudes`), so an adapted model starts equal
to its base. The embedding adapter changes the lookup only: a tied output head keeps reading
the base table (as peft's wrapped embedding does).

Adapter parameters are `AdapterParam`s: when adapters are on, they are the only variables
that train (elmjax/trainable.py). OLMoE's experts (stacked weights, not `Linear` layers) take
no adapters.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax.layers.init import param
from elmjax.validation import ConfigError

ADAPTER_KINDS = ("none", "lora", "dora")
EMBEDDING_TARGET = "token_embeddings"


class AdapterParam(nnx.Param):
    """A parameter of an adapter (LoRA's A and B, DoRA's magnitude)."""


# The dropout key of the forward pass being traced; None (the default) means no dropout, as
# in evaluation and generation. The train step sets it with `dropout_key`.
_DROPOUT_KEY = contextvars.ContextVar("adapter_dropout_key", default=None)


@contextlib.contextmanager
def dropout_key(key):
    """Within this context, adapters with dropout > 0 drop their inputs with `key` (each
    adapter folds in its own index, so layers draw independent masks)."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


# True while the base model is wanted (DPO's reference pass): every adapter is skipped.
_DISABLED = contextvars.ContextVar("adapters_disabled", default=False)


@contextlib.contextmanager
def disabled():
    """Within this context the model computes its base outputs, as if it had no adapters.

    Read while tracing: wrap the forward call inside the traced function (as DPO's reference
    pass does), not around a call of an already-compiled function."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


def scale(adapter_config) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    rank = adapter_config.rank
    return float(adapter_config.alpha) / (math.sqrt(rank) if adapter_config.rslora else rank)


def target_names(adapter_config) -> tuple[str, ...]:
    """The configured target layer names (a comma-separated string), in order, without blanks.
    Brackets and quotes around them are dropped: `('qkv_proj',)` and `[qkv_proj]` on a command
    line mean `qkv_proj`."""
    names = (name.strip().strip("()[]'\" ") for name in adapter_config.targets.split(","))
    return tuple(name for name in names if name)


class LowRank(nnx.Module):
    """The adapter of one kernel W [in, out]: A [in, r], B [r, out] and, for DoRA, m [out]."""

    def __init__(self, in_features: int, out_features: int, adapter_config, logical_axes: tuple, *,
                 embedding: bool, index: int, param_dtype):
        rank = adapter_config.rank
        if embedding:  # peft: A = 0, B ~ N(0, 1)
            a_init, b_init = ("zeros",), ("normal", 1.0)
        else:  # peft's kaiming_uniform(a=sqrt(5)) on A is U(+-1/sqrt(in)); B = 0
            a_init, b_init = ("uniform", in_features**-0.5), ("zeros",)
        self.lora_a = param((in_features, rank), param_dtype, (logical_axes[0], None), a_init, AdapterParam)
        self.lora_b = param((rank, out_features), param_dtype, (None, logical_axes[1]), b_init, AdapterParam)
        # DoRA's magnitude [out]; `init_magnitudes` sets it to the adapted kernel's column norms.
        self.magnitude = (
            param((out_features,), param_dtype, (logical_axes[1],), ("ones",), AdapterParam)
            if adapter_config.kind == "dora" else None
        )
        self.scale = scale(adapter_config)
        self.dropout = 0.0 if embedding else float(adapter_config.dropout)  # peft: no dropout on embeddings
        self.index = index

    def delta(self):
        """s A B [in, out] float32: what merging adds to the kernel (the exporters' merge,
        elmjax/convert/adapters.py, computes the same on checkpoints)."""
        return self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))

    def column_norms(self, kernel):
        """||W + s A B|| over the input axis: [out] float32."""
        return jnp.linalg.norm(kernel.astype(jnp.float32) + self.delta(), axis=0)

    def _magnitude_scale(self, kernel):
        """m / n [out] float32, n without gradient (the DoRA paper, §4.3)."""
        return self.magnitude[...].astype(jnp.float32) / jax.lax.stop_gradient(self.column_norms(kernel))

    def _dropped(self, x):
        key = _DROPOUT_KEY.get()
        if key is None or self.dropout == 0.0:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(key, self.index), 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)

    def linear(self, x, kernel, base):
        """The adapted output of a linear layer, without its bias.

        x [..., in] in the compute dtype; kernel [in, out]; base = x W [..., out] float32.
        Returns [..., out] float32.
        """
        if _DISABLED.get():
            return base
        dropped = self._dropped(x)
        low = _matmul(_matmul(dropped, self.lora_a[...].astype(x.dtype)).astype(x.dtype),
                      self.lora_b[...].astype(x.dtype))
        lora = self.scale * low
        if self.magnitude is None:
            return base + lora
        mag = self._magnitude_scale(kernel)
        if dropped is x:
            return mag * (base + lora)
        return base + (mag - 1.0) * _matmul(dropped, kernel.astype(x.dtype)) + mag * lora

    def embedding(self, tokens, table, base):
        """The adapted lookup: tokens [...] int, table [vocab, dim], base = table[tokens]
        [..., dim] float32 -> [..., dim] float32."""
        if _DISABLED.get():
            return base
        rows = jnp.take(self.lora_a[...], tokens, axis=0).astype(jnp.float32)  # [..., r]
        lora = self.scale * (rows @ self.lora_b[...].astype(jnp.float32))
        if self.magnitude is None:
            return base + lora
        return self._magnitude_scale(table) * (base + lora)


def _matmul(x, w):
    """x [..., k] @ w [k, n] with float32 accumulation."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def attach(model, model_config) -> None:
    """Gives every layer `config.model.adapter.targets` names a `LowRank` adapter (in place).

    A linear layer is targeted by its attribute name (`qkv_proj` adapts every block's
    qkv_proj); `token_embeddings` adapts the embedding lookup. Raises ConfigError for a target
    that names no layer of the model.
    """
    from elmjax.layers.linear import Linear

    adapter_config = model_config.adapter
    if adapter_config.kind == "none":
        return
    targets = target_names(adapter_config)
    param_dtype = jnp.dtype(model_config.param_dtype)
    found, names, index = set(), set(), 0
    for path, module in list(nnx.iter_modules(model)):
        if not isinstance(module, Linear) or not path:
            continue
        names.add(str(path[-1]))
        if path[-1] in targets:
            in_features, out_features = module.kernel.shape
            module.adapter = LowRank(in_features, out_features, adapter_config, module.logical_axes,
                                     embedding=False, index=index, param_dtype=param_dtype)
            found.add(path[-1])
            index += 1
    if EMBEDDING_TARGET in targets:
        vocab, dim = model.token_embeddings.shape
        model.embedding_adapter = LowRank(vocab, dim, adapter_config, ("vocab", "embed"), embedding=True,
                                          index=index, param_dtype=param_dtype)
        found.add(EMBEDDING_TARGET)
    missing = [name for name in targets if name not in found]
    if missing:
        raise ConfigError(
            "model.adapter.targets",
            f"{missing[0]!r} names no linear layer of this {model_config.family} model; "
            f"choose from {', '.join(sorted(names | {EMBEDDING_TARGET}))} (comma-separated, e.g. qkv_proj,out_proj)",
        )


def adapted_kernels(model):
    """(LowRank, base kernel [in, out]) for every adapter of `model`."""
    from elmjax.layers.linear import Linear

    pairs = [
        (module.adapter, module.kernel[...])
        for _, module in nnx.iter_modules(model)
        if isinstance(module, Linear) and module.adapter is not None
    ]
    if getattr(model, "embedding_adapter", None) is not None:
        pairs.append((model.embedding_adapter, model.token_embeddings[...]))
    return pairs


def init_magnitudes(model) -> None:
    """DoRA: sets every magnitude to its kernel's column norms ||W + s A B|| (= ||W|| while
    B = 0), in place, so the adapted model starts equal to its base. No-op for LoRA."""
    for adapter, kernel in adapted_kernels(model):
        if adapter.magnitude is not None:
            adapter.magnitude[...] = adapter.column_norms(kernel).astype(adapter.magnitude.dtype)

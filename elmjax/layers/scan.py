"""Runs of alike layers compiled once: `jax.lax.scan` over a run instead of one copy per layer.

An unrolled decoder hands the compiler one forward, one recomputation and one backward per
layer, so compile time grows with depth (OpenELM-1.1B: 28 layers). Consecutive layers with
the same shapes (every layer of OLMoE and BTLM) can share one compiled body: their
parameters are stacked along a new leading axis and `scan` walks the run.

OpenELM's layers differ: heads change in plateaus, the FFN width changes every layer. With
`model.scan_padding = p > 0`, layers of one head plateau may also share a body: each FFN is
zero-padded to the widest in its run. Zero columns of SwiGLU's gate and up projections and
zero rows of its down projection add exactly nothing to the output and get zero gradient,
so the model computes the same function; the price is the padded matmuls, at most a
fraction p of the layers' matmul FLOPs (`plan_runs` picks the fewest runs within it).

Parameters stay stored per layer (checkpoints, converters and adapters see the same tree);
only the forward pass stacks them, so the stacking and its gradient's unstacking cost one
copy of a run's parameters (those cast before use in the compute dtype). Under gradient
accumulation the TPU compiler hoists the casts and stacks out of the micro-batch loop (once
per step, alive through it); the gradients are unstacked per micro-batch. The copy is small
next to a layer's working set: OpenELM-3B on 8 v5p chips needs 0.12 GiB more per chip than
a variant that picks each layer's parameters inside the loop (`lax.switch`, no stacked copy;
TPU compiler's memory analysis, bench/README.md). Storing parameters stacked per run was
measured too (not built): on the TPU it needs more memory (the stored padding, and no smaller
peak); on XLA:CPU the step compiles 1.4x faster than unrolled, short of 2x (bench/README.md).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax.parallel.sharding import constrain

FFN_AXIS = "mlp"  # the logical axis of FFN inner widths: the only one padding may grow


def _shape(spec) -> tuple:
    return (spec.num_query_heads, spec.num_kv_heads, spec.ffn_dim)


def padding_cost(run_specs, matmul_params) -> int:
    """Extra matmul parameters of a run's layers with their FFNs padded to the run's widest."""
    widest = max(spec.ffn_dim for spec in run_specs)
    return sum(matmul_params(dataclasses.replace(spec, ffn_dim=widest)) - matmul_params(spec) for spec in run_specs)


def plan_runs(schedule, *, max_padding: float, matmul_params) -> tuple[tuple[int, ...], ...]:
    """Consecutive layer indices grouped into runs that share one compiled body.

    A run holds layers with equal attention heads; their FFN widths may differ, padded to
    the run's widest. Among groupings whose padded matmul parameters exceed the true ones by
    at most `max_padding` (a fraction of all layers' matmul parameters), this returns one
    with the fewest runs (then the least padding). `max_padding=0` groups identical layers.

    Args:
      schedule: per-layer `LayerSpec`s, first layer first.
      max_padding: allowed extra matmul parameters, a fraction >= 0.
      matmul_params: `fn(spec) -> int`, one layer's matmul weights a token uses.
    """
    n = len(schedule)
    total = sum(matmul_params(spec) for spec in schedule)

    def extra(start, stop):  # padding cost of one run [start, stop), None if it cannot be a run
        heads = {_shape(s)[:2] for s in schedule[start:stop]}
        if len(heads) > 1:
            return None
        return padding_cost(schedule[start:stop], matmul_params)

    # best[i][k]: (least padding, cut points) covering layers [0, i) with k runs.
    best = [dict() for _ in range(n + 1)]
    best[0][0] = (0, ())
    for stop in range(1, n + 1):
        for start in range(stop):
            cost = extra(start, stop)
            if cost is None:
                continue
            for k, (padding, cuts) in best[start].items():
                candidate = (padding + cost, cuts + (start,))
                if k + 1 not in best[stop] or candidate[0] < best[stop][k + 1][0]:
                    best[stop][k + 1] = candidate
    budget = max_padding * total
    runs_count = min(k for k, (padding, _) in best[n].items() if padding <= budget)
    cuts = best[n][runs_count][1] + (n,)
    return tuple(tuple(range(cuts[i], cuts[i + 1])) for i in range(runs_count))


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How a model's layers compile: its per-layer shapes and their runs (`plan_runs`)."""

    schedule: tuple  # per-layer LayerSpecs, first layer first
    runs: tuple  # groups of consecutive layer indices; a group of one runs unrolled
    padding: float  # extra matmul FLOPs of the padded FFNs, a fraction of the layers' total

    @property
    def scanned(self) -> tuple:
        """The runs that compile as a loop (more than one layer)."""
        return tuple(run for run in self.runs if len(run) > 1)

    def describe(self) -> str:
        """One line: how many compiled layer bodies, the runs' lengths and the padding's cost."""
        if not self.scanned:
            return f"layers: {len(self.schedule)}, compiled one by one (no scanned runs)"
        return (f"layers: {len(self.schedule)}, compiled as {len(self.runs)} bodies (runs of "
                f"{', '.join(str(len(run)) for run in self.runs)} layers; FFN padding adds "
                f"{100 * self.padding:.1f}% of the layers' matmul FLOPs)")


def plan_for(model_config) -> LayerPlan:
    """The `LayerPlan` of a validated `config.model` (one run per layer when `scan_layers` is off)."""
    from elmjax import models

    from elmjax.layers.adapters import EMBEDDING_TARGET, target_names

    family = models.get(model_config.family)
    schedule = tuple(family.layer_specs(model_config))
    adapter = model_config.adapter
    # Adapters in the blocks carry a per-layer index (their dropout stream), so adapted blocks
    # differ in structure and run one by one.
    adapted_blocks = adapter.kind != "none" and set(target_names(adapter)) - {EMBEDDING_TARGET}
    if not model_config.scan_layers or adapted_blocks:
        return LayerPlan(schedule, tuple((i,) for i in range(len(schedule))), 0.0)
    cost = lambda spec: family.layer_matmul_params(model_config, spec)  # noqa: E731
    runs = plan_runs(schedule, max_padding=model_config.scan_padding, matmul_params=cost)
    extra = sum(padding_cost([schedule[i] for i in run], cost) for run in runs)
    return LayerPlan(schedule, runs, extra / max(sum(cost(spec) for spec in schedule), 1))


def _pad_ffn(value, target_shape, logical_axes, ffn_dim: int, widest_ffn: int):
    """`value` zero-padded to `target_shape` along its FFN axis; a fused axis holding k
    FFN-wide chunks (SwiGLU's [gate | up]) pads every chunk at its end."""
    if value.shape == tuple(target_shape):
        return value
    axis = next(i for i, (a, b) in enumerate(zip(value.shape, target_shape)) if a != b)
    if logical_axes[axis] != FFN_AXIS or value.shape[axis] % ffn_dim:
        raise ValueError(f"cannot pad axis {axis} ({logical_axes[axis]!r}) of a {value.shape} parameter "
                         f"to {tuple(target_shape)}: only FFN widths ({FFN_AXIS!r}) are padded")
    chunks = value.shape[axis] // ffn_dim
    split = value.reshape(value.shape[:axis] + (chunks, ffn_dim) + value.shape[axis + 1:])
    widths = [(0, 0)] * split.ndim
    widths[axis + 1] = (0, widest_ffn - ffn_dim)
    return jnp.pad(split, widths).reshape(target_shape)


def split_run(blocks):
    """(graphdef, each block's nnx.State, each block's flat {path: array}) of a run; None when
    the blocks differ in structure (e.g. per-layer adapter indices): the caller then runs
    them one by one."""
    graphdefs_and_states = [nnx.split(block) for block in blocks]
    graphdef = graphdefs_and_states[0][0]
    if any(other != graphdef for other, _ in graphdefs_and_states):
        return None
    flats = [{path: jnp.asarray(v[...]) for path, v in nnx.to_flat_state(state)} for _, state in graphdefs_and_states]
    return graphdef, [state for _, state in graphdefs_and_states], flats


def scan_run(blocks, ffn_dims, h, rope, segment_ids, remat_policy):
    """Runs `blocks` (one run of `plan_runs`) over `h` [batch, seq, model_dim] with one scan.

    Returns (h, [each block's aux dict or None]), or None when the blocks cannot share a body.
    """
    split = split_run(blocks)
    if split is None:
        return None
    graphdef, states, flats = split
    widest = max(range(len(blocks)), key=lambda i: ffn_dims[i])
    template = states[widest]
    paths = list(flats[widest])
    axes = {path: v.get_metadata().get("out_sharding") for path, v in nnx.to_flat_state(template)}
    cast = _compute_dtypes(blocks[widest])
    weights = {}  # aux loss name -> weight (a Python float, recorded while tracing the body)

    def stack(values, path):  # [layers, *parameter shape], FFN widths padded to the widest
        target = flats[widest][path].shape
        logical = axes.get(path) or (None,) * len(target)
        if path in cast:  # the layer casts it before use anyway: stack half the bytes
            values = [v.astype(cast[path]) for v in values]
        padded = [_pad_ffn(v, target, logical, f, ffn_dims[widest]) for v, f in zip(values, ffn_dims)]
        return constrain(jnp.stack(padded), (None, *logical), fit=True)

    def body(h, layer_params):
        block = nnx.merge(graphdef, _with_values(template, dict(zip(paths, layer_params))))
        h, aux = block(h, rope, segment_ids)
        if aux is None:
            return h, None
        for name, (_, weight) in aux["losses"].items():
            weights[name] = weight
        return h, {"losses": {name: value for name, (value, _) in aux["losses"].items()},
                   "metrics": dict(aux["metrics"])}

    if remat_policy is not None:
        body = jax.checkpoint(body, policy=remat_policy, prevent_cse=False)
    stacked = [stack([flat[path] for flat in flats], path) for path in paths]
    h, stacked_aux = jax.lax.scan(body, h, stacked)
    if stacked_aux is None:
        return h, [None] * len(blocks)
    per_layer = []
    for k in range(len(blocks)):
        layer = jax.tree.map(lambda x, k=k: x[k], stacked_aux)
        per_layer.append({"losses": {name: (value, weights[name]) for name, value in layer["losses"].items()},
                          "metrics": layer["metrics"]})
    return h, per_layer


def _compute_dtypes(block) -> dict:
    """{flat path: dtype} of the block's parameters that its modules cast before any use
    (each module's `cast_before_use()`: {path within the module: dtype}). Stacking them in that
    dtype gives the layer the very values it would compute with, in fewer bytes."""
    params = {path for path, _ in nnx.to_flat_state(nnx.state(block))}
    dtypes = {}
    for path, module in nnx.iter_modules(block):
        declared = getattr(module, "cast_before_use", None)
        if declared is not None:
            dtypes.update({(*path, *within): dtype for within, dtype in declared().items()})
    unknown = sorted(set(dtypes) - params)
    if unknown:  # a renamed parameter would otherwise silently stack at full width
        raise ValueError(f"cast_before_use names {'/'.join(map(str, unknown[0]))}, which is not a parameter of the block")
    return dtypes


def _with_values(template, values_by_path):
    """A copy of the nnx.State `template` holding `values_by_path` (flat path -> array)."""
    return nnx.from_flat_state(
        [(path, variable.replace(values_by_path[path])) for path, variable in nnx.to_flat_state(template)]
    )

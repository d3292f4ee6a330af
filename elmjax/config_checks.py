"""`validate(config)`: every field of a run's config (elmjax/config.py) checked, the first bad
one raised as a ConfigError naming the field and what is allowed."""
from __future__ import annotations

import math

import ml_collections

from elmjax import models
from elmjax.data.formats import DATA_FORMATS, TEXT_UNITS, chat_header, parse_mixture_weights, source_entries
from elmjax.layers.remat import REMAT_POLICY_NAMES
from elmjax.parallel.sharding import MESH_AXES
from elmjax.training import stage_plan
from elmjax.validation import ConfigError, at_least, check_expert_axis, choice, require

NORM_TYPES = ("rms_norm", "layer_norm")
QK_NORM_STYLES = ("per_head", "full", "none")
POSITION_ENCODINGS = ("rope", "alibi")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = REMAT_POLICY_NAMES
NONFINITE_ACTIONS = ("skip", "abort")
HOST_MEMORY_MODES = ("auto", "on", "off")  # elmjax.training.host_memory.apply
LR_SCHEDULES = ("cosine", "linear", "constant")
WEIGHT_DECAY_ON = ("matrices", "all")  # elmjax.training.optim.param_groups
OBJECTIVES = ("lm", "dpo")


# Shorthands for the shared sections' checks.
_require = require


def _choice(config: ml_collections.ConfigDict, section: str, name: str, allowed) -> None:
    choice(config[section], section, name, allowed)


def validate(config: ml_collections.ConfigDict, *, reads_inputs: bool = True) -> ml_collections.ConfigDict:
    """Checks every field; raises `ConfigError` naming the first bad one. Returns `config`.

    `reads_inputs=False` is for commands that use the config's shapes only (a dry run, a
    parameter count): adapters and DPO then need no `train.init_from` to start from, and a
    recipe whose data the user names (DPO's preference file) needs no `data.source`."""
    model = config.model
    family = models.get(model.family)  # ConfigError listing the known families
    missing = [name for name in family.model_fields() if name not in model]
    _require(
        not missing,
        f"model.{missing[0]}" if missing else "model",
        f"is missing for family {family.name!r}; build the config with "
        f"elmjax.config.family_config({family.name!r}, ...) so it has the family's fields",
    )
    at_least(model, "model", "num_layers", 1)
    at_least(model, "model", "model_dim", 1)
    if model.position_encoding == "rope":
        _require(
            model.head_dim >= 2 and model.head_dim % 2 == 0,
            "model.head_dim",
            f"is {model.head_dim}; need an even number >= 2 (RoPE rotates pairs)",
        )
    at_least(model, "model", "head_dim", 1)
    _require(
        model.model_dim % model.head_dim == 0,
        "model.head_dim",
        f"{model.head_dim} does not divide model.model_dim={model.model_dim}",
    )
    at_least(model, "model", "vocab_size", 2)
    at_least(model, "model", "max_seq_len", 1)
    _require(model.rope_theta > 0, "model.rope_theta", f"is {model.rope_theta}; need > 0")
    _require(0 < model.norm_eps < 1, "model.norm_eps", f"is {model.norm_eps}; need 0 < eps < 1")
    _choice(config, "model", "norm_type", NORM_TYPES)
    _choice(config, "model", "qk_norm", QK_NORM_STYLES)
    _choice(config, "model", "position_encoding", POSITION_ENCODINGS)
    _choice(config, "model", "attention_impl", ATTENTION_IMPLS)
    _choice(config, "model", "compute_dtype", DTYPES)
    _choice(config, "model", "param_dtype", DTYPES)
    _choice(config, "model", "remat_policy", REMAT_POLICIES)
    at_least(model, "model", "logit_chunks", 1)
    _require(isinstance(model.scan_layers, bool), "model.scan_layers", f"is {model.scan_layers!r}; need True or False")
    _require(
        0 <= model.scan_padding < 1, "model.scan_padding",
        f"is {model.scan_padding}; need a fraction of extra FFN FLOPs in [0, 1), e.g. 0.05",
    )
    for name in ("embedding_scale", "logit_scale"):
        value = model[name]
        _require(
            math.isfinite(value) and value > 0, f"model.{name}", f"is {value}; need a positive number"
        )
    if model.attention_scale is not None:
        _require(
            model.attention_scale > 0,
            "model.attention_scale",
            f"is {model.attention_scale}; need > 0, or None for 1/sqrt(head_dim)",
        )
    _validate_mup_and_alibi(model)
    family.validate(model)
    _validate_adapter(config, reads_inputs)

    train = config.train
    for name in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "stop_check_every"):
        _require(train[name] >= 1, f"train.{name}", f"is {train[name]}; need >= 1")
    _require(
        train.batch_size % train.grad_accum_steps == 0,
        "train.grad_accum_steps",
        f"{train.grad_accum_steps} does not divide train.batch_size={train.batch_size}",
    )
    _require(
        train.seq_len <= model.max_seq_len,
        "train.seq_len",
        f"{train.seq_len} exceeds model.max_seq_len={model.max_seq_len}",
    )
    _require(train.z_loss >= 0, "train.z_loss", f"is {train.z_loss}; need >= 0")
    stage_plan.validate(config)
    _choice(config, "train", "nonfinite", NONFINITE_ACTIONS)
    at_least(train, "train", "max_nonfinite_streak", 1)
    _choice(config, "train", "reuse_host_memory", HOST_MEMORY_MODES)
    _validate_objective(config, reads_inputs)
    _require(
        isinstance(train.workdir, str), "train.workdir", f"is {train.workdir!r}; need a path string"
    )
    _require(
        isinstance(train.init_from, str),
        "train.init_from",
        f"is {train.init_from!r}; need a checkpoint path string or \"\"",
    )

    optim = config.optim
    _require(optim.peak_lr > 0, "optim.peak_lr", f"is {optim.peak_lr}; need > 0")
    _require(optim.init_lr >= 0, "optim.init_lr", f"is {optim.init_lr}; need >= 0")
    _require(
        0 <= optim.final_lr_ratio <= 1,
        "optim.final_lr_ratio",
        f"is {optim.final_lr_ratio}; need 0 <= ratio <= 1",
    )
    _require(optim.warmup_steps >= 0, "optim.warmup_steps", f"is {optim.warmup_steps}; need >= 0")
    _choice(config, "optim", "schedule", LR_SCHEDULES)
    for name in ("b1", "b2"):
        _require(0 <= optim[name] < 1, f"optim.{name}", f"is {optim[name]}; need 0 <= b < 1")
    _require(optim.eps > 0, "optim.eps", f"is {optim.eps}; need > 0")
    _require(optim.weight_decay >= 0, "optim.weight_decay", f"is {optim.weight_decay}; need >= 0")
    _choice(config, "optim", "weight_decay_on", WEIGHT_DECAY_ON)
    _require(optim.clip_norm >= 0, "optim.clip_norm", f"is {optim.clip_norm}; need >= 0")

    data = config.data
    _require(
        isinstance(data.source, str) and (data.source.strip() != "" or not reads_inputs),
        "data.source",
        f"is {data.source!r}; give `embedded`, `embedded:shakespeare`, `embedded:chat`, `seqio:NAME` or paths/globs",
    )
    _choice(config, "data", "format", DATA_FORMATS)
    _choice(config, "data", "text_unit", TEXT_UNITS)
    _require(data.text_field != "", "data.text_field", "is empty; name the JSONL field / Parquet column")
    try:
        parse_mixture_weights(data.mixture_weights, len(source_entries(data.source)))
    except ValueError as error:
        raise ConfigError("data.mixture_weights", str(error)) from None
    _validate_chat(data, config.train)
    _require(data.pad_id >= -1, "data.pad_id", f"is {data.pad_id}; need a token id >= 0, or -1")
    _require(
        data.pad_id < model.vocab_size,
        "data.pad_id",
        f"is {data.pad_id}; must be below model.vocab_size={model.vocab_size}",
    )
    _require(0 <= data.seed < 2**32, "data.seed", f"is {data.seed}; need 0 <= seed < 2**32")
    _require(data.num_workers >= 0, "data.num_workers", f"is {data.num_workers}; need >= 0")
    _require(data.prefetch >= 1, "data.prefetch", f"is {data.prefetch}; need >= 1")
    _require(
        0 <= data.eval_fraction < 1,
        "data.eval_fraction",
        f"is {data.eval_fraction}; need 0 <= fraction < 1",
    )

    checkpoint = config.checkpoint
    _require(
        checkpoint.every_steps >= 1,
        "checkpoint.every_steps",
        f"is {checkpoint.every_steps}; need >= 1",
    )
    _require(
        checkpoint.max_to_keep >= 1,
        "checkpoint.max_to_keep",
        f"is {checkpoint.max_to_keep}; need >= 1",
    )
    _require(
        checkpoint.keep_every >= 0, "checkpoint.keep_every", f"is {checkpoint.keep_every}; need >= 0"
    )

    _require(isinstance(config.eval.at_start, bool), "eval.at_start", f"is {config.eval.at_start!r}; need True or False")
    for name, minimum, meaning in (("every_steps", 0, " (0 = no held-out evaluation)"), ("batches", 1, "")):
        value = config.eval[name]
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, f"eval.{name}",
                 f"is {value!r}; need an integer >= {minimum}{meaning}")

    mesh = config.mesh
    _validate_rules(mesh.rules)
    sizes = [mesh[name] for name in MESH_AXES]
    for name, size in zip(MESH_AXES, sizes):
        _require(size == -1 or size >= 1, f"mesh.{name}", f"is {size}; need -1 or >= 1")
    _require(
        sizes.count(-1) <= 1,
        "mesh",
        "more than one axis is -1; at most one axis may take the devices left over",
    )
    _require(
        family.has_experts or mesh.expert == 1,
        "mesh.expert",
        f"is {mesh.expert}; the {family.name!r} family has no experts to shard, so an expert axis "
        "would only repeat all compute; set mesh.expert=1",
    )
    if family.has_experts and mesh.expert > 1:
        check_expert_axis(family.num_experts(model), mesh.expert)
    return config


def _validate_rules(rules) -> None:
    """`mesh.rules`: (logical axis, mesh axes) pairs, the mesh axes None, one name or a tuple
    of distinct names of the mesh."""
    form = ("need ((logical_axis, mesh_axes), ...) pairs, mesh_axes being None, a mesh axis or a tuple of "
            f"them (mesh axes: {', '.join(MESH_AXES)}); the default is elmjax/config.py's DEFAULT_SHARDING_RULES")
    pairs = rules if isinstance(rules, (tuple, list)) else None
    _require(pairs is not None and all(isinstance(pair, (tuple, list)) and len(pair) == 2
                                       and isinstance(pair[0], str) for pair in pairs),
             "mesh.rules", f"is {rules!r}; {form}")
    for logical, target in pairs:
        if target is None:
            continue
        axes = (target,) if isinstance(target, str) else target
        _require(isinstance(axes, (tuple, list)) and all(isinstance(axis, str) and axis in MESH_AXES for axis in axes)
                 and len(set(axes)) == len(axes), "mesh.rules",
                 f"maps {logical!r} to {target!r}, which is not None, a mesh axis or a tuple of distinct ones; {form}")


def _validate_adapter(config, reads_inputs: bool) -> None:
    """`model.adapter`: its kind, shape and targets; adapters need a base (`train.init_from`)."""
    from elmjax.layers.adapters import ADAPTER_KINDS, target_names

    adapter = config.model.adapter
    choice(adapter, "model.adapter", "kind", ADAPTER_KINDS)
    if adapter.kind == "none":
        return
    at_least(adapter, "model.adapter", "rank", 1)
    _require(adapter.alpha > 0, "model.adapter.alpha", f"is {adapter.alpha}; need > 0")
    _require(0 <= adapter.dropout < 1, "model.adapter.dropout", f"is {adapter.dropout}; need 0 <= p < 1")
    _require(
        bool(target_names(adapter)), "model.adapter.targets",
        f"is empty; name the layers to adapt, e.g. {models.get(config.model.family).adapter_targets}",
    )
    adapter.targets = ",".join(target_names(adapter))  # one spelling, saved and compared on resume
    _require(
        config.train.init_from != "" or not reads_inputs,
        "train.init_from",
        "is empty, but adapters train over a frozen base model: give the base's training workdir or "
        "step directory (tools/import_hf.py turns a Hugging Face model into one)",
    )


def _validate_objective(config, reads_inputs: bool) -> None:
    """`train.objective` and, for DPO, the `dpo` section: DPO's reference is the frozen base
    under adapters, and pairs of rows stay whole in every micro-batch."""
    from elmjax.training.dpo import DPO_LOSSES, DPO_REFERENCES

    _choice(config, "train", "objective", OBJECTIVES)
    if config.train.objective != "dpo":
        return
    _choice(config, "dpo", "loss", DPO_LOSSES)
    _choice(config, "dpo", "reference", DPO_REFERENCES)
    _require(config.dpo.beta > 0, "dpo.beta", f"is {config.dpo.beta}; need > 0")
    _require(not config.train.stages, "train.stages", "is set; DPO trains in one stage (remove train.stages)")
    if config.dpo.reference == "base":
        _require(
            config.model.adapter.kind != "none",
            "model.adapter.kind",
            "is 'none', but dpo.reference='base' is the frozen base under adapters; set model.adapter.kind=lora "
            "or dora, or dpo.reference=initial (a frozen copy of the starting weights)",
        )
    else:
        _require(
            config.model.adapter.kind == "none",
            "dpo.reference",
            "is 'initial' (a copy of the starting weights), but adapters are on: their frozen base already is the "
            "reference, so use dpo.reference=base",
        )
        _require(
            config.train.init_from != "" or not reads_inputs,
            "train.init_from",
            "is empty; DPO starts from a trained model (its starting weights are the reference): give its "
            "workdir or step directory",
        )
    pairs_per_step = 2 * config.train.grad_accum_steps
    _require(
        config.train.batch_size % pairs_per_step == 0,
        "train.batch_size",
        f"is {config.train.batch_size}; DPO needs whole (chosen, rejected) pairs in each of the "
        f"{config.train.grad_accum_steps} micro-batch(es): use a multiple of {pairs_per_step}",
    )


def _validate_chat(data, train) -> None:
    """data.chat_template, data.messages_field and data.max_prompt_len."""
    _require(isinstance(data.chat_template, str), "data.chat_template",
             f"is {data.chat_template!r}; need a template name or header string")
    if data.chat_template:
        try:
            chat_header(data.chat_template)
        except ValueError as error:
            raise ConfigError("data.chat_template", str(error)) from None
    elif "embedded:chat" in source_entries(data.source):
        raise ConfigError("data.chat_template", "is empty, but data.source reads embedded:chat "
                          "(conversations); set data.chat_template=openelm")
    _require(data.messages_field != "", "data.messages_field", "is empty; name the JSONL field of the messages")
    _require(
        0 <= data.max_prompt_len < train.seq_len,
        "data.max_prompt_len",
        f"is {data.max_prompt_len}; need 0 (= seq_len // 2) or fewer tokens than train.seq_len={train.seq_len}",
    )


def _validate_mup_and_alibi(model) -> None:
    """muP's and ALiBi scaling's shared model fields."""
    base = model.mup_base_width
    _require(
        isinstance(base, (int, float)) and math.isfinite(base) and base >= 0,
        "model.mup_base_width",
        f"is {base!r}; need a width > 0 for muP, or 0 for none",
    )
    for name in ("mup_output_alpha", "mup_init_std"):
        value = model[name]
        _require(math.isfinite(value) and value > 0, f"model.{name}", f"is {value}; need a positive number")
    factor, train_len = model.alibi_scaling_factor, model.alibi_train_seq_len
    for name, value in (("alibi_scaling_factor", factor), ("alibi_train_seq_len", train_len)):
        if value is not None:
            _require(
                model.position_encoding == "alibi",
                f"model.{name}",
                f"is {value}, but model.position_encoding is {model.position_encoding!r}; "
                "ALiBi scaling needs position_encoding='alibi'",
            )
    _require(
        factor is None or train_len is None,
        "model.alibi_train_seq_len",
        f"is {train_len} and model.alibi_scaling_factor is {factor}; set at most one "
        "(a fixed factor, or dynamic scaling past a training length)",
    )
    if factor is not None:
        _require(math.isfinite(factor) and factor > 0, "model.alibi_scaling_factor", f"is {factor}; need > 0")
    if train_len is not None:
        _require(train_len >= 1, "model.alibi_train_seq_len", f"is {train_len}; need >= 1")




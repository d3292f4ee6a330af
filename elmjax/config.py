"""The configuration schema: every shared field and its default (validation: config_checks.py).

A run's configuration is one `ml_collections.ConfigDict` with the sections `model`, `data`,
`train`, `optim`, `checkpoint`, `mesh` and `eval`. `base_config(family)` holds every field with
OpenELM's recipe defaults (shared/SPEC.md §1); `config.model.family` names the model family
(elmjax/models/), which adds its own model fields and validates them. The files in `configs/`
call `family_config()` (or `openelm_config()`) with a variant's few numbers. Per-layer lists
are never stored here: each family derives them from the model section.

Any field can be overridden on the command line (`--config.train.steps=100`); `validate()`
then rejects bad values with an error that names the field and what is allowed.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from elmjax import models
from elmjax.config_checks import validate
from elmjax.validation import ConfigError

__all__ = [
    "ConfigError", "base_config", "family_config", "load_config_file", "openelm_config", "validate", "with_adapters",
]

# Logical axis name -> mesh axes. Model code names only logical axes (shared/DESIGN.md).
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp", "expert")),  # the expert axis is data parallel outside MoE layers
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),  # the fused q|k|v output dim and the attention output dim
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("norm", None),
)

def base_config(family: str = "openelm") -> ml_collections.ConfigDict:
    """Every field with its default (OpenELM-270M's shape and the paper's recipe), plus the
    model fields of `family` with the family's defaults. ("one of NAMES": the allowed values,
    elmjax/config_checks.py.)"""
    config = ml_collections.ConfigDict()

    config.model = model = ml_collections.ConfigDict()
    model.family = family  # the model family (elmjax/models/): its own fields follow below
    model.num_layers = 16  # number of transformer blocks
    model.model_dim = 1280  # residual stream width d
    model.head_dim = 64  # width of one attention head
    model.vocab_size = 32000  # rows of the embedding matrix
    model.max_seq_len = 2048  # longest sequence the model is trained or evaluated on
    model.rope_theta = 10000.0  # RoPE base frequency
    model.norm_type = "rms_norm"  # one of NORM_TYPES
    model.norm_eps = 1e-6  # epsilon of every norm layer
    model.qk_norm = "per_head"  # one of QK_NORM_STYLES: per head (OpenELM), whole q/k (OLMoE)
    model.position_encoding = "rope"  # one of POSITION_ENCODINGS
    model.use_bias = False  # biases on linear layers (BTLM uses them)
    model.tie_embeddings = True  # logits = h @ embedding^T
    model.embedding_scale = 1.0  # multiplies token embeddings (muP uses 14.6)
    model.logit_scale = 1.0  # multiplies logits (muP uses 0.222)
    model.attention_scale = config_dict.placeholder(float)  # None: 1/sqrt(head_dim) (1/head_dim under muP)
    # muP (elmjax/mup.py), on when mup_base_width > 0: width multiplier m = model_dim / base.
    model.mup_base_width = 0.0  # width of the base model whose hyperparameters transfer; 0 = off
    model.mup_output_alpha = 1.0  # muP: logits x alpha / m (BTLM 2.22)
    model.mup_init_std = 0.02  # muP init: embedding std; hidden matrices std / sqrt(m) (BTLM 0.073)
    # ALiBi past the training context (HF `alibi_scaling`); at most one of the two; None = off.
    model.alibi_scaling_factor = config_dict.placeholder(float)  # slopes / F ({"type": "linear", "factor": F})
    model.alibi_train_seq_len = config_dict.placeholder(int)  # slopes / (key_len / N) when key_len > N
    model.attention_impl = "auto"  # one of ATTENTION_IMPLS
    model.compute_dtype = "float32"  # matmul dtype; bfloat16 on accelerators
    model.param_dtype = "float32"  # parameter storage dtype
    model.remat_policy = "none"  # activation checkpointing per block, one of REMAT_POLICIES
    # Compile runs of alike consecutive layers once, as a scan (elmjax/layers/scan.py): faster
    # compiles, the same function. scan_padding > 0 also joins layers of equal heads whose FFN
    # widths differ (OpenELM), zero-padding each FFN to its run's widest, for at most that
    # fraction of extra matmul FLOPs.
    model.scan_layers = True
    model.scan_padding = 0.0
    # The loss applies the output head in this many pieces along the sequence, each recomputed
    # in the backward pass: 1/chunks of the float32 [batch, seq, vocab] logits alive at a time.
    model.logit_chunks = 1
    for name, value in models.get(family).model_fields().items():
        model[name] = value
    # LoRA / DoRA adapters over a frozen base (elmjax/layers/adapters.py); defaults are SPEC §1's
    # PEFT recipe, off until `kind` is set (`with_adapters` also sets the recipe's optimizer).
    model.adapter = adapter = ml_collections.ConfigDict()
    adapter.kind = "none"  # one of ADAPTER_KINDS: none (every parameter trains), lora, dora
    adapter.rank = 32  # r
    adapter.alpha = 32.0  # scale s = alpha / r (alpha / sqrt(r) with rslora)
    adapter.dropout = 0.1  # on the inputs of adapted linear layers (not the embedding)
    adapter.rslora = False  # rank-stabilised scale alpha / sqrt(r)
    adapter.targets = models.get(family).adapter_targets  # layer names, comma-separated

    config.data = data = ml_collections.ConfigDict()
    data.source = "embedded"  # "embedded" (installed corpus) or a comma-separated list of globs
    data.format = "auto"  # auto (from the extension) | text | jsonl | parquet | token_store
    data.text_field = "text"  # field of a JSONL record or Parquet column holding the text
    data.text_unit = "file"  # a text file's documents: "file" (whole file) or "line"
    data.mixture_weights = ""  # comma-separated weights, one per source; empty = equal
    data.tokenizer = ""  # SentencePiece .model or tokenizer.json; empty = trained on the corpus
    data.add_bos = True  # prepend BOS to each document
    data.add_eos = True  # append EOS to each document
    data.pad_id = -1  # token id in padding positions (never in the loss); -1 = tokenizer's
    data.seed = 0  # shuffle seed
    data.num_workers = 0  # grain worker processes; 0 = in-process
    data.prefetch = 2  # batches prefetched per worker
    data.eval_fraction = 0.01  # documents held out for perplexity evaluation
    # Chat (elmjax/data/chat.py): "" = plain documents; "openelm" (OpenELM-Instruct's turns) or a
    # turn header holding "{role}" = documents are conversations, loss on assistant tokens only.
    data.chat_template = ""
    data.messages_field = "messages"  # JSONL field holding a conversation's [{role, content}, ...]
    # Preference pairs (elmjax/data/preference.py): prompt tokens kept when a pair is too long
    # (the prompt's end; then the completion is cut from the right). 0 = seq_len // 2.
    data.max_prompt_len = 0

    config.train = train = ml_collections.ConfigDict()
    train.steps = 350_000  # optimizer steps
    train.batch_size = 2048  # sequences per step, global
    train.seq_len = 2048  # tokens per sequence
    train.grad_accum_steps = 1  # micro-batches per optimizer step
    # Context stages (elmjax/training/stages.py): ((end, seq_len, batch_size), ...), each stage
    # training until `end` (cumulative, in train.stage_unit) at its own shape; the last end is
    # the run's end. () = one stage of seq_len x batch_size (which --dry_run always compiles).
    train.stages = ()
    train.stage_unit = "steps"  # what stage ends count: "steps" or "tokens"
    train.stages_equal_tokens = True  # require seq_len x batch_size to be the same in every stage
    train.seed = 0  # parameter initialisation seed
    train.z_loss = 1e-4  # weight of mean(logsumexp(logits)^2)
    train.log_every = 10  # steps between metrics lines
    train.stop_check_every = 1  # steps between multi-process agreements on SIGTERM/SIGINT
    train.nonfinite = "skip"  # one of NONFINITE_ACTIONS
    train.max_nonfinite_streak = 20  # with nonfinite=skip: stop after this many skipped steps in a row
    train.sample_at_end = True  # print a short generated sample when training ends
    train.workdir = ""  # where the run writes; "" = runs/<config file name>; --workdir overrides
    train.allow_config_change = False  # resume even if fields that change the computation differ
    train.init_from = ""  # workdir or step dir whose params start a fresh run (new optimizer)
    train.reuse_host_memory = "auto"  # one of HOST_MEMORY_MODES; "auto" = on when JAX runs on CPU
    train.objective = "lm"  # one of OBJECTIVES: next-token loss on loss_mask tokens, or DPO on preference pairs

    # DPO (elmjax/training/dpo.py), with train.objective="dpo": pairs of rows (chosen, rejected).
    config.dpo = dpo = ml_collections.ConfigDict()
    dpo.beta = 0.1  # inverse temperature of the implicit reward (OpenELM-Instruct: 0.01)
    dpo.loss = "sigmoid"  # one of DPO_LOSSES: -log sigmoid(beta delta), or hinge relu(1 - beta delta)
    dpo.reference = "base"  # one of DPO_REFERENCES: the frozen base under the adapters (adapters off), or
    # "initial": a frozen copy of the starting weights (every weight trains; one more copy in memory)

    config.optim = optim = ml_collections.ConfigDict()
    optim.peak_lr = 5.3e-3  # learning rate after warmup
    optim.init_lr = 1e-6  # learning rate at step 0
    optim.final_lr_ratio = 0.1  # final LR as a fraction of peak
    optim.warmup_steps = 5000  # linear warmup length
    optim.schedule = "cosine"  # one of LR_SCHEDULES, after warmup
    optim.b1 = 0.9
    optim.b2 = 0.95
    optim.eps = 1e-8
    optim.weight_decay = 0.1  # decoupled weight decay of the parameters `weight_decay_on` names
    optim.weight_decay_on = "matrices"  # one of WEIGHT_DECAY_ON: >=2-D weights (embedding too), or all
    optim.clip_norm = 1.0  # global gradient-norm clip; 0 disables

    config.checkpoint = checkpoint = ml_collections.ConfigDict()
    checkpoint.every_steps = 5000  # steps between checkpoints
    checkpoint.max_to_keep = 5  # newest checkpoints kept
    checkpoint.keep_every = 0  # also keep every K-th step forever; 0 = none
    checkpoint.async_save = True  # save in a background thread

    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # data-parallel axis size; -1 = the devices left over
    mesh.fsdp = 1  # fully-sharded data-parallel axis size
    mesh.tensor = 1  # tensor-parallel axis size
    mesh.expert = 1  # expert-parallel axis size
    mesh.rules = DEFAULT_SHARDING_RULES  # logical axis -> mesh axes

    config.eval = evaluation = ml_collections.ConfigDict()
    evaluation.every_steps = 0  # held-out perplexity every K steps; 0 = never
    evaluation.batches = 4  # batches per held-out evaluation
    evaluation.at_start = False  # also evaluate before the first step of a fresh run (fine-tunes)

    return config


def family_config(family: str, *, peak_lr: float | None = None, **model_fields) -> ml_collections.ConfigDict:
    """`base_config(family)` with `model_fields` set (and `optim.peak_lr`, when given).

    A name that is not a model field of the family is a ConfigError.
    """
    config = base_config(family)
    for name, value in model_fields.items():
        if name not in config.model:
            raise ConfigError(f"model.{name}", f"is not a model field of the {family!r} family")
        config.model[name] = value
    if peak_lr is not None:
        config.optim.peak_lr = peak_lr
    return config


def openelm_config(*, num_layers: int, model_dim: int, head_dim: int, peak_lr: float, **model_fields):
    """A config for an OpenELM variant from the paper's few numbers (SPEC §1)."""
    return family_config(
        "openelm", num_layers=num_layers, model_dim=model_dim, head_dim=head_dim, peak_lr=peak_lr, **model_fields
    )


def with_adapters(config: ml_collections.ConfigDict, kind: str = "lora") -> ml_collections.ConfigDict:
    """`config` set up for SPEC §1's PEFT recipe: `kind` adapters (r 32, alpha 32, dropout
    0.1 on the targets base_config gave: the family's `adapter_targets`, token_embeddings,
    qkv_proj, out_proj, proj_1, proj_2 for OpenELM) over the frozen base, AdamW (0.9, 0.95)
    without weight decay, cosine 3e-4 -> 3e-5 after 1000 warmup steps."""
    config.model.adapter.kind = kind
    config.optim.update(dict(peak_lr=3e-4, final_lr_ratio=0.1, warmup_steps=1000, schedule="cosine",
                             b1=0.9, b2=0.95, weight_decay=0.0))
    return config


def load_config_file(path) -> ml_collections.ConfigDict:
    """The config that the file at `path` builds with its `get_config()` (not validated)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"elmjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()

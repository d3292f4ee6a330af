"""Export an elmjax model to its family's Hugging Face layout (`torch`) or mlx-lm's (`mlx`).

Both targets are a directory with config.json, generation_config.json, safetensors weights
(sharded with model.safetensors.index.json above `max_shard_bytes`) and tokenizer files. The
weights are produced one tensor at a time from the parameters (transposed to [out, in], cast,
optionally quantized for MLX) so peak memory stays near one copy of the model.
"""
from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from elmjax.convert import hf, mlx
from elmjax.convert.outdir import atomic_output_dir, check_output_dir
from elmjax.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES, source_from_array, write_sharded

TARGETS = ("torch", "mlx")
EXPORT_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def check_export_args(target: str, dtype: str, quantize: int | None, group_size: int) -> None:
    """Raises ValueError naming the bad argument; called before anything is read or written."""
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; --to must be one of {', '.join(TARGETS)}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; --dtype must be one of {', '.join(EXPORT_DTYPES)}")
    if quantize is not None:
        if target != "mlx":
            raise ValueError("--quantize applies to --to mlx only (the torch layout is unquantized)")
        mlx.check_quantization(quantize, group_size)


def check_target(model_config, target: str):
    """The family's layout for `target`; ValueError when the model cannot go there (no layout,
    no mlx-lm model, or config fields the layout cannot hold)."""
    layout = hf.layout_for(model_config)
    if target == "mlx" and layout.mlx_quantizable is None:
        raise ValueError(
            f"the {model_config.family!r} family has no mlx-lm layout (mlx-lm has no such model); "
            "export with --to torch"
        )
    layout.check_exportable(model_config)
    return layout


def real_vocab_rows(model_vocab: int, tokenizer_vocab: int | None) -> int:
    """Rows of the embedding to export: the tokenizer's vocabulary when the model's is padded."""
    if tokenizer_vocab is None:
        return model_vocab
    if tokenizer_vocab > model_vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab} tokens but the model only {model_vocab} embedding "
            "rows; the checkpoint and tokenizer do not belong together"
        )
    return tokenizer_vocab


def export_params(
    out: str | os.PathLike,
    model_config,
    params,
    *,
    target: str,
    dtype: str = "float32",
    quantize: int | None = None,
    group_size: int = 64,
    tokenizer=None,
    chat_template: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Writes `params` (an `nnx.State` of `nnx.Param`, or a model) as a `target` directory.

    `tokenizer`: an `elmjax.data.tokenizer.Tokenizer` (or None to write no tokenizer files);
    its vocabulary size decides how many embedding rows are exported and its BOS/EOS ids go
    into config.json and generation_config.json. `chat_template` (Jinja, elmjax/data/chat.py)
    goes into tokenizer_config.json for `apply_chat_template`. Returns the names of the files written.
    """
    check_export_args(target, dtype, quantize, group_size)
    check_output_dir(out, overwrite)
    layout = check_target(model_config, target)
    vocab_rows = real_vocab_rows(model_config.vocab_size, tokenizer.vocab_size if tokenizer else None)
    to_state_dict = hf.to_mlx_state_dict if target == "mlx" else hf.to_hf_state_dict
    tensors = to_state_dict(params, model_config, vocab_rows=vocab_rows)

    config = hf.hf_config(model_config, torch_dtype=dtype, vocab_size=vocab_rows)
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    if tokenizer is not None:
        config["bos_token_id"] = generation_config["bos_token_id"] = tokenizer.bos_id  # None: it has none
        config["eos_token_id"] = generation_config["eos_token_id"] = tokenizer.eos_id
        if "pad_token_id" in config:  # OLMoE's config names one (its default is another tokenizer's)
            config["pad_token_id"] = tokenizer.pad_token_id
    np_dtype = EXPORT_DTYPES[dtype]
    if target == "mlx":
        config = mlx.mlx_config(config, quantize, group_size)
        sources = mlx.mlx_sources(tensors, np_dtype, quantize, group_size, layout.mlx_quantizable)
        metadata = {"format": "mlx"}
    else:
        sources = [source_from_array(name, array, np_dtype) for name, array in tensors.items()]
        metadata = {"format": "pt"}

    with atomic_output_dir(out, overwrite) as tmp:
        files = write_sharded(tmp, sources, max_shard_bytes=max_shard_bytes, metadata=metadata)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation_config)
        files += ["config.json", "generation_config.json"]
        if tokenizer is not None:
            before = set(os.listdir(tmp))
            tokenizer.save_hf_files(str(tmp))
            files += sorted(set(os.listdir(tmp)) - before)
            if chat_template and (tmp / "tokenizer_config.json").exists():
                settings = json.loads((tmp / "tokenizer_config.json").read_text())
                _write_json(tmp / "tokenizer_config.json", dict(settings, chat_template=chat_template))
    return files


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    target: str,
    dtype: str = "float32",
    step: int | None = None,
    quantize: int | None = None,
    group_size: int = 64,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    with_tokenizer: bool = True,
) -> list[str]:
    """`export_params` for a checkpoint: a workdir (newest complete step) or a step directory.

    Only the parameters are read (no optimizer state); the tokenizer comes from the
    checkpoint's config (`elmjax.data.tokenizer_choice.load_tokenizer`). A checkpoint of adapters is
    exported merged into its base (elmjax/convert/adapters.py; `export_adapter_checkpoint`
    writes the adapters alone).
    """
    from elmjax.training.checkpoint import restore_params  # the training helper's reader

    check_export_args(target, dtype, quantize, group_size)
    check_output_dir(out, overwrite)
    config, params = restore_params(str(checkpoint), step=step)
    if config.model.adapter.kind != "none":  # a LoRA/DoRA run: the base with its adapters merged
        from elmjax.convert.adapters import merge

        config, params = merge(config, params)
    check_target(config.model, target)  # before the tokenizer, which may take a while to load
    tokenizer, chat_template = None, None
    if with_tokenizer:
        from elmjax.data.tokenizer_choice import load_tokenizer, run_tokenizer

        tokenizer = run_tokenizer(checkpoint) or load_tokenizer(config)  # the run's own, when kept
        if config.data.get("chat_template", ""):
            from elmjax.data.chat import jinja_template
            from elmjax.data.formats import chat_header

            chat_template = jinja_template(chat_header(config.data.chat_template))
    return export_params(
        out, config.model, params, target=target, dtype=dtype, quantize=quantize,
        group_size=group_size, tokenizer=tokenizer, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
        chat_template=chat_template,
    )


def _write_json(path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def export_adapter_checkpoint(checkpoint, out, *, to: str, step: int | None = None, overwrite: bool = False,
                              base_model: str = "") -> list[str]:
    """The adapters of a LoRA/DoRA checkpoint alone, in peft's (`to="peft"`) or mlx-lm's
    (`to="mlx"`) format (elmjax/convert/adapters.py); the embedding rows follow the
    tokenizer's vocabulary, as the base export's do."""
    from elmjax.convert.adapters import export_adapters
    from elmjax.data.tokenizer_choice import load_tokenizer
    from elmjax.training.checkpoint import restore_params

    check_output_dir(out, overwrite)
    config, params = restore_params(str(checkpoint), step=step)
    vocab_rows = real_vocab_rows(config.model.vocab_size, load_tokenizer(config).vocab_size) if to == "peft" else None
    return export_adapters(out, config, params, to=to, base_model=base_model or str(config.train.init_from),
                           vocab_rows=vocab_rows, overwrite=overwrite)

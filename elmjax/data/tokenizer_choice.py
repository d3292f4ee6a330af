"""Which tokenizer a run uses, and the copy kept with the run so it never changes under it.

`load_tokenizer(config)` opens `config.data.tokenizer`; when that is empty, the tokenizer
kept with `train.init_from`'s run, the token stores' own, or the embedded corpus's
(elmjax/data/sentencepiece_training.py). A tokenizer that differs from the one a run or
checkpoint trained with is a one-line ConfigError.
"""
from __future__ import annotations

from elmjax.data.tokenizer import Tokenizer, open_tokenizer
from elmjax.data.sentencepiece_training import VocabularySizeError, embedded_tokenizer


def load_store_tokenizer(root: str) -> Tokenizer:
    """The tokenizer saved inside the token store at `root`."""
    from elmjax.data.token_store import read_stored_tokenizer

    file_name, payload, special = read_stored_tokenizer(root)
    return Tokenizer.from_stored_file(file_name, payload, name=root, special=special)


def _kept(path, look_up: bool) -> tuple[Tokenizer, bool] | None:
    """(the tokenizer kept with the run at `path`, whether its special-token names are kept
    beside it), or None (run_files.py)."""
    from elmjax.data.run_files import find_stored_tokenizer

    found = find_stored_tokenizer(path, look_up=look_up)
    if found is None:
        return None
    file_name, payload, file_path, special = found
    return Tokenizer.from_stored_file(file_name, payload, name=file_path, special=special), special is not None


def run_tokenizer(path, *, look_up: bool = True) -> Tokenizer | None:
    """The tokenizer kept with the run at `path` (workdir or step dir), or None (run_files.py)."""
    found = _kept(path, look_up)
    if found is None:
        return None
    kept, named = found
    return kept if named else _with_names_from_its_source(kept, kept.name)


def _with_names_from_its_source(kept: Tokenizer, file_path: str) -> Tokenizer:
    """A run of a version that kept no special-token names beside its tokenizer.json: the
    names come from the file it was made from (the run's config.json `data.tokenizer`, with
    its tokenizer_config.json), when that is still there and is the same tokenizer. Else the
    kept one as it is (a resumed run writes the names)."""
    import json

    from elmjax import storage

    run_config = storage.path(file_path).parent / "config.json"
    try:
        source = json.loads(run_config.read_text())["data"]["tokenizer"]
        if not source:
            return kept
        original = open_tokenizer(source)
    except Exception:  # noqa: BLE001 - no config, no source, or it moved: the kept file is what there is
        return kept
    return original if original.fingerprint == kept.fingerprint and original.stored_special() else kept


def keep_with_run(workdir, tokenizer: Tokenizer) -> None:
    """Writes `tokenizer` into `workdir` unless it is there; a different one there (the run
    trained with another) is a one-line ConfigError naming both."""
    from elmjax.data.run_files import write_stored_tokenizer
    from elmjax.validation import ConfigError

    kept, named = _kept(workdir, look_up=False) or (None, False)
    special = tokenizer.stored_special()
    if kept is None or (kept.fingerprint == tokenizer.fingerprint and special and not named):
        # New, or kept by a version that did not keep the special-token names: (re)write.
        write_stored_tokenizer(workdir, *tokenizer.stored_file(), special)
    elif kept.fingerprint != tokenizer.fingerprint:
        raise ConfigError("data.tokenizer", f"{tokenizer.name} ({tokenizer.fingerprint}) is not the tokenizer "
                          f"this run trained with, {kept.name} ({kept.fingerprint}); use that one or a new workdir")


def load_tokenizer(config) -> Tokenizer:
    """The tokenizer a run uses: `config.data.tokenizer`; else, when the run starts from
    `train.init_from`, the tokenizer kept with that checkpoint's run; else the embedded
    corpus's own. A configured tokenizer that differs from the checkpoint's is an error."""
    from elmjax.data.sources import parse_source_list

    init_from = config.train.get("init_from", "") if "train" in config else ""
    kept = run_tokenizer(init_from) if init_from else None
    if config.data.tokenizer:
        tokenizer = open_tokenizer(config.data.tokenizer)
        if kept is not None and kept.fingerprint != tokenizer.fingerprint:
            from elmjax.validation import ConfigError

            raise ConfigError("data.tokenizer", f"is {tokenizer.name} ({tokenizer.fingerprint}), but train.init_from's "
                              f"checkpoint was trained with {kept.name} ({kept.fingerprint}); leave data.tokenizer "
                              "empty to use the checkpoint's")
        return tokenizer
    if kept is not None:
        return kept
    specs = parse_source_list(config.data)
    if specs and all(spec.kind == "token_store" for spec in specs):
        tokenizers_ = [load_store_tokenizer(spec.location) for spec in specs]
        if len({t.fingerprint for t in tokenizers_}) > 1:
            raise ValueError(
                "config field `data.source`: the token stores were made with different "
                "tokenizers; mix only stores written with the same one"
            )
        return tokenizers_[0]
    corpora = sorted({name for spec in specs if spec.kind == "embedded" for name in spec.corpora})
    if any(spec.kind == "seqio" for spec in specs):
        raise ValueError(
            "config field `data.tokenizer`: is empty, but data.source reads a seqio Task, whose "
            "token ids are its vocabulary's; set data.tokenizer to that vocabulary's .model file"
        )
    if len(corpora) == 0 or any(spec.kind != "embedded" for spec in specs):
        raise ValueError(
            "config field `data.tokenizer`: is empty, which trains a tokenizer only for the "
            f"embedded corpus, but data.source is {config.data.source!r}; train one with "
            "`python tools/train_tokenizer.py` and set data.tokenizer to its .model file"
        )
    # The embedded tokenizer is always trained on both corpora, so a mixture of one of them
    # uses the same vocabulary as the default.
    try:
        return embedded_tokenizer(config.model.vocab_size, ("kjv", "shakespeare"))
    except VocabularySizeError as error:
        from elmjax.validation import ConfigError

        bound = f"at most {error.most}" if error.most else f"at least {error.fewest}, for its characters and special pieces"
        raise ConfigError("model.vocab_size", f"is {config.model.vocab_size}, which the tokenizer trained on the "
                          f"embedded corpus cannot have ({bound}); set a size in that range") from None

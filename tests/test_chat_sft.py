"""Chat fine-tuning end to end: the README's sft_tiny command (shortened) from a tiny
checkpoint, the tokenizer kept with each run, and `generate --chat`."""
import json
import sys

import pytest

from elmjax.config import base_config
from elmjax.data.sentencepiece_training import embedded_tokenizer
from elmjax.data.tokenizer_choice import keep_with_run, load_tokenizer, run_tokenizer
from elmjax.inference.generate import main as generate_main
from elmjax.validation import ConfigError
from tests.test_train_resume import env, run

SHORT = ["--config.train.seq_len=64", "--config.train.batch_size=4", "--config.train.log_every=1",
         "--config.train.sample_at_end=False"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


def test_workdir_keeps_its_tokenizer_and_refuses_another(tmp_path):
    tokenizer = embedded_tokenizer(4096, ("kjv", "shakespeare"))
    workdir = tmp_path / "run"
    keep_with_run(workdir, tokenizer)
    keep_with_run(workdir, tokenizer)  # the same one again: fine
    step_dir = workdir / "checkpoints" / "7"
    step_dir.mkdir(parents=True)
    assert run_tokenizer(step_dir).fingerprint == tokenizer.fingerprint
    other = embedded_tokenizer(512, ("kjv", "shakespeare"))
    with pytest.raises(ConfigError) as error:
        keep_with_run(workdir, other)
    assert other.fingerprint in str(error.value) and tokenizer.fingerprint in str(error.value)
    # A fine-tune from the step dir uses the run's tokenizer without data.tokenizer ...
    config = base_config()
    config.data.source, config.data.chat_template = "embedded:chat", "openelm"
    config.model.vocab_size = 512  # (would train the 512-piece one without init_from)
    config.train.init_from = str(step_dir)
    assert load_tokenizer(config).fingerprint == tokenizer.fingerprint
    # ... and a configured tokenizer that is not the checkpoint's is a one-line error naming both.
    config.data.tokenizer = other.name
    with pytest.raises(ConfigError, match="data.tokenizer") as error:
        load_tokenizer(config)
    message = str(error.value)
    assert "\n" not in message and other.name in message and str(workdir / "tokenizer.model") in message
    assert other.fingerprint in message and tokenizer.fingerprint in message


@pytest.mark.slow
def test_sft_tiny_command_runs_and_generate_chat_replies(tmp_path, cache, capsys):
    base, sft = tmp_path / "tiny", tmp_path / "sft"
    pretrain = run([sys.executable, "-m", "elmjax.train", "--config=configs/tiny.py", f"--workdir={base}",
                    "--config.train.steps=2", *SHORT], env(cache))
    assert pretrain.returncode == 0, pretrain.stderr[-3000:]
    assert (base / "tokenizer.model").is_file()
    # The README's command, shortened; init_from is a step directory of the base run.
    finetune = run([sys.executable, "-m", "elmjax.train", "--config=configs/sft_tiny.py", f"--workdir={sft}",
                    f"--config.train.init_from={base}/checkpoints/2", "--config.train.steps=3",
                    "--config.eval.every_steps=3", "--config.eval.batches=1", *SHORT], env(cache))
    assert finetune.returncode == 0, finetune.stderr[-3000:]
    assert f"starting from the parameters of {base}/checkpoints/2" in finetune.stdout
    assert "step 0: held-out loss" in finetune.stdout and "step 3: held-out loss" in finetune.stdout
    assert (sft / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    evals = [r for r in map(json.loads, (sft / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3] and all(r["eval_tokens"] > 0 for r in evals)
    # generate --chat from the fine-tuned workdir, whose tokenizer is found beside it.
    assert generate_main(["--checkpoint", str(sft), "--chat", "--system", "Be brief.", "--prompt", "Hi!",
                          "--max_new_tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() != "Hi!"  # a reply, not the prompt echoed
    # several prompts: each reply is headed by its prompt
    assert generate_main(["--checkpoint", str(sft), "--chat", "--prompt", "Hi!", "--prompt", "Bye!",
                          "--max_new_tokens", "4"]) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("> ")]
    assert headers == ["> Hi!", "> Bye!"]
    # The export carries the template: transformers renders a conversation to the ids we train on.
    from transformers import AutoTokenizer

    from elmjax.convert.export import export_checkpoint
    from elmjax.data.chat import encode_conversation

    export_checkpoint(sft, tmp_path / "hf", target="torch")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there."}]
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == encode_conversation(run_tokenizer(sft), messages, "<|{role}|>\n")[0].tolist()

"""Preference batches for DPO: pair i in rows 2i (chosen) / 2i + 1 (rejected), one padded
sequence per row, loss_mask exactly on the completion, the truncation policy, pairs built
from the embedded conversations, and exact resume (elmjax/data/preference.py)."""
import json

import numpy as np
import pytest

from elmjax.data import preference
from elmjax.data.corpus import embedded_documents
from elmjax.data.tokenizer_choice import load_tokenizer
from elmjax.validation import ConfigError
from data_support import data_config

SEQ = 64
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Berlin, I think."},
    {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}],
     "chosen": {"role": "assistant", "content": "Hi, friend!"},
     "rejected": [{"role": "assistant", "content": "Go away"}]},
    {"prompt": "Count to three", "chosen": "one two three", "rejected": "four"},
    {"prompt": "Say yes", "chosen": "yes", "rejected": "no"},
]


def pref_config(source="embedded:chat", batch=4, **data):
    return data_config(source, seq=SEQ, batch=batch, **{"chat_template": "openelm", **data})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(pref_config())


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer, tmp_path_factory):
    """The run's tokenizer as Hugging Face loads it, with the default template (the oracle)."""
    from transformers import AutoTokenizer

    from elmjax.data.chat import jinja_template

    directory = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer.save_hf_files(directory)
    hf = AutoTokenizer.from_pretrained(directory)
    hf.chat_template = jinja_template("<|{role}|>\n")
    return hf


def expected_row(hf, pair, name):
    """(prompt ids, completion ids) by transformers: the prompt with the generation header,
    and what the reply as an assistant turn adds after it."""
    prompt = pair["prompt"] if isinstance(pair["prompt"], list) else [{"role": "user", "content": pair["prompt"]}]
    reply = pair[name]
    reply = reply[0] if isinstance(reply, list) else reply
    reply = reply["content"] if isinstance(reply, dict) else reply
    ids = lambda messages, **kw: list(hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])
    head = ids(prompt, add_generation_prompt=True)
    whole = ids(prompt + [{"role": "assistant", "content": reply}])
    assert whole[: len(head)] == head
    return head, whole[len(head):]


def test_pair_layout_and_masks(tokenizer, hf_tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS * 5))
    config = pref_config(str(path), batch=6, tokenizer=tokenizer.name, eval_fraction=0.2)
    batch = next(preference.make_preference_iterator(config, "train", process_index=0, process_count=1))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    assert all(v.shape == (6, SEQ) for v in batch.values())
    expected = {}
    for pair in PAIRS:
        (prompt, chosen), (_, rejected) = (expected_row(hf_tokenizer, pair, n) for n in ("chosen", "rejected"))
        expected[tuple(prompt + chosen)] = (prompt, chosen, rejected)
    for i in range(3):
        chosen_row, rejected_row = 2 * i, 2 * i + 1
        length = int(batch["segment_ids"][chosen_row].sum())  # the sequence's tokens (all fit)
        sequence = np.append(batch["inputs"][chosen_row], batch["targets"][chosen_row, -1])[:length]
        prompt, chosen, rejected = expected[tuple(sequence.tolist())]  # KeyError: not a pair's chosen
        for row, completion in ((chosen_row, chosen), (rejected_row, rejected)):
            n = len(prompt) + len(completion)
            full = np.append(batch["inputs"][row], batch["targets"][row, -1])
            np.testing.assert_array_equal(full[:n], prompt + completion)
            np.testing.assert_array_equal(batch["segment_ids"][row], np.arange(SEQ) < n)
            mask = np.zeros(SEQ)
            mask[len(prompt) - 1: n - 1] = 1  # targets that are completion tokens
            np.testing.assert_array_equal(batch["loss_mask"][row], mask)
            np.testing.assert_array_equal(batch["positions"][row], np.arange(SEQ))
            assert np.all(full[n:] == tokenizer.pad_id)


def test_truncation_keeps_prompt_end_then_cuts_completion(tokenizer):
    encode = preference.EncodePair(tokenizer, "<|{role}|>\n", row_length=21, max_prompt=8, pad_id=0)
    long_prompt = list(range(100, 130))  # BOS-first ids stand-ins: 30 tokens
    tokens, weights, length = encode.sequence(long_prompt, "alpha beta gamma delta epsilon zeta eta theta iota")
    assert length == 21
    assert tokens[:8].tolist() == [100] + list(range(123, 130))  # first token, then the last 7
    assert weights[:8].sum() == 0 and weights[8:21].sum() == 13
    full = tokenizer.encode("alpha beta gamma delta epsilon zeta eta theta iota") + [tokenizer.eos_id]  # after ""
    assert tokens[8:21].tolist() == full[:13]
    # A pair that fits is never cut, even with a prompt longer than max_prompt.
    tokens, weights, length = encode.sequence(list(range(100, 112)), "yes")
    assert tokens[:12].tolist() == list(range(100, 112)) and length == 12 + len(tokenizer.encode("yes")) + 1


def test_embedded_pairs_are_real_reply_versus_another_conversation():
    config = pref_config(seed=3)
    pairs = preference.preference_pairs(config, "train")
    conversations = dict(embedded_documents("chat"))
    for index in range(20):
        pair = pairs[index]
        messages = conversations[pairs.key(index)]
        turn = len(pair["prompt"])
        assert messages[:turn] == pair["prompt"] and messages[turn]["content"] == pair["chosen"]
        assert messages[turn]["role"] == "assistant"
        assert pair["rejected"] != pair["chosen"]
    again = preference.preference_pairs(pref_config(seed=3), "train")
    other_seed = preference.preference_pairs(pref_config(seed=4), "train")
    assert [again[i] for i in range(20)] == [pairs[i] for i in range(20)]
    assert [other_seed[i] for i in range(20)] != [pairs[i] for i in range(20)]
    held_out = preference.preference_pairs(config, "eval")
    train_keys = {pairs.key(i) for i in range(len(pairs))}
    assert len(held_out) > 0 and not train_keys & {held_out.key(i) for i in range(len(held_out))}


def test_preference_iterator_resumes_exactly():
    config = pref_config()
    first = preference.make_preference_iterator(config, "train", process_index=0, process_count=1)
    for _ in range(2):
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(3)]
    second = preference.make_preference_iterator(config, "train", process_index=0, process_count=1)
    second.set_state(state)
    for want in expected:
        got = next(second)
        for key in want:
            np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_bad_preference_record_and_odd_batch_are_one_line_errors(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ConfigError) as error:
        preference.make_preference_iterator(pref_config(str(path), tokenizer=tokenizer.name), "train",
                                            process_index=0, process_count=1)
    assert "\n" not in str(error.value) and "pairs.jsonl" in str(error.value) and "rejected" in str(error.value)
    with pytest.raises(ConfigError, match="train.batch_size"):
        preference.make_preference_iterator(pref_config(batch=3), "train", process_index=0, process_count=1)


def test_plain_pairs_without_a_template(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in [PAIRS[0], PAIRS[2], PAIRS[3]] * 4))
    config = pref_config(str(path), tokenizer=tokenizer.name, chat_template="", eval_fraction=0.3)
    batch = next(preference.make_preference_iterator(config, "eval", process_index=0, process_count=1))
    enc = tokenizer.encode
    expected = {tuple([tokenizer.bos_id] + enc(p["prompt"]) + enc(p[k]) + [tokenizer.eos_id]): len(enc(p[k])) + 1
                for p in PAIRS if isinstance(p["prompt"], str) for k in ("chosen", "rejected")}
    rows = 0
    for row in range(batch["inputs"].shape[0]):
        if not batch["segment_ids"][row].any():
            continue  # a padding row of the last eval batch
        n = int(batch["segment_ids"][row].sum())
        sequence = tuple(np.append(batch["inputs"][row], batch["targets"][row, -1])[:n].tolist())
        assert batch["loss_mask"][row].sum() == expected[sequence]  # KeyError: not a pair's sequence
        assert batch["loss_mask"][row, n - 1 - expected[sequence]: n - 1].all()
        rows += 1
    assert rows >= 2

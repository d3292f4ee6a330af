"""Chat SFT data: the template's text, the assistant-only target weights, and their packing
into the batch's loss_mask (elmjax/data/chat.py, elmjax/data/pipeline.py)."""
import json

import numpy as np
import pytest

from elmjax.config import base_config, validate
from elmjax.data import chat, pipeline
from elmjax.data.corpus import embedded_documents
from elmjax.data.formats import chat_header
from elmjax.data.tokenizer_choice import load_tokenizer
from elmjax.validation import ConfigError
from data_support import data_config

SEQ = 48
BATCH = 4
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


def chat_config(source="embedded:chat", **data):
    return data_config(source, seq=SEQ, batch=BATCH, **{"chat_template": "openelm", **data})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(chat_config())


def test_openelm_text_is_hand_written_and_matches_transformers():
    header = chat_header("openelm")
    expected = ("<s><|system|>\nBe brief.</s><|user|>\nHi there</s><|assistant|>\nHello!</s>"
                "<|user|>\nBye</s><|assistant|>\nSee you.</s>")
    assert chat.render_text(CONVERSATION, header, "</s>", "<s>") == expected
    # Hugging Face's own Jinja renderer, given the template in its chat_template form.
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, "<unk>"))
    hf = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", chat_template=chat.jinja_template(header))
    assert hf.apply_chat_template(CONVERSATION, tokenize=False) == expected
    prompt = hf.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>\nBe brief.</s><|user|>\nHi there</s><|assistant|>\n"
    assert prompt == chat.render_text(CONVERSATION[:2], header, "</s>", "<s>", add_generation_prompt=True)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer, tmp_path_factory):
    """The run's tokenizer as Hugging Face loads it (the files an export writes)."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer.save_hf_files(directory)
    return AutoTokenizer.from_pretrained(directory)


# The default template written by hand in Jinja with {% generation %} around what is learned:
# Hugging Face then computes the assistant mask itself from character offsets.
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_tokens_and_assistant_mask_match_transformers(tokenizer, hf_tokenizer):
    tokens, weights = chat.encode_conversation(tokenizer, CONVERSATION, chat_header("openelm"))
    oracle = hf_tokenizer.apply_chat_template(CONVERSATION, chat_template=GENERATION_TEMPLATE, tokenize=True,
                                              return_dict=True, return_assistant_tokens_mask=True)
    assert tokens.tolist() == oracle["input_ids"]
    assert weights.tolist() == oracle["assistant_masks"]
    # (a) only the assistant's content and EOS carry weight; system/user tokens and headers none
    eos = tokenizer.eos_id
    assert tokenizer.decode(tokens[weights == 1].tolist()) == "Hello!See you."  # (EOS decodes to "")
    assert int((tokens[weights == 1] == eos).sum()) == 2  # each assistant turn's EOS is learned
    prompt = hf_tokenizer.apply_chat_template(CONVERSATION[:2], chat_template=chat.jinja_template(chat_header("openelm")),
                                              tokenize=True, return_dict=True, add_generation_prompt=True)
    ours = chat.encode_conversation(tokenizer, CONVERSATION[:2], chat_header("openelm"), add_generation_prompt=True)
    assert ours[0].tolist() == prompt["input_ids"] and not ours[1].any()


def test_custom_header_and_bad_templates():
    header = chat_header("### {role} é:\n\t")
    import jinja2  # the engine Hugging Face renders chat templates with

    rendered = jinja2.Environment().from_string(chat.jinja_template(header)).render(
        messages=CONVERSATION, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    assert rendered == chat.render_text(CONVERSATION, header, "</s>", "<s>", add_generation_prompt=True)
    assert rendered.startswith("<s>### system é:\n\tBe brief.</s>### user é:\n\tHi there</s>")
    for bad in ("no role here", "{role} {x}", "{role}{role}"):
        with pytest.raises(ConfigError, match="data.chat_template"):
            chat_config(chat_template=bad)


def test_embedded_chat_needs_a_template():
    config = base_config()
    config.data.source = "embedded:chat"
    with pytest.raises(ConfigError, match=r"data.chat_template.*set data.chat_template=openelm"):
        validate(config)


def test_embedded_chat_corpus_is_real_conversations():
    documents = embedded_documents("chat")
    assert len(documents) > 4000
    for _, messages in documents[:50]:
        chat.check_messages(messages)
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
        roles = [m["role"] for m in messages]
        assert all(a != b for a, b in zip(roles, roles[1:]))  # turns alternate


def test_bad_jsonl_record_is_one_line_error(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"messages": CONVERSATION}
    bad = {"messages": [{"role": "bot", "content": "hi"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ConfigError) as error:
        pipeline.make_train_iterator(chat_config(str(path), tokenizer=tokenizer.name), process_index=0, process_count=1)
    message = str(error.value)
    assert "\n" not in message and "chat.jsonl" in message and "'bot'" in message


def test_records_without_the_messages_field_name_data_messages_field(tmp_path):
    """It named data.text_field, which chat data does not read."""
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversation": CONVERSATION}) + "\n")
    with pytest.raises(ConfigError, match=r"1 missing the field 'messages'\); check the files in data.source "
                                          r"and data.messages_field$"):
        chat.ChatJsonlSource(str(path), "messages")


def _pieces(batch):
    """(row, start, end) of each document piece in a batch (runs of one segment id > 0)."""
    for row, segments in enumerate(batch["segment_ids"]):
        start = 0
        for t in range(1, len(segments) + 1):
            if t == len(segments) or segments[t] != segments[start]:
                if segments[start] > 0:
                    yield row, start, t
                start = t


def test_packed_loss_mask_is_the_assistant_weights(tokenizer, tmp_path):
    header = chat_header("openelm")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "zeta"]
    conversations = []
    for i in range(40):
        turns = [{"role": "system", "content": f"rule {i}"}] if i % 3 == 0 else []
        for k in range(int(rng.integers(1, 4))):
            say = lambda: " ".join(rng.choice(words, int(rng.integers(1, 9))))
            turns += [{"role": "user", "content": f"q{i}.{k} " + say()},
                      {"role": "assistant", "content": f"a{i}.{k} " + say()}]
        conversations.append(turns)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    encoded = [chat.encode_conversation(tokenizer, c, header) for c in conversations]
    config = chat_config(str(path), tokenizer=tokenizer.name)
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    checked = 0
    for batch in (next(iterator) for _ in range(12)):
        for row, start, end in _pieces(batch):
            piece = batch["inputs"][row, start:end]  # one conversation's tokens, in order
            found = {tuple(weights[o + 1: o + len(piece)]) for tokens, weights in encoded
                     for o in range(len(tokens) - len(piece) + 1)
                     if np.array_equal(tokens[o:o + len(piece)], piece)}
            assert found, "a packed piece is not a run of any conversation's tokens"
            mask = batch["loss_mask"][row, start:end]
            if end < SEQ:  # the piece's last input predicts the next document's first token
                assert mask[-1] == 0
            if len(found) == 1:  # (a short piece may occur in several conversations)
                expected = np.asarray(found.pop()[: len(piece) - 1])
                np.testing.assert_array_equal(mask[: len(expected)], expected)
                checked += int(expected.sum())
    assert checked > 100


def test_rows_inside_a_long_user_turn_are_left_out_of_training(tokenizer, tmp_path):
    """A user turn several rows long packs into rows without an assistant token: the train
    stream leaves them out (nothing to learn, and a batch of them would still move the weights
    through AdamW's momentum and decay), and keeps every row that has one."""
    long_turn = " ".join(["omega"] * 200)  # several rows of SEQ tokens
    conversations = [[{"role": "user", "content": f"{i} " + (long_turn if i % 2 == 0 else "hi")},
                      {"role": "assistant", "content": f"reply {i}"}] for i in range(20)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    config = chat_config(str(path), tokenizer=tokenizer.name)
    train = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    rows = np.concatenate([next(train)["loss_mask"] for _ in range(10)])
    assert rows.sum(axis=1).min() > 0
    held_out = chat_config(str(path), tokenizer=tokenizer.name, eval_fraction=0.5)
    eval_rows = np.concatenate([b["loss_mask"] for b in pipeline.make_eval_iterator(held_out, process_index=0,
                                                                                     process_count=1)])
    assert (eval_rows.sum(axis=1) == 0).any()  # held-out rows stay as they are: loss is over targets


def test_chat_iterator_resumes_exactly():
    config = chat_config()
    first = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    for _ in range(3):
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(3)]
    second = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    second.set_state(state)
    for want, got in zip(expected, (next(second) for _ in range(3))):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key], err_msg=key)
    assert sum(float(b["loss_mask"].sum()) for b in expected) > 0


def test_chat_eval_split_holds_out_other_conversations():
    config = chat_config(eval_fraction=0.05)
    train_batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
    eval_batch = next(pipeline.make_eval_iterator(config, process_index=0, process_count=1))
    for batch in (train_batch, eval_batch):
        assert 0 < batch["loss_mask"].mean() < 1
    assert not np.array_equal(train_batch["inputs"], eval_batch["inputs"])


def test_plain_text_source_with_a_chat_template_is_refused():
    with pytest.raises(ConfigError, match="embedded:chat") as error:
        pipeline.make_train_iterator(chat_config("embedded:kjv"), process_index=0, process_count=1)
    assert "\n" not in str(error.value) and "'embedded:kjv' is not conversations" in str(error.value)

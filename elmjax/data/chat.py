"""Chat data: conversations rendered with a chat template, with loss on assistant tokens only.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`
(the common `messages` form). With `data.chat_template` set, every document of the run is one
(JSONL records' `data.messages_field`, or `data.source="embedded:chat"`), rendered as

    [BOS] header(role_1) content_1 EOS  header(role_2) content_2 EOS  ...

where header(role) is the template's header with the role filled in; the default, "openelm",
is OpenELM-Instruct's `<|role|>\\n` (SPEC §5), so a turn reads `<|user|>\\nHello</s>`. No text
separates a turn's EOS from the next header, and the content is not stripped. A custom
template is a header string holding "{role}" (e.g. "### {role}:\\n"); the turn end is
always the tokenizer's EOS, so generation stops at it. `jinja_template(header)` is the same
template in the Jinja form Hugging Face's `apply_chat_template` takes (the tests' oracle).

Tokens: every header is encoded on its own, and every content as it continues its header
(encoded after the header's last character, whose ids are dropped), so no token spans a
header/content boundary and the loss mask is exact, and the ids are those Hugging Face's
`apply_chat_template` gives for the exported tokenizer and `jinja_template` (tested). The role markers are plain text to a tokenizer that does not have
them as special tokens (the small embedded SentencePiece spells `<|user|>` in a few pieces);
they are never special-cased. `data.add_eos` is ignored: every turn already ends in EOS.

The loss mask is a per-token *target weight*: 1 on the tokens of every assistant turn's
content and its EOS (what the model should learn to say, and to stop), 0 on BOS, on system
and user turns and on every header, the assistant's included. The pipeline packs it next to
the tokens, and the batch's `loss_mask[t]` (for predicting token t + 1) is that weight of
token t + 1 within the same document.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from elmjax.data.base import DataSourceError, DocumentSource, RecordError, SourceStats
from elmjax.data.corpus import EMBEDDED_CHAT
from elmjax.data.sources import EmbeddedSource, JsonlSource
from elmjax.data.split import token_part
from elmjax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
WEIGHT_FEATURE = "target_weights"  # the packed per-token loss weight (0/1, int32)


class MessagesError(RecordError):
    """A conversation that is not a list of {role, content} messages (the text says why)."""


def check_messages(messages, *, assistant_needed: bool = True) -> list[dict]:
    """`messages` validated: a non-empty list of {"role": one of ROLES, "content": str}.

    Extra keys of a message are ignored. With `assistant_needed`, a conversation without
    an assistant turn is refused (it would train nothing). Raises MessagesError."""
    if not isinstance(messages, list) or not messages:
        raise MessagesError(f"{str(messages)[:40]!r} is not a non-empty list of messages")
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise MessagesError(f"message {number} is not an object with \"role\" and \"content\"")
        if message["role"] not in ROLES:
            raise MessagesError(f"message {number} has role {message['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise MessagesError(f"message {number}'s content is {type(message['content']).__name__}, not a string")
    if assistant_needed and not any(m["role"] == "assistant" for m in messages):
        raise MessagesError("it has no assistant message, so nothing to train on")
    return messages


def render_text(messages, header: str, eos_token: str, bos_token: str = "", *,
                add_generation_prompt: bool = False) -> str:
    """The conversation as text, with `eos_token` spelled out after each turn (what
    `jinja_template(header)` renders too). `add_generation_prompt` appends the assistant
    header that a reply follows."""
    text = bos_token + "".join(header.format(role=m["role"]) + m["content"] + eos_token for m in messages)
    return text + (header.format(role="assistant") if add_generation_prompt else "")


def jinja_template(header: str) -> str:
    """The template as a Hugging Face chat template (Jinja; `bos_token`/`eos_token` from the
    tokenizer), rendering exactly `render_text`. For tokenizer_config.json's chat_template."""
    before, after = header.split("{role}")
    quote = lambda s: json.dumps(s, ensure_ascii=False)  # a JSON string is a valid Jinja string literal
    return (
        "{{ bos_token }}{% for message in messages %}"
        f"{{{{ {quote(before)} + message['role'] + {quote(after)} + message['content'] + eos_token }}}}"
        "{% endfor %}{% if add_generation_prompt %}"
        f"{{{{ {quote(before + 'assistant' + after)} }}}}"
        "{% endif %}"
    )


def encode_conversation(tokenizer: Tokenizer, messages, header: str, *, bos: bool = True,
                        add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, target weights), both int32 [n]: the rendered conversation's ids and the
    loss weight of each token as a prediction target (1 on assistant content + its EOS)."""
    if tokenizer.eos_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name', '')!r} has no EOS token, which ends every chat turn")
    pieces, weights = [], []
    if bos and tokenizer.bos_prefix:
        pieces.append(tokenizer.bos_prefix), weights.append(0)
    heads = [header.format(role=m["role"]) for m in messages]
    # A content is encoded after its header's last character, whose ids are then dropped:
    # so it tokenizes as it does inside the whole rendered text (no word-start "▁" of its
    # own, as in Hugging Face's apply_chat_template), while no token spans the boundary.
    texts = heads + [h[-1:] for h in heads] + [h[-1:] + m["content"] for h, m in zip(heads, messages)]
    encoded = tokenizer.encode_batch(texts)
    count = len(messages)
    for index, message in enumerate(messages):
        head, context, content = encoded[index], encoded[count + index], encoded[2 * count + index]
        if content[: len(context)] == context:
            content = content[len(context):]
        else:  # a token spans the boundary: encode the content on its own instead
            content = tokenizer.encode(message["content"])
        learn = int(message["role"] == "assistant")
        pieces.append(head), weights.append(0)
        pieces.append(list(content) + [tokenizer.eos_id]), weights.append(learn)
    if add_generation_prompt:
        pieces.append(tokenizer.encode(header.format(role="assistant"))), weights.append(0)
    tokens = np.asarray([t for piece in pieces for t in piece], np.int32)
    mask = np.asarray([w for piece, w in zip(pieces, weights) for _ in piece], np.int32)
    return tokens, mask


def continuation_ids(tokenizer: Tokenizer, before: str, text: str) -> list[int]:
    """Ids of `text` as it tokenizes right after `before` (encoded after `before`'s last
    character, whose ids are dropped); `text` on its own when a token would span the two."""
    if not before:
        return tokenizer.encode(text)
    context, ids = tokenizer.encode_batch([before[-1], before[-1] + text])
    return ids[len(context):] if ids[: len(context)] == context else tokenizer.encode(text)


@dataclasses.dataclass
class ChatToTokens:
    """Conversation -> {"tokens", WEIGHT_FEATURE}: int32 [n] each, for packing (pipeline.py)."""

    tokenizer: Tokenizer
    header: str
    add_bos: bool
    split: str = "train"
    token_split_fraction: float = 0.0  # > 0: keep only this split's part of each conversation

    def __call__(self, messages):
        tokens, weights = encode_conversation(self.tokenizer, messages, self.header, bos=self.add_bos)
        if self.token_split_fraction > 0:  # the same cut for both: it depends on the length only
            tokens = token_part(tokens, self.token_split_fraction, self.split)
            weights = token_part(weights, self.token_split_fraction, self.split)
        return {"tokens": tokens, WEIGHT_FEATURE: weights}


def chat_source_error(spec) -> str | None:
    """Why `spec` (a data.source entry) cannot hold conversations, or None when it can."""
    if spec.kind == "jsonl" or (spec.kind == "embedded" and spec.corpora == (EMBEDDED_CHAT,)):
        return None
    return (f"entry {spec.location!r} is not conversations; with data.chat_template set, give JSONL "
            "files with a messages field (data.messages_field) or embedded:chat")


class ChatJsonlSource(JsonlSource):
    """JSONL files of conversations: each record's `field` is a message list. A record
    without the field is skipped and counted; a malformed conversation fails at once, naming
    the file and the record's byte offset."""

    field_setting = "data.messages_field"

    def _document(self, text: str, stats: SourceStats | None):
        messages = self._field_value(text, stats)
        if messages is None:
            return None
        try:
            return check_messages(messages)
        except MessagesError as error:
            raise RecordError(f"has a bad {self._field!r} field: {error}") from None


def open_chat_source(spec, data) -> DocumentSource:
    """The DocumentSource of conversations for one `data.source` entry (JSONL or embedded:chat)."""
    reason = chat_source_error(spec)
    if reason is not None:
        raise DataSourceError(reason)
    if spec.kind == "embedded":
        return EmbeddedSource(spec.corpora)
    return ChatJsonlSource(spec.location, data.messages_field)

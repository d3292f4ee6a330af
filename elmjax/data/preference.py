"""Preference pairs for DPO: batches where pair i is rows 2i (chosen) and 2i + 1 (rejected).

Sources (`data.source`, one entry):
  - JSONL files whose records hold `prompt`, `chosen` and `rejected`: strings, or the chat
    form (prompt a message list, elmjax/data/chat.py; chosen/rejected an assistant message
    {"role": "assistant", "content": ...}, a one-message list of it, or a string). The chat
    form needs `data.chat_template`; with it set, a string prompt is one user turn.
  - `embedded:chat`: pairs built from the embedded conversations. Pair i takes conversation
    i of the split, one of its assistant turns (drawn from `data.seed` and i), the turns
    before it as the prompt and that real reply as `chosen`; `rejected` is an assistant
    reply from another conversation of the same split (drawn likewise). Deterministic.
The held-out split is by document key, as the pretraining pipeline's (elmjax/data/split.py),
so held-out pairs come from held-out conversations.

One pair's sequence: [BOS] prompt completion, where with a chat template the prompt is the
rendered turns plus the assistant header, and the completion is the reply's tokens + EOS
(what an SFT assistant turn trains on). Without a template: BOS, the prompt's tokens, the
completion's tokens, EOS, prompt and completion tokenized each on its own (as TRL does). Too long for a row of seq_len + 1 tokens, TRL's policy: the prompt
keeps its last `data.max_prompt_len` tokens (BOS stays first; 0 = seq_len // 2), then the
completion is cut from the right to fit (its EOS may be cut off).

Each row is one sequence, padded (never packed with another): keys and dtypes as the
training batch (elmjax/training/step.py), all [batch, seq]: inputs/targets/positions int32,
segment_ids int32 (1 on the sequence's tokens, 0 on padding), loss_mask float32, 1 exactly
where the target is a completion token. A short final eval batch is filled with all-zero
padding rows (segment_ids 0, loss_mask 0), two per missing pair.
"""
from __future__ import annotations

import dataclasses
import json

import grain
import numpy as np

from elmjax.data.base import DataSourceError, DocumentSource, RecordError, SourceStats
from elmjax.data.chat import MessagesError, check_messages, continuation_ids, encode_conversation, open_chat_source
from elmjax.data.formats import chat_header
from elmjax.data.sources import JsonlSource, parse_source_list
from elmjax.data.split import plan_split
from elmjax.data.tokenizer import Tokenizer
from elmjax.data.tokenizer_choice import load_tokenizer
from elmjax.validation import ConfigError

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def _completion(value, name: str) -> str:
    """A chosen/rejected value -> the reply's text (string, assistant message, or [message])."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
            raise RecordError(f"has a {name!r} that is not an assistant message with string content")
        value = value["content"]
    if not isinstance(value, str):
        raise RecordError(f"has a {name!r} that is not a string or an assistant message")
    return value


def check_pair(record) -> dict:
    """A preference record validated: {"prompt": str or message list, "chosen": str,
    "rejected": str}. Raises RecordError."""
    if not isinstance(record, dict) or any(name not in record for name in PAIR_FIELDS):
        raise RecordError(f"does not hold all of {', '.join(PAIR_FIELDS)}")
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        try:
            prompt = check_messages(prompt, assistant_needed=False)
        except MessagesError as error:
            raise RecordError(f"has a bad 'prompt': {error}") from None
    return {"prompt": prompt, "chosen": _completion(record["chosen"], "chosen"),
            "rejected": _completion(record["rejected"], "rejected")}


class PreferenceJsonlSource(JsonlSource):
    """JSONL files of preference records (see the module docstring); a bad record fails at
    once, naming the file and the record's byte offset."""

    def __init__(self, pattern: str):
        super().__init__(pattern, field="prompt")

    def _document(self, text: str, stats: SourceStats | None):
        if not text.strip():
            if stats is not None:
                stats.empty_skipped += 1
            return None
        record = json.loads(text)
        if not isinstance(record, dict):
            raise json.JSONDecodeError("not a JSON object", text, 0)
        return check_pair(record)


class EmbeddedPairs(DocumentSource):
    """Pairs from conversations (indices `indices` of `conversations`): see the module docstring."""

    def __init__(self, conversations: DocumentSource, indices: np.ndarray, seed: int):
        self.name = f"{conversations.name} pairs"
        self._conversations, self._indices, self._seed = conversations, np.asarray(indices), seed
        self.stats = SourceStats(documents=len(self._indices))
        if len(self._indices) < 2:
            raise DataSourceError(f"{self.name}: {len(self._indices)} conversation(s) in the split; "
                                  "pairs need at least 2 (a rejected reply comes from another)")

    def __len__(self):
        return len(self._indices)

    def _reply(self, messages, rng) -> int:
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        return turns[int(rng.integers(len(turns)))]

    def __getitem__(self, index):
        rng = np.random.default_rng((self._seed, int(index)))
        messages = self._conversations[int(self._indices[index])]
        turn = self._reply(messages, rng)
        other = (index + 1 + int(rng.integers(len(self) - 1))) % len(self)
        other_messages = self._conversations[int(self._indices[other])]
        rejected = other_messages[self._reply(other_messages, rng)]["content"]
        return {"prompt": messages[:turn], "chosen": messages[turn]["content"], "rejected": rejected}

    def key(self, index):
        return self._conversations.key(int(self._indices[index]))


@dataclasses.dataclass
class EncodePair:
    """A pair -> {"tokens", "weights"}: int32 [2, row_length] (chosen, rejected), padded with
    `pad_id`, weights 1 on completion tokens, and "length" int32 [2]."""

    tokenizer: Tokenizer
    header: str | None  # the chat template's turn header; None = plain text
    row_length: int
    max_prompt: int
    pad_id: int

    def prompt_ids(self, prompt) -> tuple[list[int], str]:
        """(the prompt's ids, the text the completion follows)."""
        tok = self.tokenizer
        if self.header is None:
            if not isinstance(prompt, str):
                raise ConfigError("data.chat_template", "is empty, but a preference prompt is a message "
                                  "list; set data.chat_template=openelm")
            return tok.bos_prefix + tok.encode(prompt), ""  # each on its own, as TRL tokenizes them
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        ids = encode_conversation(tok, prompt, self.header, add_generation_prompt=True)[0].tolist()
        return ids, self.header.format(role="assistant")

    def sequence(self, prompt: list[int], reply: str, after: str = "") -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens, weights) int32 [row_length] and the real length of prompt + reply; the
        reply is tokenized as it continues the text `after` (an SFT assistant turn's ids)."""
        completion = continuation_ids(self.tokenizer, after, reply) + [self.tokenizer.eos_id]
        if len(prompt) + len(completion) > self.row_length and len(prompt) > self.max_prompt:
            prompt = prompt[:1] + prompt[len(prompt) - self.max_prompt + 1:]  # BOS + the prompt's end
        completion = completion[: self.row_length - len(prompt)]
        length = len(prompt) + len(completion)
        tokens = np.full(self.row_length, self.pad_id, np.int32)
        tokens[:length] = prompt + completion
        weights = np.zeros(self.row_length, np.int32)
        weights[len(prompt):length] = 1
        return tokens, weights, length

    def __call__(self, pair):
        prompt, after = self.prompt_ids(pair["prompt"])
        rows = [self.sequence(prompt, pair[name], after) for name in ("chosen", "rejected")]
        return {"tokens": np.stack([r[0] for r in rows]), "weights": np.stack([r[1] for r in rows]),
                "length": np.asarray([r[2] for r in rows], np.int32)}


@dataclasses.dataclass
class PairBatch:
    """Batched pairs [pairs, 2, row_length] -> the training batch dict, rows [2 * pairs, seq]
    (chosen at 2i, rejected at 2i + 1), filled to `rows` with padding rows."""

    rows: int

    def __call__(self, batch):
        tokens = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])
        weights = batch["weights"].reshape(tokens.shape)
        lengths = batch["length"].reshape(-1)
        real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]  # [rows, seq + 1]
        missing = self.rows - tokens.shape[0]
        if missing > 0:
            pad = lambda a: np.concatenate([a, np.zeros((missing, a.shape[1]), a.dtype)])
            tokens, weights, real = pad(tokens), pad(weights), pad(real)
        seq = tokens.shape[1] - 1
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": real[:, :-1].astype(np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (tokens.shape[0], seq)).copy(),
            "loss_mask": ((weights[:, 1:] > 0) & real[:, 1:]).astype(np.float32),
        }


def preference_pairs(config, split: str, process_count: int = 1) -> DocumentSource:
    """The pairs of `split` ("train" or "eval") of `data.source` (one entry)."""
    data = config.data
    specs = parse_source_list(data)
    if len(specs) != 1:
        raise ConfigError("data.source", f"has {len(specs)} entries; preference data reads one "
                          "(a JSONL file/glob of prompt/chosen/rejected, or embedded:chat)")
    spec = specs[0]
    if spec.kind == "embedded" and spec.corpora == ("chat",):
        conversations = open_chat_source(spec, data)
        plan = plan_split(conversations, data.eval_fraction, process_count)
        return EmbeddedPairs(conversations, plan.indices(split), data.seed)
    if spec.kind != "jsonl":
        raise DataSourceError(f"entry {spec.location!r} is not preference data; give JSONL files with "
                              "prompt/chosen/rejected, or embedded:chat")
    source = PreferenceJsonlSource(spec.location)
    plan = plan_split(source, data.eval_fraction, process_count)
    if plan.token_split:
        raise DataSourceError(f"{source.name}: {len(source)} pair(s), too few to hold out whole pairs "
                              f"for evaluation (data.eval_fraction={data.eval_fraction}); add pairs")
    return _Subset(source, plan.indices(split))


@dataclasses.dataclass
class _Subset:
    """grain random-access source: the documents `indices` of `source`."""

    source: DocumentSource
    indices: np.ndarray

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.source[int(self.indices[index])]


def make_preference_iterator(config, split: str = "train", *, process_index=None, process_count=None):
    """grain iterator (get_state/set_state resume exactly) of this process's preference
    batches: train repeats forever, shuffled with `data.seed` anew each epoch; eval is one
    pass in order, the last batch filled with padding rows. Layout: the module docstring."""
    from elmjax.data.pipeline import _process_shard, local_batch_size, pad_id_for

    process_index, process_count = _process_shard(process_index, process_count)
    rows = local_batch_size(config, process_count)
    if rows % 2:
        raise ConfigError("train.batch_size", f"gives {rows} rows per process; preference batches need an "
                          "even number (a chosen and a rejected row per pair)")
    tokenizer = load_tokenizer(config)
    seq = config.train.seq_len
    max_prompt = config.data.max_prompt_len or seq // 2
    header = chat_header(config.data.chat_template) if config.data.chat_template else None
    pairs = preference_pairs(config, split, process_count)
    ds = grain.MapDataset.source(pairs)[process_index::process_count]
    if len(ds) == 0:
        raise DataSourceError(f"no {split} preference pairs for process {process_index}; add pairs or "
                              "raise data.eval_fraction")
    if split == "train":
        ds = ds.shuffle(seed=config.data.seed).repeat()
    ds = ds.map(EncodePair(tokenizer, header, seq + 1, max_prompt, pad_id_for(config, tokenizer)))
    ds = ds.batch(rows // 2, drop_remainder=split == "train").map(PairBatch(rows))
    return iter(ds.to_iter_dataset())

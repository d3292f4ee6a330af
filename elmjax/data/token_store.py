"""A pre-tokenised token store: tensorstore zarr3 arrays, local or on gs:// (or memory://).

Layout under ROOT (written by tools/prepare_data.py):
  ROOT/tokens/          zarr3, 1-D [total_tokens], uint16 (vocab <= 65536) or uint32; every
                        document's tokens back to back, without BOS/EOS; sharded layout
                        (shards of 2^22 tokens, zstd-compressed inner chunks of 2^16), so a
                        document read touches one small chunk and a bucket holds few files.
  ROOT/doc_offsets/     zarr3, 1-D int64 [documents + 1]; document i is tokens[o[i]:o[i+1]].
  ROOT/elmjax_token_store.json   counts, the tokenizer's ids and fingerprint, input stats.
  ROOT/tokenizer.model or ROOT/tokenizer.json    the tokenizer that made it.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorstore as ts

from elmjax.data.base import DocumentSource, SourceStats
from elmjax.data.run_files import SPECIAL_NAME

META = "elmjax_token_store.json"
SHARD_TOKENS = 1 << 22
CHUNK_TOKENS = 1 << 16
# One context per process: memory:// stores live in it, and reads share its chunk cache.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})


def kvstore_url(root: str) -> str:
    """A path or URL -> a tensorstore kvstore URL ending in '/' (plain paths are local)."""
    root = str(root)
    if "://" not in root:
        root = "file://" + os.path.abspath(os.path.expanduser(root))
    return root.rstrip("/") + "/"


def _array_spec(url: str, name: str, dtype: str, shard: int, chunk: int) -> dict:
    bytes_codec = {"name": "bytes", "configuration": {"endian": "little"}}
    return {
        "driver": "zarr3",
        "kvstore": url + name + "/",
        "metadata": {
            "shape": [0],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard]}},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [chunk],
                        "codecs": [bytes_codec, {"name": "zstd", "configuration": {"level": 3}}],
                        "index_codecs": [bytes_codec, {"name": "crc32c"}],
                    },
                }
            ],
        },
    }


class TokenStoreWriter:
    """Appends documents' tokens; `close()` writes the offsets and the metadata last, so a
    store without its metadata file is recognisably unfinished."""

    def __init__(self, root: str, tokenizer, *, overwrite: bool = False):
        self.url = kvstore_url(root)
        self._kv = ts.KvStore.open(self.url, context=_CONTEXT).result()
        if self._kv.read(META).result().state == "value" and not overwrite:
            raise FileExistsError(f"token store {root!r} already exists; pass --overwrite to replace it")
        self._tokenizer = tokenizer
        self._dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
        spec = _array_spec(self.url, "tokens", self._dtype, SHARD_TOKENS, CHUNK_TOKENS)
        self._tokens = ts.open(spec, create=True, delete_existing=True, context=_CONTEXT).result()
        self._pending: list[np.ndarray] = []
        self._pending_size = 0
        self._written = 0
        self._offsets = [0]

    def add(self, tokens) -> None:
        tokens = np.asarray(tokens, dtype=self._dtype)
        self._pending.append(tokens)
        self._pending_size += len(tokens)
        self._offsets.append(self._offsets[-1] + len(tokens))
        if self._pending_size >= SHARD_TOKENS:
            self._flush(whole_shards_only=True)

    def _flush(self, whole_shards_only: bool) -> None:
        if not self._pending:
            return
        data = np.concatenate(self._pending)
        # Write whole shards while more data is coming: no shard is rewritten later.
        size = len(data) - (len(data) % SHARD_TOKENS) if whole_shards_only else len(data)
        if size:
            end = self._written + size
            self._tokens = self._tokens.resize(exclusive_max=[end], expand_only=True).result()
            self._tokens[self._written : end].write(data[:size]).result()
            self._written = end
        rest = data[size:]
        self._pending = [rest] if len(rest) else []
        self._pending_size = len(rest)

    def close(self, stats: SourceStats, source_names: list[str]) -> dict:
        self._flush(whole_shards_only=False)
        offsets = np.asarray(self._offsets, np.int64)
        spec = _array_spec(self.url, "doc_offsets", "int64", 1 << 20, 1 << 14)
        array = ts.open(spec, create=True, delete_existing=True, context=_CONTEXT).result()
        array = array.resize(exclusive_max=[len(offsets)], expand_only=True).result()
        array.write(offsets).result()
        tok = self._tokenizer
        tokenizer_file, payload = tok.stored_file()  # rebuilt by Tokenizer.from_stored_file
        self._kv.write(tokenizer_file, payload).result()
        special = tok.stored_special()
        if special is not None:
            self._kv.write(SPECIAL_NAME, special).result()
        meta = {
            "format": "elmjax-token-store-1",
            "documents": len(offsets) - 1,
            "tokens": int(offsets[-1]),
            "dtype": self._dtype,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "tokenizer_file": tokenizer_file,
            "tokenizer_special_file": None if special is None else SPECIAL_NAME,
            "tokenizer_fingerprint": tok.fingerprint,
            "sources": source_names,
            "input_stats": stats.as_dict(),
        }
        self._kv.write(META, json.dumps(meta, indent=2).encode()).result()
        return meta


def read_meta(root: str) -> dict:
    url = kvstore_url(root)
    result = ts.KvStore.open(url, context=_CONTEXT).result().read(META).result()
    if result.state != "value":
        raise FileNotFoundError(
            f"{root!r} is not a finished token store (no {META}); write one with "
            "`python tools/prepare_data.py`"
        )
    return json.loads(bytes(result.value))


def read_stored_tokenizer(root: str) -> tuple[str, bytes, bytes | None]:
    """(file name, bytes, special-token names' bytes or None) of the tokenizer saved inside
    the store; tokenizer_choice rebuilds it (`elmjax.data.tokenizer_choice.load_store_tokenizer`)."""
    meta = read_meta(root)
    kv = ts.KvStore.open(kvstore_url(root), context=_CONTEXT).result()
    special_file = meta.get("tokenizer_special_file")  # absent in stores written before it existed
    special = bytes(kv.read(special_file).result().value) if special_file else None
    return meta["tokenizer_file"], bytes(kv.read(meta["tokenizer_file"]).result().value), special


class TokenStoreSource(DocumentSource):
    """Documents of a token store as int arrays (reads one document per access)."""

    tokenized = True

    def __init__(self, root: str):
        self.name = root
        self.meta = read_meta(root)
        self.url = kvstore_url(root)
        self.special_ids = (self.meta["bos_id"], self.meta["eos_id"])
        self._tokens = None
        offsets = ts.open(
            {"driver": "zarr3", "kvstore": self.url + "doc_offsets/"}, open=True, context=_CONTEXT
        ).result()
        self._offsets = offsets.read().result()
        stats = self.meta.get("input_stats", {})
        self.stats = SourceStats(**{k: v for k, v in stats.items() if k in SourceStats.__dataclass_fields__})
        self.stats.documents = len(self._offsets) - 1
        self.require_documents()

    def __getstate__(self):  # tensorstore handles are reopened in each worker process
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state

    def _array(self):
        if self._tokens is None:
            self._tokens = ts.open(
                {"driver": "zarr3", "kvstore": self.url + "tokens/"}, open=True, context=_CONTEXT
            ).result()
        return self._tokens

    def __len__(self):
        return len(self._offsets) - 1

    def __getitem__(self, index):
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._array()[start:end].read().result().astype(np.int32)

    def key(self, index):  # independent of where the store lives, so moving it keeps the split
        return f"token_store#{index}"

    def document_lengths(self) -> np.ndarray:
        return np.diff(self._offsets)

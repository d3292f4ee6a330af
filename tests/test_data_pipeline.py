"""The grain pipeline: contract format, determinism, resumption, sharding, mixing, packing."""
import json

import grain
import numpy as np
import pytest

from elmjax.data import pipeline
from elmjax.data.token_store import TokenStoreWriter
from elmjax.data.sources import SourceStats
from elmjax.data.tokenizer_choice import load_tokenizer
from data_support import data_config

SEQ = 32
BATCH = 4



def small_config(source="embedded", **data):
    return data_config(source, seq=SEQ, batch=BATCH, **data)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def constant_store(root, lengths, first_value, tokenizer):
    """A token store whose document i is `lengths[i]` copies of the token first_value + i:
    every token names its document, so rows can be traced back exactly."""
    writer = TokenStoreWriter(root, tokenizer, overwrite=True)
    for i, length in enumerate(lengths):
        writer.add(np.full(length, first_value + i))
    writer.close(SourceStats(documents=len(lengths)), ["synthetic"])
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(small_config())


@pytest.fixture(scope="module")
def store(tokenizer, tmp_path_factory):
    # 60 documents from 1 token to 3.5 rows long: short ones pack together, long ones split.
    lengths = [1 + (i * 37) % (3 * SEQ + 20) for i in range(60)]
    root = str(tmp_path_factory.mktemp("store"))
    return constant_store(root, lengths, 100, tokenizer), lengths


def test_batches_follow_the_contract_format():
    batch = next(pipeline.make_train_iterator(small_config(), process_index=0, process_count=1))
    assert sorted(batch) == ["inputs", "loss_mask", "positions", "segment_ids", "targets"]
    for key in ("inputs", "targets", "segment_ids", "positions"):
        assert batch[key].shape == (BATCH, SEQ) and batch[key].dtype == np.int32, key
    assert batch["loss_mask"].shape == (BATCH, SEQ) and batch["loss_mask"].dtype == np.float32
    # targets are the inputs shifted by one within the packed row
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["segment_ids"].min() >= 1  # a training row is fully packed: no padding


def test_same_seed_gives_the_same_batches():
    a = take(pipeline.make_train_iterator(small_config(seed=7), process_index=0, process_count=1), 5)
    b = take(pipeline.make_train_iterator(small_config(seed=7), process_index=0, process_count=1), 5)
    assert_same_batches(a, b)


def test_different_seed_gives_a_different_order():
    a = next(pipeline.make_train_iterator(small_config(seed=1), process_index=0, process_count=1))
    b = next(pipeline.make_train_iterator(small_config(seed=2), process_index=0, process_count=1))
    assert not np.array_equal(a["inputs"], b["inputs"])


def test_restored_iterator_continues_with_the_same_batches():
    config = small_config(seed=3)
    reference = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    take(reference, 7)  # mid-epoch, mid-document (documents span several rows)
    state = reference.get_state()
    expected = take(reference, 6)
    # The state is small and JSON-serialisable (no token data inside it).
    assert len(json.dumps(state)) < 1000
    restored = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    restored.set_state(json.loads(json.dumps(state)))
    assert_same_batches(take(restored, 6), expected)


def test_restore_through_orbax_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    config = small_config(seed=4)
    iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = take(iterator, 3)
        fresh = pipeline.make_train_iterator(config, process_index=0, process_count=1)
        manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same_batches(take(fresh, 3), expected)


def rows_of_one_epoch(config, process_index=0, process_count=1, split="train"):
    rows = pipeline.build_rows(
        config, split, process_index=process_index, process_count=process_count, num_epochs=1
    )
    return list(rows)


def document_tokens(rows, bos=1, eos=2):
    """{token value: count} of the non-special, non-padding tokens of packed rows."""
    values, counts = np.unique(
        np.concatenate([r["tokens"][(r["tokens_segment_ids"] > 0)] for r in rows]),
        return_counts=True,
    )
    return {int(v): int(c) for v, c in zip(values, counts) if v not in (bos, eos)}


def test_every_token_of_the_store_appears_once_in_an_epoch(store):
    root, lengths = store
    config = small_config(root, eval_fraction=0.0)
    seen = document_tokens(rows_of_one_epoch(config))
    assert seen == {100 + i: n for i, n in enumerate(lengths)}


def test_every_token_of_a_text_corpus_appears_in_an_epoch(tmp_path, tokenizer):
    texts = [f"Document {i}: " + " ".join(["word"] * (i * 7 % 50)) + " end." for i in range(40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    config = small_config(str(path), eval_fraction=0.0, tokenizer=tokenizer.name)
    rows = rows_of_one_epoch(config)
    tokens = np.concatenate([r["tokens"][r["tokens_segment_ids"] > 0] for r in rows])
    expected = np.concatenate([[1, *tokenizer.encode(t), 2] for t in texts])
    np.testing.assert_array_equal(np.sort(tokens), np.sort(expected))


def test_process_shards_are_disjoint_and_cover_the_corpus(store):
    root, lengths = store
    config = small_config(root, eval_fraction=0.0)
    shards = [document_tokens(rows_of_one_epoch(config, p, 3)) for p in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not shards[a].keys() & shards[b].keys()
    union = {k: v for shard in shards for k, v in shard.items()}
    assert union == {100 + i: n for i, n in enumerate(lengths)}


def test_each_process_gets_its_local_share_of_the_global_batch(store):
    config = small_config(store[0])
    batch = next(pipeline.make_train_iterator(config, process_index=1, process_count=2))
    assert batch["inputs"].shape == (BATCH // 2, SEQ)


def test_packing_never_lets_a_segment_cross_a_document(store):
    config = small_config(store[0], eval_fraction=0.0)
    batches = take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 30)
    for batch in batches:
        for inputs, targets, segments, positions, mask in zip(
            batch["inputs"], batch["targets"], batch["segment_ids"], batch["positions"], batch["loss_mask"]
        ):
            # segment ids are 1, 2, ... in order; positions count from 0 in each segment
            assert segments[0] == 1 and np.all(np.diff(segments) >= 0)
            for seg in np.unique(segments):
                where = np.flatnonzero(segments == seg)
                np.testing.assert_array_equal(where, np.arange(where[0], where[-1] + 1))
                np.testing.assert_array_equal(positions[where], np.arange(len(where)) + positions[where[0]])
                body = inputs[where][(inputs[where] != 1) & (inputs[where] != 2)]
                assert len(np.unique(body)) <= 1, "a segment holds tokens of two documents"
                if where[0] > 0:
                    assert positions[where[0]] == 0
            # loss exactly where the target is the next token of the same document
            np.testing.assert_array_equal(mask[:-1], (segments[1:] == segments[:-1]).astype(np.float32))
            assert not np.any((mask == 1) & (targets == 1)), "BOS of a new document is never a target"
            body = (mask == 1) & ~np.isin(inputs, [1, 2]) & ~np.isin(targets, [1, 2])
            np.testing.assert_array_equal(targets[body], inputs[body])


def test_mixture_proportions_match_the_weights(tokenizer, tmp_path):
    a = constant_store(str(tmp_path / "a"), [50] * 40, 100, tokenizer)
    b = constant_store(str(tmp_path / "b"), [50] * 40, 2000, tokenizer)
    config = small_config(f"{a},{b}", mixture_weights="3,1", eval_fraction=0.0)
    batches = take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 100)
    from_a = sum(int(np.any((r >= 100) & (r < 2000))) for b_ in batches for r in b_["inputs"])
    # tolerance: within 2 percentage points of 3/4 over 400 rows
    assert abs(from_a / 400 - 0.75) <= 0.02


def test_eval_split_is_held_out_finite_and_deterministic(store):
    root, lengths = store
    config = small_config(root, eval_fraction=0.2)
    train = document_tokens(rows_of_one_epoch(config))
    held_out = document_tokens(rows_of_one_epoch(config, split="eval"))
    assert held_out and not train.keys() & held_out.keys()
    assert {**train, **held_out} == {100 + i: n for i, n in enumerate(lengths)}
    first = list(pipeline.make_eval_iterator(config, process_index=0, process_count=1))
    second = list(pipeline.make_eval_iterator(config, process_index=0, process_count=1))
    assert_same_batches(first, second)
    assert all(b["inputs"].shape == (BATCH, SEQ) for b in first)  # last batch padded
    mask_tokens = sum(float(b["loss_mask"].sum()) for b in first)
    assert mask_tokens > 0


def test_memory_kvstore_token_store(tokenizer):
    root = constant_store("memory://elmjax_test_store", [5, 70, 3], 300, tokenizer)
    rows = rows_of_one_epoch(small_config(root, eval_fraction=0.0))
    assert document_tokens(rows) == {300: 5, 301: 70, 302: 3}


def test_worker_processes_give_deterministic_resumable_batches(store):
    config = small_config(store[0], num_workers=2, seed=5)
    first = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    take(first, 4)
    state = first.get_state()
    expected = take(first, 4)
    first.close()
    second = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    second.set_state(state)
    assert_same_batches(take(second, 4), expected)
    second.close()


def test_a_finite_pass_over_two_sources_reads_both_completely(tokenizer, tmp_path):
    a = constant_store(str(tmp_path / "a"), [10] * 3, 100, tokenizer)
    b = constant_store(str(tmp_path / "b"), [40] * 9, 200, tokenizer)
    config = small_config(f"{a},{b}", mixture_weights="1,1", eval_fraction=0.0)
    seen = document_tokens(rows_of_one_epoch(config))
    assert seen == {**{100 + i: 10 for i in range(3)}, **{200 + i: 40 for i in range(9)}}


def test_a_tokenizer_json_gives_the_same_batches_as_its_sentencepiece_model(tokenizer, tmp_path):
    tokenizer.save_hf_files(tmp_path)
    source = tmp_path / "docs.txt"
    source.write_text("\n".join(f"Line {i}: to be, or not to be, that is the question." for i in range(30)))
    batches = {}
    for name, path in (("spm", tokenizer.name), ("json", str(tmp_path / "tokenizer.json"))):
        config = small_config(str(source), tokenizer=path, text_unit="line")
        batches[name] = take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 3)
    assert_same_batches(batches["spm"], batches["json"])


def test_a_token_store_of_another_tokenizer_is_rejected(store, tmp_path):
    from elmjax.data.sentencepiece_training import embedded_tokenizer

    other = embedded_tokenizer(1024, ("kjv", "shakespeare"))
    config = small_config(store[0], tokenizer=other.name)
    with pytest.raises(ValueError, match="was written with tokenizer"):
        pipeline.make_train_iterator(config, process_index=0, process_count=1)

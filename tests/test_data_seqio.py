"""A registered seqio Task/Mixture as a data source (`data.source="seqio:<name>"`), for real.

Needs the optional extra (seqio pulls TensorFlow, ~3 GB), which CI's default install does not
have, so the module skips there. Run it in a separate environment:
    python -m venv /tmp/seqio-venv && /tmp/seqio-venv/bin/pip install -e ".[seqio]" pytest
    /tmp/seqio-venv/bin/python -m pytest tests/test_data_seqio.py -q
The Task is registered here from in-memory texts, tokenized by seqio with a
SentencePieceVocabulary trained in the test; everything goes through elmjax's pipeline.
"""
import functools
import json

import grain
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from elmjax.config import base_config, validate  # noqa: E402
from elmjax.data import pipeline  # noqa: E402
from elmjax.data.tokenizer import open_tokenizer  # noqa: E402
from elmjax.data.sentencepiece_training import train_sentencepiece  # noqa: E402

SEQ = 16
BATCH = 4
BOS, EOS, PAD = 1, 2, 3  # elmjax's SentencePiece settings (train_sentencepiece)
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls sing of rivers and stone".split()


def texts(count, offset):
    """`count` documents of varied length (1 to ~30 words; several span more than a row)."""
    rng = np.random.default_rng(offset)
    return [
        f"doc {offset + i}: " + " ".join(rng.choice(WORDS, size=1 + (i * 7) % 30))
        for i in range(count)
    ]


TRAIN_TEXTS = texts(40, 0)
VALIDATION_TEXTS = texts(9, 1000)


def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed
    documents = {"train": TRAIN_TEXTS, "validation": VALIDATION_TEXTS}[split]
    return tf.data.Dataset.from_tensor_slices({"text": documents})


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("seqio") / "spm.model"
    path.write_bytes(train_sentencepiece(TRAIN_TEXTS + VALIDATION_TEXTS, 320))
    return path


def register_task(name, vocabulary):
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn=dataset_fn, splits=["train", "validation"]),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            seqio.preprocessors.tokenize,
        ],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False)},
    )


@pytest.fixture(scope="module")
def task(spm_path):
    vocabulary = seqio.SentencePieceVocabulary(str(spm_path))
    task = register_task("elmjax_test_seqio_task", vocabulary)
    yield task
    seqio.TaskRegistry.remove(task.name)


def config_for(name, spm_path, **data):
    config = base_config()
    config.model.vocab_size = 384
    config.model.max_seq_len = 64
    config.train.seq_len = SEQ
    config.train.batch_size = BATCH
    config.data.source = f"seqio:{name}"
    config.data.tokenizer = str(spm_path)
    for key, value in data.items():
        config.data[key] = value
    return validate(config)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def task_documents(task, split, n=None, **kwargs):
    """The Task's own "targets" token lists, as seqio's get_dataset gives them."""
    dataset = task.get_dataset(sequence_length=None, split=split, **kwargs)
    if n is not None:
        dataset = dataset.take(n)
    return [list(example["targets"]) for example in dataset.as_numpy_iterator()]


def stream(documents):
    return [token for document in documents for token in (BOS, *document, EOS)]


def batch_tokens(batches):
    """The packed token stream of train batches (every row is full: no padding)."""
    rows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches]
    return np.concatenate(rows).reshape(-1).tolist()


def eval_tokens(batches):
    """The token stream of eval batches, padding (PAD, never a document token) left out."""
    rows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches]
    return [int(t) for t in np.concatenate(rows).reshape(-1) if t != PAD]


def train_iterator(config):
    return pipeline.make_train_iterator(config, process_index=0, process_count=1)


def test_eval_reads_the_validation_split_exactly_in_order(task, spm_path):
    config = config_for(task.name, spm_path)
    batches = list(pipeline.make_eval_iterator(config, process_index=0, process_count=1))
    documents = task_documents(task, "validation", shuffle=False)
    assert len(documents) == len(VALIDATION_TEXTS)
    assert all(PAD not in d and BOS not in d and EOS not in d for d in documents)
    assert open_tokenizer(spm_path).decode(documents[0]) == VALIDATION_TEXTS[0]
    assert eval_tokens(batches) == stream(documents)
    # the last batch is padded to the batch size; padding rows are out of the loss
    assert all(b["inputs"].shape == (BATCH, SEQ) for b in batches)
    assert batches[-1]["loss_mask"][-1].sum() == 0


def test_train_reads_the_train_split_shuffled_with_the_seed(task, spm_path):
    config = config_for(task.name, spm_path, seed=11)
    batches = take(train_iterator(config), 40)  # more than one epoch of the 40 documents
    got = batch_tokens(batches)
    documents = task_documents(task, "train", 120, shuffle=True, seed=11, num_epochs=None)
    expected = stream(documents)
    assert len(got) > len(stream(task_documents(task, "train", shuffle=False)))  # > 1 epoch
    assert got == expected[: len(got)]
    # Only train documents, and the seed's shuffle happened (seqio's own order differs).
    train_ids = {tuple(d) for d in task_documents(task, "train", shuffle=False)}
    assert {tuple(d) for d in documents} == train_ids
    unshuffled = stream(task_documents(task, "train", 120, shuffle=False, num_epochs=None))
    assert got != unshuffled[: len(got)]
    other = batch_tokens(take(train_iterator(config_for(task.name, spm_path, seed=12)), 40))
    assert other != got


def test_two_train_iterators_give_identical_batches(task, spm_path):
    config = config_for(task.name, spm_path, seed=3)
    assert_same_batches(take(train_iterator(config), 12), take(train_iterator(config), 12))


@pytest.mark.parametrize("position", [5, 37])  # mid-epoch, and in the second epoch
def test_restored_iterator_continues_with_the_same_batches(task, spm_path, position):
    config = config_for(task.name, spm_path, seed=4)
    reference = train_iterator(config)
    take(reference, position)
    state = reference.get_state()
    expected = take(reference, 8)
    assert len(json.dumps(state)) < 1000  # a document count, no data
    restored = train_iterator(config)
    restored.set_state(json.loads(json.dumps(state)))
    assert_same_batches(take(restored, 8), expected)


def test_restore_through_an_orbax_checkpoint_as_training_does(task, spm_path, tmp_path):
    import orbax.checkpoint as ocp

    config = config_for(task.name, spm_path, seed=5)
    iterator = train_iterator(config)
    take(iterator, 9)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = take(iterator, 6)
        fresh = train_iterator(config)
        manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same_batches(take(fresh, 6), expected)


def test_each_process_reads_its_own_shard_of_the_validation_split(task, spm_path):
    config = config_for(task.name, spm_path)
    shards = [
        eval_tokens(pipeline.make_eval_iterator(config, process_index=i, process_count=2))
        for i in range(2)
    ]
    documents = task_documents(task, "validation", shuffle=False)
    assert shards[0] == stream(documents[0::2]) and shards[1] == stream(documents[1::2])


@pytest.fixture(scope="module")
def mixture(task):
    """`task` mixed 1:1 with a Task of other documents that has only a train split."""
    other_texts = texts(30, 5000)

    def other_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices({"text": other_texts})

    seqio.TaskRegistry.remove("elmjax_test_seqio_other")
    other = seqio.TaskRegistry.add(
        "elmjax_test_seqio_other",
        source=seqio.FunctionDataSource(dataset_fn=other_fn, splits=["train"]),
        preprocessors=task.preprocessors,
        output_features=task.output_features,
    )
    seqio.MixtureRegistry.remove("elmjax_test_seqio_mixture")
    mixture = seqio.MixtureRegistry.add("elmjax_test_seqio_mixture", [(task.name, 1.0), (other.name, 1.0)])
    yield mixture
    seqio.MixtureRegistry.remove(mixture.name)
    seqio.TaskRegistry.remove(other.name)


def test_a_mixture_reads_its_tasks_deterministically_and_resumes(task, mixture, spm_path):
    config = config_for(mixture.name, spm_path, seed=6)
    batches = take(train_iterator(config), 16)
    got = batch_tokens(batches)
    documents = task_documents(mixture, "train", 200, shuffle=True, seed=6, num_epochs=None)
    assert got == stream(documents)[: len(got)]
    other = seqio.get_mixture_or_task("elmjax_test_seqio_other")
    sources = {tuple(d) for d in documents[:40]}
    assert sources & {tuple(d) for d in task_documents(task, "train", shuffle=False)}
    assert sources & {tuple(d) for d in task_documents(other, "train", shuffle=False)}
    reference = train_iterator(config)
    take(reference, 7)
    restored = train_iterator(config)
    restored.set_state(reference.get_state())
    assert_same_batches(take(restored, 5), take(reference, 5))
    # eval: the Task without a validation split is left out by seqio
    eval_batches = list(pipeline.make_eval_iterator(config, process_index=0, process_count=1))
    assert eval_tokens(eval_batches) == stream(task_documents(task, "validation", shuffle=False))


def test_a_task_without_a_validation_split_says_so_for_eval(mixture, spm_path):
    config = config_for("elmjax_test_seqio_other", spm_path)
    with pytest.raises(ValueError, match="no 'validation' split"):
        pipeline.make_eval_iterator(config, process_index=0, process_count=1)


def test_vocabulary_mismatches_are_config_errors(task, spm_path, tmp_path):
    with pytest.raises(ValueError, match=r"model.vocab_size.*320 tokens"):
        pipeline.make_train_iterator(
            validate_with(config_for(task.name, spm_path), vocab_size=256), process_index=0, process_count=1
        )
    other = tmp_path / "other.model"
    other.write_bytes(train_sentencepiece(TRAIN_TEXTS, 300))
    with pytest.raises(ValueError, match=r"data.tokenizer.*300 tokens.*320"):
        pipeline.make_train_iterator(config_for(task.name, other), process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"data.tokenizer.*seqio"):
        pipeline.make_train_iterator(config_for(task.name, ""), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no seqio Task or Mixture named 'elmjax_no_such_task'"):
        pipeline.make_train_iterator(config_for("elmjax_no_such_task", spm_path), process_index=0, process_count=1)


def validate_with(config, vocab_size):
    config.model.vocab_size = vocab_size
    return validate(config)


def test_already_tokenized_documents_with_a_vocabulary_without_bos(spm_path):
    """A Task of int features (no tokenize step) whose PassThroughVocabulary has no bos_id
    (seqio's base class raises NotImplementedError for it): EOS only, ids kept exactly."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(4, 320, size=1 + (i * 5) % 40).astype(np.int32) for i in range(12)]

    def int_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_generator(
            lambda: ({"targets": d} for d in documents),
            output_signature={"targets": tf.TensorSpec([None], tf.int32)},
        )

    name = "elmjax_test_seqio_ids"
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn=int_fn, splits=["train", "validation"]),
        preprocessors=[],
        output_features={"targets": seqio.Feature(seqio.PassThroughVocabulary(320, eos_id=EOS))},
    )
    try:
        config = config_for(name, spm_path, add_bos=False)
        batches = list(pipeline.make_eval_iterator(config, process_index=0, process_count=1))
        expected = [int(t) for d in documents for t in (*d, EOS)]
        assert eval_tokens(batches) == expected
        with pytest.raises(ValueError, match="data.add_bos"):
            pipeline.make_eval_iterator(config_for(name, spm_path), process_index=0, process_count=1)
    finally:
        seqio.TaskRegistry.remove(name)


@pytest.mark.slow
def test_grain_worker_processes_read_seqio_shards_deterministically_and_resume(task, spm_path):
    """Spawned workers never imported this module, so the Task travels with the dataset;
    worker i of 2 reads a finer seqio shard. (Starts two processes importing TensorFlow.)"""
    config = config_for(task.name, spm_path, seed=8, num_workers=2)
    first = train_iterator(config)
    take(first, 3)
    state = first.get_state()
    expected = take(first, 4)
    first.close()
    second = train_iterator(config)
    second.set_state(state)
    assert_same_batches(take(second, 4), expected)
    second.close()
    batches = list(pipeline.make_eval_iterator(config, process_index=0, process_count=1))
    got = eval_tokens(batches)
    documents = task_documents(task, "validation", shuffle=False)
    # workers interleave their shards' rows, so compare the multiset of tokens
    assert sorted(got) == sorted(stream(documents))

"""The streaming safetensors writer/reader against the safetensors library itself."""
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from elmjax.convert.safetensors_io import (
    TensorSource,
    plan_shards,
    read_model_dir,
    read_safetensors,
    source_from_array,
    write_safetensors,
    write_sharded,
)


def test_files_written_here_read_identically_with_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, 5)).astype(np.float32)
    packed = rng.integers(0, 2**32, size=(2, 4), dtype=np.uint32)
    write_safetensors(
        tmp_path / "a.safetensors",
        [source_from_array("w.T.bf16", weight.T, ml_dtypes.bfloat16), source_from_array("q", packed)],
        metadata={"format": "pt"},
    )
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("w.T.bf16"), torch.from_numpy(weight.T.copy()).to(torch.bfloat16))
        assert torch.equal(f.get_tensor("q").view(torch.int32), torch.from_numpy(packed.view(np.int32)))


def test_files_written_by_safetensors_are_read_here_without_copying(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"format": "pt"})
    read = read_safetensors(tmp_path / "b.safetensors")
    np.testing.assert_array_equal(read["a"], tensors["a"].numpy())
    assert read["b"].dtype == ml_dtypes.bfloat16 and read["b"].astype(np.float32).tolist() == [1.0] * 4
    assert isinstance(read["a"], np.memmap)  # a view of the file, not a copy


def test_a_tensor_larger_than_the_shard_limit_gets_a_shard_of_its_own():
    lengths = [10, 10, 50, 2, 7]  # float32 vectors of 40, 40, 200, 8, 28 bytes
    sources = [TensorSource(f"t{i}", (n,), np.dtype(np.float32), None) for i, n in enumerate(lengths)]
    shards = plan_shards(sources, max_shard_bytes=100)
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_sharded_writing_round_trips_through_the_index(tmp_path):
    arrays = {f"layer{i}": np.full((8, 8), i, dtype=np.float32) for i in range(5)}  # 256 B each
    files = write_sharded(tmp_path, [source_from_array(k, v) for k, v in arrays.items()], max_shard_bytes=600)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert files[-1] == "model.safetensors.index.json" and len(files) == 4
    assert index["weight_map"]["layer4"] == "model-00003-of-00003.safetensors"
    read = read_model_dir(tmp_path)
    assert sorted(read) == sorted(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(read[name], value)


def test_a_producer_that_breaks_its_declared_shape_is_an_error(tmp_path):
    bad = TensorSource("x", (2, 2), np.dtype(np.float32), lambda: np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"tensor x: produced float32\[2, 3\], declared float32\[2, 2\]"):
        write_safetensors(tmp_path / "bad.safetensors", [bad])

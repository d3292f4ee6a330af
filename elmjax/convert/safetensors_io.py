"""Streaming safetensors writing (optionally sharded, with an index) and memory-mapped reading.

The safetensors format is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw little-endian bytes. Writing it here
(rather than through `safetensors.numpy.save_file`) lets export produce one tensor at a
time — transpose, cast or quantize it, write it, drop it — so peak memory stays near one
copy of the model, and it handles bfloat16 (through `ml_dtypes`), which safetensors' numpy
API does not. Files written here are read by the real safetensors library (torch, mlx,
transformers); the tests check that.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # shards above 2 GiB; Apple's 3B release uses two files

_CODE_BY_DTYPE = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_DTYPE_BY_CODE = {code: dtype for dtype, code in _CODE_BY_DTYPE.items()}


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """A tensor to write, produced on demand so only one is materialised at a time.

    `produce()` must return an array of exactly `shape` and `dtype`.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def source_from_array(name: str, array, dtype=None) -> TensorSource:
    """A `TensorSource` that casts `array` (any array-like, e.g. a transposed view) on demand."""
    dtype = np.dtype(dtype if dtype is not None else array.dtype)
    # No copy when the array already has the dtype and C layout; transposed views get one.
    return TensorSource(
        name, tuple(int(d) for d in array.shape), dtype, lambda: np.ascontiguousarray(np.asarray(array), dtype=dtype)
    )


def write_safetensors(path: str | os.PathLike, sources: Sequence[TensorSource], metadata: dict | None = None) -> None:
    """Writes one safetensors file, producing and writing the tensors one by one."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for source in sources:
        if np.dtype(source.dtype) not in _CODE_BY_DTYPE:
            raise ValueError(f"tensor {source.name}: dtype {source.dtype} has no safetensors code")
        header[source.name] = {
            "dtype": _CODE_BY_DTYPE[np.dtype(source.dtype)],
            "shape": list(source.shape),
            "data_offsets": [offset, offset + source.nbytes],
        }
        offset += source.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for source in sources:
            array = source.produce()
            if tuple(array.shape) != tuple(source.shape) or array.dtype != np.dtype(source.dtype):
                raise ValueError(
                    f"tensor {source.name}: produced {array.dtype}{list(array.shape)}, "
                    f"declared {np.dtype(source.dtype)}{list(source.shape)}"
                )
            # Little-endian C order is the on-disk layout; every platform we support is
            # little-endian, so the array's own bytes are written as they are.
            f.write(memoryview(np.ascontiguousarray(array).view(np.uint8)))  # bytes: bfloat16 has no buffer format
            del array


def plan_shards(sources: Sequence[TensorSource], max_shard_bytes: int) -> list[list[TensorSource]]:
    """Groups tensors in order into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSource]] = []
    size = 0
    for source in sources:
        if not shards or size + source.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(source)
        size += source.nbytes
    return shards


def write_sharded(
    out_dir: str | os.PathLike,
    sources: Sequence[TensorSource],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict | None = None,
) -> list[str]:
    """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` files plus
    `model.safetensors.index.json` (Hugging Face's layout) when the tensors exceed
    `max_shard_bytes`. Returns the file names written."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    shards = plan_shards(sources, max_shard_bytes)
    if len(shards) <= 1:
        write_safetensors(os.path.join(out_dir, SINGLE_FILE), list(sources), metadata)
        return [SINGLE_FILE]
    files = []
    weight_map = {}
    for index, shard in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, file_name), shard, metadata)
        files.append(file_name)
        weight_map.update({source.name: file_name for source in shard})
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in sources)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    files.append(INDEX_FILE)
    return files


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of one safetensors file as read-only memory-mapped numpy arrays (no copy)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPE_BY_CODE:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = buffer[data_start + begin : data_start + end]
        tensors[name] = raw.view(_DTYPE_BY_CODE[info["dtype"]]).reshape(info["shape"])
    return tensors


def weight_files(model_dir: str | os.PathLike) -> list[str]:
    """The safetensors files of a model directory: from the index if there is one."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(
        f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; expected a Hugging Face model directory"
    )


def read_model_dir(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) model directory, memory-mapped."""
    tensors: dict[str, np.ndarray] = {}
    for path in weight_files(model_dir):
        tensors.update(read_safetensors(path))
    return tensors


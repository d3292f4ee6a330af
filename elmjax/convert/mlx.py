"""mlx-lm's layout: a family's HF names and config.json, plus mlx-lm's quantized format.

mlx-lm's models use the Hugging Face names of the architecture they implement (for OpenELM,
Apple's `transformer.layers.{i}...`), so an unquantized MLX export holds the same tensors as
the HF one, except where the family's layout says otherwise (`to_mlx`: OLMoE's experts are
stacked [E, out, in], as mlx-lm's SwitchLinear holds them). A quantized export replaces each
quantizable `X.weight` by mlx-lm's affine triplet — `X.weight` (uint32, `bits` values packed
per 32-bit word: [..., out, in * bits / 32]), `X.scales` and `X.biases` ([..., out,
in / group_size], in the export dtype; a stacked tensor keeps its leading expert axis) — and
config.json gains `"quantization": {"group_size", "bits", "mode"}`
(mirrored as `"quantization_config"`), which `mlx_lm.utils.load_model` reads to swap in
`QuantizedLinear` / `QuantizedEmbedding` before loading the weights. The packing itself is
`mlx.core.quantize`, the function mlx-lm uses.
"""
from __future__ import annotations

import copy

import ml_dtypes
import numpy as np

from elmjax.convert.safetensors_io import TensorSource, source_from_array

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
QUANTIZATION_MODE = "affine"  # mlx-lm's default mode: per-group scale and bias

def check_quantization(bits: int, group_size: int) -> None:
    """Raises ValueError unless (bits, group_size) is a quantization this export supports."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"unsupported quantization: {bits} bits; --quantize must be one of "
            f"{', '.join(map(str, SUPPORTED_BITS))} (mlx-lm affine quantization)"
        )
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"unsupported quantization group size {group_size}; --group-size must be one of "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))} (what mlx supports)"
        )


def is_quantizable(name: str, shape: tuple[int, ...], group_size: int, quantizable: tuple[str, ...]) -> bool:
    """Whether mlx-lm quantizes this tensor: a Linear/Embedding/SwitchLinear weight (its name
    ends with one of the layout's `quantizable` suffixes) whose rows split into whole groups
    (mlx-lm leaves a layer unquantized otherwise, and so do we)."""
    return name.endswith(quantizable) and len(shape) >= 2 and shape[-1] % group_size == 0


def _mx_dtype(dtype: np.dtype):
    import mlx.core as mx

    return {
        np.dtype(np.float32): mx.float32,
        np.dtype(np.float16): mx.float16,
        np.dtype(ml_dtypes.bfloat16): mx.bfloat16,
    }[np.dtype(dtype)]


def _to_numpy(array) -> np.ndarray:
    """An mlx array as numpy (bfloat16 through a uint16 view, which numpy cannot take directly)."""
    import mlx.core as mx

    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(array)


def quantize(array, dtype, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mlx's affine quantization of a [..., out, in] weight after casting it to `dtype`
    (groups run along `in`; leading axes, e.g. stacked experts, are kept).

    Returns (packed uint32 [..., out, in*bits/32], scales [..., out, in/group_size], biases [same]).
    """
    import mlx.core as mx

    weight = mx.array(np.asarray(array, dtype=np.float32, order="C")).astype(_mx_dtype(dtype))
    packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits, mode=QUANTIZATION_MODE)
    mx.eval(packed, scales, biases)
    return _to_numpy(packed), _to_numpy(scales), _to_numpy(biases)


def quantized_sources(name: str, array, dtype, bits: int, group_size: int) -> list[TensorSource]:
    """The three tensors that replace `name` (`X.weight`) in a quantized export, computed
    once when the first is written and released after the last."""
    prefix = name[: -len(".weight")]
    *rows, cols = (int(d) for d in array.shape)
    dtype = np.dtype(dtype)
    cache: dict[str, np.ndarray] = {}

    def part(key):
        def produce():
            if not cache:
                cache["weight"], cache["scales"], cache["biases"] = quantize(array, dtype, bits, group_size)
            return cache.pop(key)

        return produce

    groups = cols // group_size
    return [
        TensorSource(f"{prefix}.weight", (*rows, cols * bits // 32), np.dtype(np.uint32), part("weight")),
        TensorSource(f"{prefix}.scales", (*rows, groups), dtype, part("scales")),
        TensorSource(f"{prefix}.biases", (*rows, groups), dtype, part("biases")),
    ]


def mlx_sources(hf_tensors: dict, dtype, bits: int | None = None, group_size: int = 64,
                quantizable: tuple[str, ...] = ()) -> list[TensorSource]:
    """Tensors of an MLX export from HF-named arrays: cast to `dtype`; when `bits`, the weights
    named by the layout's `quantizable` suffixes are quantized."""
    sources = []
    for name, array in hf_tensors.items():
        if bits is not None and is_quantizable(name, tuple(array.shape), group_size, quantizable):
            sources.extend(quantized_sources(name, array, dtype, bits, group_size))
        else:
            sources.append(source_from_array(name, array, dtype))
    return sources


def mlx_config(hf_config: dict, bits: int | None = None, group_size: int = 64) -> dict:
    """config.json for mlx-lm: the HF config, plus mlx-lm's quantization entry when quantized.

    `auto_map` (which points transformers at Apple's remote modeling code) is dropped: the
    MLX directory does not ship that code, and with the key present transformers 5 asks
    interactively whether to run it when mlx-lm loads the tokenizer.
    """
    config = copy.deepcopy(hf_config)
    config.pop("auto_map", None)
    if bits is not None:
        quantization = {"group_size": group_size, "bits": bits, "mode": QUANTIZATION_MODE}
        config["quantization"] = quantization
        config["quantization_config"] = dict(quantization)  # the key HF-style tools look for
    return config

"""What every format shares: the checked quantization_config (:class:`Scheme`), the rules on bits,
group sizes and scales, and the check of a layer's tensors against the safetensors headers
(dtype names as safetensors writes them: "I32", "F16", "BF16", ...), so that a bad checkpoint is
refused before any weight is read.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..quantize import BITS, effective_group_size

INT32 = ("I32", "U32")                                           # packed words
INTEGER = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")  # g_idx, weight_shape
FLOAT = ("F16", "BF16", "F32")                                   # scales, biases, norms
DEFAULT_GROUP_SIZE = 128     # transformers' GPTQConfig / AwqConfig, AutoGPTQ, AutoAWQ when the config says none


class Scheme(NamedTuple):
    """config.json's ``quantization_config``, checked (:func:`quickcupy.formats.check_quantization_config`)."""

    method: str          # "awq", "gptq" or "compressed-tensors"
    variant: str         # awq: version "gemm"; gptq: checkpoint_format "gptq" / "gptq_v2"; "pack-quantized"
    group_size: int      # as the config says: -1 is one group per row
    zero_points: bool    # every layer stores zero points (False: compressed-tensors' symmetric default)
    config: dict         # the quantization_config itself


class TensorSpec(NamedTuple):
    """What one checkpoint tensor must be: a safetensors dtype among ``dtypes``, ``shape`` (None: not
    checked), written as ``layout`` in the error (e.g. "(K, N/8)"); optional ones may be absent."""

    dtypes: tuple
    shape: tuple | None
    layout: str = ""
    required: bool = True


def check_bits(value, setting: str):
    if isinstance(value, bool) or value != BITS:
        raise ValueError(f"{setting}={value!r} is not supported; only {BITS}-bit checkpoints load")


def check_group_size(value, setting: str, in_features=()) -> int:
    """``value`` as a group size: an int, -1 or positive, that the kernels take for each K in
    ``in_features`` (:func:`quickcupy.quantize.effective_group_size`). ValueError naming ``setting``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (value == -1 or value > 0):
        raise ValueError(f"{setting}={value!r} must be an int: -1 (one group per row) or a positive size")
    for K in in_features:
        try:
            effective_group_size(value, K)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{setting}={value!r}: {exc}") from None
    return int(value)


def n_groups(group_size: int, in_features: int) -> int | None:
    """Groups per row of a K-wide layer, or None where ``group_size`` does not divide K."""
    G = in_features if group_size in (-1, in_features) else group_size
    return in_features // G if in_features % G == 0 else None


def to_float16_exact(name: str, a) -> np.ndarray:
    """Scales as float16, the kernels' type: float16 as is, bfloat16 or float32 when float16 holds
    every value exactly (non-finite ones pass through, for the caller's own check). TypeError /
    ValueError naming ``name`` and the first value float16 cannot hold."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype == np.float16:
        return a
    if a.dtype != np.float32 and a.dtype.name != "bfloat16":
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {a.dtype}")
    a32 = a.astype(np.float32)
    with np.errstate(over="ignore"):
        a16 = a32.astype(np.float16)
    inexact = (a16.astype(np.float32) != a32) & np.isfinite(a32)
    if inexact.any():
        at = tuple(int(i) for i in np.argwhere(inexact)[0])
        raise ValueError(f"{name}[{', '.join(map(str, at))}] = {a32[at]} is not exactly representable in "
                         f"float16, which the kernels use")
    return a16


def check_tensors(headers, specs: dict, where: str = "the checkpoint"):
    """Checks tensors against the safetensors headers before any is read.

    headers: name -> (dtype name, shape), e.g. ``TensorStore.headers``. specs: name -> TensorSpec.
    ValueError listing the missing required tensors (first three named), else naming the first
    tensor whose dtype or shape is wrong.
    """
    missing = [name for name, s in specs.items() if s.required and name not in headers]
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) the model needs, first: {', '.join(missing[:3])}")
    for name, s in specs.items():
        if name not in headers:
            continue
        dtype, shape = headers[name]
        if dtype not in s.dtypes:
            raise ValueError(f"{name} has dtype {dtype}, expected {' or '.join(s.dtypes)}")
        if s.shape is not None and tuple(shape) != tuple(s.shape):
            raise ValueError(f"{name} has shape {tuple(shape)}, expected {s.layout + ' = ' if s.layout else ''}"
                             f"{tuple(s.shape)}")

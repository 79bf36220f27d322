"""Activation dtypes: the one place that knows their names, spellings, NumPy types and C++ types.

Every kernel, the GEMM API, the Llama model and the tools take activations of one of
:data:`NAMES`. Users may write a dtype as a NumPy/CuPy dtype or as any spelling of
:data:`SPELLINGS` ("fp16", "half", "bf16", ...); :func:`name` turns each into its canonical name,
which is what the rest of the package passes around. bfloat16 is ml_dtypes' type: NumPy has none,
and CuPy 14 uses ml_dtypes' for bfloat16 arrays.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

# Canonical name -> the C++ type a kernel template takes for it (Dt<T> in cuda/quant_common.cuh).
CTYPES = {"float16": "half", "bfloat16": "__nv_bfloat16"}
NAMES = tuple(CTYPES)
# The short name tables and command lines print for each.
SHORT = {"float16": "fp16", "bfloat16": "bf16"}
# What a user or a command line may write for each.
SPELLINGS = {"float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
             "bfloat16": "bfloat16", "bf16": "bfloat16"}
_NUMPY = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def name(dtype) -> str:
    """The canonical name ("float16" or "bfloat16") of an activation dtype given as a name or
    spelling (any case), a NumPy/CuPy dtype or a scalar type; ValueError listing the choices."""
    key = dtype.lower() if isinstance(dtype, str) else None
    if key is None:
        try:
            key = np.dtype(dtype).name
        except TypeError:
            key = None
    if key not in SPELLINGS:
        raise ValueError(f"dtype={dtype!r} is not an activation dtype; use one of "
                         f"{', '.join(sorted(SPELLINGS))}")
    return SPELLINGS[key]


def np_dtype(dtype) -> np.dtype:
    """The NumPy dtype (bfloat16: ml_dtypes') of an activation dtype given as :func:`name` takes."""
    return _NUMPY[name(dtype)]


def ctype(dtype) -> str:
    """The C++ template argument of an activation dtype: "half" or "__nv_bfloat16"."""
    return CTYPES[name(dtype)]

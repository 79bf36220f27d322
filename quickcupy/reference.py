"""NumPy references (float64 accumulation) for the quantized GEMM."""
from __future__ import annotations

import numpy as np

from .quantize import QuantizedWeight


def reference_gemm(x, q: QuantizedWeight, bias=None) -> np.ndarray:
    """y = x @ dequantize(q).T (+ bias) in float64.

    x: (..., K) array (NumPy, or anything with ``.get()`` such as a CuPy array); returns (..., N) float64.
    """
    if hasattr(x, "get"):
        x = x.get()
    x = np.asarray(x)
    if x.shape[-1] != q.in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last axis, the layer expects {q.in_features}")
    w = q.dequantize(np.float64)                     # (N, K)
    y = x.astype(np.float64) @ w.T
    if bias is not None:
        bias = np.asarray(bias.get() if hasattr(bias, "get") else bias, np.float64)
        if bias.shape != (q.out_features,):
            raise ValueError(f"bias must have shape (out_features,) = ({q.out_features},), got {bias.shape}")
        y = y + bias
    return y


def rel_error(y, ref) -> float:
    """||y - ref|| / ||ref|| in float64 (NaN anywhere gives NaN); ``y`` may be a CuPy array."""
    y = np.asarray(y.get() if hasattr(y, "get") else y, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

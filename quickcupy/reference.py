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
        y = y + np.asarray(bias.get() if hasattr(bias, "get") else bias, np.float64)
    return y

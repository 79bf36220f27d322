"""The Llama layer's small ops as single kernels (cuda/llama_ops.cu), for CuPy float16 or bfloat16
arrays (the instance of the array's dtype runs; the math is float32).

Each op is one launch with no host synchronization and no allocation besides its output, so a decode
step built from them can be captured in a CUDA graph. Positions are read from device memory
(``start``: a (1,) int32 CuPy array), so one captured graph serves every step. The NumPy references
they are tested against are :func:`quickcupy.llama.model.rms_norm`, ``apply_rope`` and ``silu_mul``.
"""
from __future__ import annotations

import numpy as np

from ..dtypes import CTYPES, NAMES
from ..kernels import get_function, launch_kernel
from ..registry import LLAMA_OPS_THREADS


def _fn(a, name: str):
    try:
        ctype = CTYPES[a.dtype.name]       # registry.LLAMA_OPS instantiates each op for each
    except KeyError:
        raise ValueError(f"llama ops take {' or '.join(NAMES)} arrays, got {a.dtype}") from None
    return get_function(a.device.id, "llama_ops.cu", f"{name}<{ctype}>")


def _contiguous(name: str, a):
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def add_rms_norm(x, weight, eps: float, delta=None, out=None):
    """RMSNorm of the rows of x (..., H) float16 or bfloat16 with weight (H,) of x's dtype,
    statistics in float32.

    delta: None, or (..., H) of x's dtype added to x first, in place (x becomes the residual stream
    x + delta, rounded to x's dtype), so the residual add costs no launch of its own.
    Returns out (..., H) of x's dtype (new unless given).
    """
    import cupy
    H = x.shape[-1]
    _contiguous("x", x)
    if weight.shape != (H,) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be ({H},) {x.dtype}, got {weight.shape} {weight.dtype}")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype or not delta.flags.c_contiguous):
        raise ValueError(f"delta must be C-contiguous {x.shape} {x.dtype}, got {delta.shape} {delta.dtype}")
    out = cupy.empty_like(x) if out is None else out
    rows = x.size // H
    launch_kernel(_fn(x, "add_rms_norm"), (rows,), (LLAMA_OPS_THREADS,),
                  (x, np.uint64(0) if delta is None else delta, weight, out, np.int32(H), np.float32(eps)), pdl=True)
    return out


def rope_cache(qkv, cos, sin, start, n_heads: int, n_kv: int, cache_k=None, cache_v=None, out=None):
    """Rotary embedding of the q and k heads of qkv, fused with the KV-cache write.

    qkv: (B, S, n_heads + 2 n_kv, d) float16 or bfloat16, C-contiguous; cos, sin: (positions, d/2) float32 tables
    (:func:`quickcupy.llama.model.rope_tables`); start: (1,) int32 device array, the position of
    token s is start + s. cache_k (B, n_kv, d, max_len) and cache_v (B, n_kv, max_len, d): a layer's
    :class:`KVCache` tensors, written at those positions (both None: no cache). The caller keeps
    start + S within the tables and the cache. Returns the rotated heads (B, S, n_heads + n_kv, d).
    """
    import cupy
    B, S, heads, d = qkv.shape
    _contiguous("qkv", qkv)
    if heads != n_heads + 2 * n_kv or d % 2:
        raise ValueError(f"qkv {qkv.shape} must be (B, S, n_heads + 2 n_kv = {n_heads + 2 * n_kv}, even d)")
    if cos.shape != sin.shape or cos.ndim != 2 or cos.shape[1] != d // 2 or cos.dtype != np.float32:
        raise ValueError(f"cos, sin must be (positions, {d // 2}) float32, got {cos.shape} {cos.dtype}")
    if start.dtype != np.int32 or start.size != 1:
        raise ValueError(f"start must be a (1,) int32 device array, got {start.dtype} of size {start.size}")
    if (cache_k is None) != (cache_v is None):
        raise ValueError("give both cache_k and cache_v, or neither")
    max_len = 0
    if cache_k is not None:
        max_len = cache_k.shape[-1]
        if cache_k.shape != (B, n_kv, d, max_len) or cache_v.shape != (B, n_kv, max_len, d):
            raise ValueError(f"cache_k {cache_k.shape}, cache_v {cache_v.shape} must be (B, n_kv, d, max_len), "
                             f"(B, n_kv, max_len, d) with B={B}, n_kv={n_kv}, d={d}")
        for name, c in (("cache_k", cache_k), ("cache_v", cache_v)):
            _contiguous(name, c)
            if c.dtype != qkv.dtype:
                raise ValueError(f"{name} must be {qkv.dtype}, got {c.dtype}")
    out = cupy.empty((B, S, n_heads + n_kv, d), qkv.dtype) if out is None else out
    null = np.uint64(0)
    pairs = (n_heads + 2 * n_kv) * (d // 2)        # one thread per rotated (or copied) pair of a token
    launch_kernel(_fn(qkv, "rope_cache"), (B * S, -(-pairs // LLAMA_OPS_THREADS)), (LLAMA_OPS_THREADS,),
                  (qkv, cos, sin, start, out, null if cache_k is None else cache_k,
                   null if cache_v is None else cache_v, np.int32(S), np.int32(n_heads),
                   np.int32(n_kv), np.int32(d), np.int32(max_len)), pdl=True)
    return out


def silu_mul(gate_up, out=None):
    """gate_up (..., 2I) float16 or bfloat16 = [gate | up] -> silu(gate) * up (..., I) of its dtype
    (float32 math)."""
    import cupy
    _contiguous("gate_up", gate_up)
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"gate_up's last axis {two_i} must be even (gate | up)")
    out = cupy.empty(gate_up.shape[:-1] + (two_i // 2,), gate_up.dtype) if out is None else out
    rows, I = gate_up.size // two_i, two_i // 2
    if rows:
        launch_kernel(_fn(gate_up, "silu_mul"), (rows, -(-I // LLAMA_OPS_THREADS)), (LLAMA_OPS_THREADS,),
                      (gate_up, out, np.int32(I)), pdl=True)
    return out


def argmax_rows(logits, out=None):
    """logits (rows, V) float16 or bfloat16 -> (rows,) int64: the first index of each row's maximum."""
    import cupy
    _contiguous("logits", logits)
    rows, V = logits.shape
    out = cupy.empty(rows, np.int64) if out is None else out
    if out.shape != (rows,) or out.dtype != np.int64:
        raise ValueError(f"out must be ({rows},) int64, got {out.shape} {out.dtype}")
    launch_kernel(_fn(logits, "argmax_rows"), (rows,), (LLAMA_OPS_THREADS,), (logits, out, np.int32(V)), pdl=True)
    return out


def advance_position(start, step: int = 1):
    """start (1,) int32 device array += step, as a kernel (so that a captured graph moves on)."""
    launch_kernel(get_function(start.device.id, "llama_ops.cu", "advance_position"), (1,), (1,),
                  (start, np.int32(step)), pdl=True)

"""Attention of one decode step as one kernel (cuda/decode_attention.cu): a library kernel that
the Llama model (:mod:`quickcupy.llama.model`) calls for S = 1 with a KV cache on the GPU."""
from __future__ import annotations

import numpy as np

from .kernels import get_function
from .registry import DECODE_ATTENTION_THREADS, DECODE_HEAD_DIMS, DECODE_HEADS_PER_BLOCK


def decode_head_dim_error(d: int):
    """Why :func:`decode_attention` cannot take head_dim ``d`` (None when it can): a warp of the
    kernel spans head_dim, and CI compiles the instances of registry.DECODE_HEAD_DIMS."""
    lo, hi = min(DECODE_HEAD_DIMS), max(DECODE_HEAD_DIMS)
    if d % 32 or not lo <= d <= hi:
        return f"head_dim={d} is not a multiple of 32 between {lo} and {hi}"
    return None


def decode_attention(q, keys, values, length: int, start=None):
    """Attention of one new token per sequence over its first ``length`` cached positions, in one
    kernel (cuda/decode_attention.cu; float32 softmax). CuPy float16 arrays:

    q: (B, n_heads, d); keys (B, n_kv, d, max_len), values (B, n_kv, max_len, d): a layer's
    :class:`KVCache` tensors, C-contiguous, positions >= length not read. d: a multiple of 32 in
    64..256. Returns (B, 1, n_heads * d), as :func:`attention` for S = 1.
    start: None, or a CuPy int32 (1,) array whose value the kernel adds to ``length`` when it runs
    (a CUDA graph's position lives in device memory; the caller keeps length + start <= max_len).
    """
    if q.ndim != 3 or keys.ndim != 4 or values.ndim != 4:
        raise ValueError(f"q, keys, values must be 3-D, 4-D, 4-D, got shapes {q.shape}, {keys.shape}, "
                         f"{values.shape}")
    B, nh, d = q.shape
    nkv, max_len = keys.shape[1], keys.shape[3]
    error = decode_head_dim_error(d)
    if error:
        raise ValueError(f"decode_attention: {error}")
    if keys.shape != (B, nkv, d, max_len) or values.shape != (B, nkv, max_len, d):
        raise ValueError(f"keys {keys.shape} and values {values.shape} must be (B, n_kv, d, max_len) and "
                         f"(B, n_kv, max_len, d) with B={B}, d={d} of q {q.shape}")
    if nh % nkv:
        raise ValueError(f"n_heads={nh} is not a multiple of n_kv={nkv}")
    if not 1 <= length <= max_len:
        raise ValueError(f"length={length} must lie in 1..max_len={max_len}")
    if start is not None and (start.dtype != np.int32 or start.size != 1):
        raise ValueError(f"start must be a (1,) int32 device array, got {start.dtype} of size {start.size}")
    for name, a in (("q", q), ("keys", keys), ("values", values)):
        if a.dtype != np.float16:
            raise ValueError(f"{name} must be float16, got {a.dtype}")
    if not (keys.flags.c_contiguous and values.flags.c_contiguous):
        raise ValueError("keys and values must be C-contiguous (as KVCache allocates them)")
    import cupy
    q = cupy.ascontiguousarray(q)
    heads = next(g for g in DECODE_HEADS_PER_BLOCK if (nh // nkv) % g == 0)   # heads of one KV head per block
    fn = get_function(q.device.id, "decode_attention.cu", f"decode_attention<{d}, {heads}>")
    out = cupy.empty((B, 1, nh * d), np.float16)
    fn((B * nh // heads,), (DECODE_ATTENTION_THREADS,),
       (q, keys, values, out, np.int32(nh), np.int32(nkv), np.int32(max_len), np.int32(length),
        np.uint64(0) if start is None else start))     # 0: a null pointer
    return out

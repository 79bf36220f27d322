"""Attention of one decode step as one kernel (cuda/decode_attention.cu): a library kernel that
the Llama model (:mod:`quickcupy.llama.model`) calls for S = 1 with a KV cache on the GPU, with the
rotary embedding and the cache write of the new token fused in (:func:`decode_attention_rope`),
over all cached positions or a sliding window of them (Mistral); at small batch the cache is split
among several blocks per head (:func:`decode_splits`)."""
from __future__ import annotations

import numpy as np

from .dtypes import NAMES, ctype
from .kernels import device_limits, get_function, launch_kernel, workspace
from .registry import (DECODE_ATTENTION_THREADS, DECODE_HEAD_DIMS, DECODE_HEADS_PER_BLOCK, DECODE_MAX_SPLITS,
                       decode_attention_instance)


def decode_head_dim_error(d: int):
    """Why :func:`decode_attention` cannot take head_dim ``d`` (None when it can): a warp of the
    kernel spans head_dim, and CI compiles the instances of registry.DECODE_HEAD_DIMS."""
    lo, hi = min(DECODE_HEAD_DIMS), max(DECODE_HEAD_DIMS)
    if d % 32 or not lo <= d <= hi:
        return f"head_dim={d} is not a multiple of 32 between {lo} and {hi}"
    return None


def decode_smem_bytes(d: int, heads: int, itemsize: int) -> int:
    """Dynamic shared memory of decode_attention<d, heads, general, T>, laid out as the kernel says: a tile of
    K^T (d x TP) and of V (TP x d) in T, then float32 q (d x heads), probabilities (heads x TP) and
    per-warp maxima (warps x heads); TP = DECODE_ATTENTION_THREADS positions. With split-KV the block
    that combines the splits keeps their maxima and sums in the probabilities' place."""
    tp, warps = DECODE_ATTENTION_THREADS, DECODE_ATTENTION_THREADS // 32
    return 2 * d * tp * itemsize + 4 * (d * heads + heads * tp + warps * heads)


def decode_heads_per_block(n_heads: int, n_kv: int) -> int:
    """Query heads per block of decode_attention: the largest of registry.DECODE_HEADS_PER_BLOCK that
    divides the GQA group n_heads / n_kv (they share one KV head, read once per block)."""
    return next(g for g in DECODE_HEADS_PER_BLOCK if (n_heads // n_kv) % g == 0)


def decode_splits(batch: int, n_heads: int, n_kv: int, max_len: int, sm_count: int) -> int:
    """KV splits per (sequence, head group) of a decode attention launch (the kernel's split-KV,
    cuda/decode_attention.cu), from shapes only. A block per (sequence, head group) walks its tiles
    one after another: at batch 1 that is 32 blocks on a 132-SM H100, each paying a memory latency
    per tile, so the tiles are cut among splits. The rule: 1 (the single pass) when the batch's
    blocks already reach ``sm_count``; else the fewest splits that give every SM a block, with at
    least two 128-position tiles of ``max_len`` per split (on an H100, Llama-2-7B at batch 1 with a
    256-position cache ran its decode step 2.8% slower in two one-tile splits than in one pass: a
    split's fixed cost and the combine outweigh one tile's walk) and at most
    registry.DECODE_MAX_SPLITS. The cache's max_len,
    not its length: a CUDA graph captured once replays at every length, and the kernel cuts the
    tiles the length has among the splits (splits past them attend nothing)."""
    blocks = batch * n_heads // decode_heads_per_block(n_heads, n_kv)
    if blocks >= sm_count:
        return 1
    tiles = -(-max_len // DECODE_ATTENTION_THREADS)
    return max(1, min(-(-sm_count // blocks), tiles // 2, DECODE_MAX_SPLITS))


def decode_attention(q, keys, values, length: int, start=None, window=None, splits=None):
    """Attention of one new token per sequence over its first ``length`` cached positions, in one
    kernel (cuda/decode_attention.cu; float32 softmax). CuPy arrays of one dtype, float16 or bfloat16:

    q: (B, n_heads, d); keys (B, n_kv, d, max_len), values (B, n_kv, max_len, d): a layer's
    :class:`KVCache` tensors, C-contiguous, positions >= length not read. d: a multiple of 32 in
    64..256. Returns (B, 1, n_heads * d), as :func:`attention` for S = 1.
    start: None, or a CuPy int32 (1,) array whose value the kernel adds to ``length`` when it runs
    (a CUDA graph's position lives in device memory; the caller keeps length + start <= max_len).
    window: None (or 0), or W >= 1: a sliding window, only the last W positions are attended
    (length - W .. length - 1; the new token is at length - 1); earlier positions do not affect
    the result (the tile loop starts at most 7 positions before the first and masks them).
    splits: None (:func:`decode_splits` chooses from the shapes and the GPU), or 1..DECODE_MAX_SPLITS
    blocks per (sequence, head group), each attending a contiguous run of tiles, the last to finish
    combining them in split order (deterministic); 1 is the single pass. The split count changes
    the float32 rounding, not the math: calls of equal shapes on one GPU agree bit for bit.
    """
    if q.ndim != 3 or keys.ndim != 4 or values.ndim != 4:
        raise ValueError(f"q, keys, values must be 3-D, 4-D, 4-D, got shapes {q.shape}, {keys.shape}, "
                         f"{values.shape}")
    B, nh, d = q.shape
    _check(keys, values, B, nh, d, length, start, q=q)
    window, splits = _window(window), _splits(splits)
    import cupy
    return _launch(cupy.ascontiguousarray(q), keys, values, nh, length, start, None, None, window, splits)


def decode_attention_rope(qkv, keys, values, cos, sin, n_heads: int, length: int, start=None, window=None,
                          splits=None):
    """One Llama decode step's attention with the rotary embedding and the cache write fused in.

    qkv: (B, n_heads + 2 n_kv, d) (or (B, 1, ..., d)), the unrotated q | k | v projection of the new
    token, whose position is ``length - 1`` (plus ``*start``); cos, sin: (positions, d/2) float32
    tables (:func:`quickcupy.llama.model.rope_tables`) covering it. The kernel rotates q and k as
    :func:`quickcupy.llama.ops.rope_cache` does, writes k and v into ``keys``/``values`` at that
    position, then attends over the first ``length`` positions (the last ``window`` of them with a
    window). With splits, only the split holding that position writes the caches (the same bytes as
    one split). Other arguments and the result as :func:`decode_attention`.
    """
    if qkv.ndim == 4 and qkv.shape[1] == 1:
        qkv = qkv.reshape(qkv.shape[0], qkv.shape[2], qkv.shape[3])
    if qkv.ndim != 3 or keys.ndim != 4 or values.ndim != 4:
        raise ValueError(f"qkv, keys, values must be 3-D (or (B, 1, heads, d)), 4-D, 4-D, got shapes "
                         f"{qkv.shape}, {keys.shape}, {values.shape}")
    B, heads, d = qkv.shape
    nkv = keys.shape[1]
    if heads != n_heads + 2 * nkv:
        raise ValueError(f"qkv has {heads} heads, n_heads + 2 n_kv = {n_heads + 2 * nkv}")
    _check(keys, values, B, n_heads, d, length, start, q=qkv)
    if cos.shape != sin.shape or cos.ndim != 2 or cos.shape[1] != d // 2 or cos.dtype != np.float32:
        raise ValueError(f"cos, sin must be (positions, {d // 2}) float32, got {cos.shape} {cos.dtype}")
    if not (cos.flags.c_contiguous and sin.flags.c_contiguous and qkv.flags.c_contiguous):
        raise ValueError("qkv, cos and sin must be C-contiguous")
    window, splits = _window(window), _splits(splits)
    return _launch(qkv, keys, values, n_heads, length, start, cos, sin, window, splits)


def _window(window) -> int:
    """The kernel's window argument: 0 for none (None or 0), else the positive int W."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window must be None or an int >= 0 (0: none), got {window!r}")
    return min(int(window), 2**31 - 1)


def _splits(splits):
    """The splits argument checked: None (chosen at launch) or an int in 1..DECODE_MAX_SPLITS."""
    if splits is None:
        return None
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or not 1 <= splits <= DECODE_MAX_SPLITS:
        raise ValueError(f"splits must be None or an int in 1..{DECODE_MAX_SPLITS}, got {splits!r}")
    return int(splits)


def _check(keys, values, B, nh, d, length, start, q):
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
    if q.dtype.name not in NAMES:
        raise ValueError(f"q must be {' or '.join(NAMES)}, got {q.dtype}")
    for name, a in (("keys", keys), ("values", values)):
        if a.dtype != q.dtype:
            raise ValueError(f"{name} must be {q.dtype}, got {a.dtype}: q, keys and values share one dtype")
    if not (keys.flags.c_contiguous and values.flags.c_contiguous):
        raise ValueError("keys and values must be C-contiguous (as KVCache allocates them)")


def _launch(q, keys, values, nh, length, start, cos, sin, window, splits):
    import cupy
    B, d = q.shape[0], q.shape[-1]
    nkv, max_len = keys.shape[1], keys.shape[3]
    device_id = q.device.id
    heads = decode_heads_per_block(nh, nkv)
    blocks = B * nh // heads                     # one per (sequence, head group), times the splits
    if splits is None:
        splits = decode_splits(B, nh, nkv, max_len, device_limits(device_id).sm_count)
    smem = decode_smem_bytes(d, heads, q.dtype.itemsize)
    # The instance with split-KV and the window only where they act: a window of max_len or more
    # never excludes a position (length <= max_len), so the single pass serves it too.
    general = splits > 1 or 0 < window < max_len
    fn = get_function(device_id, "decode_attention.cu", decode_attention_instance(d, heads, general, ctype(q.dtype)),
                      smem)
    out = cupy.empty((B, 1, nh * d), q.dtype)
    null = np.uint64(0)
    partial = counters = null
    if splits > 1:     # fp32 partials and arrival counters from the stream's workspace: graph-safe
        ws = workspace(device_id)
        partial = ws.buffer("decode_attention_partials", blocks * splits * heads * (d + 2), np.float32)
        counters = ws.counters(blocks)
    launch_kernel(fn, (blocks, splits), (DECODE_ATTENTION_THREADS,),
                  (q, keys, values, out, np.int32(nh), np.int32(nkv), np.int32(max_len), np.int32(length),
                   np.int32(window), null if start is None else start, null if cos is None else cos,
                   null if sin is None else sin, partial, counters),
                  smem, pdl=True)
    return out

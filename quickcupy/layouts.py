"""The two packed weight layouts: AutoAWQ's checkpoint layout and QUICK's interleaved layout.

Both are index maps written once as NumPy gathers; each unpacker is the exact inverse of its packer.
All packers take a :class:`~quickcupy.quantize.QuantizedWeight` (codes (N, K), zeros and scales
(N, K // G)) and return plain NumPy arrays ready to copy to the GPU.

AWQ ("GEMM" checkpoint format, see docs)::

    qweight (K, N/8) int32    word [k, j]  nibble i = code[n = 8j + AWQ_ORDER[i], k]
    qzeros  (K/G, N/8) int32  the zeros, packed the same way
    scales  (K/G, N) float16

QUICK (interleaved for ``mma.sync.m16n8k16.row.col``; consumed by cuda/quick_gemm.cu)::

    One 32 x 32 (k x n) tile of codes is 512 bytes: 32 lanes x 4 int32 words, so that lane L of a
    warp loads its 16 bytes with one LDG.128 and a warp reads the tile as one contiguous block.
    Lane L = 4*g + t (g = L // 4 is the mma "groupID", t = L % 4 the thread in the group).

        word j of lane L  ->  column  n = 32*tile_n + 8*j + g          (n8 sub-tile j, B column g)
        nibble p of word  ->  row     k = 32*tile_k + 16*s + 8*r + 2*t + e
                              with p = 4*e + 2*s + r  (s: k16 step, r: B register, e: half in it)

        nibbles of one word (low -> high):
            p:  0      1      2      3      4      5      6      7
               s0 b0  s0 b1  s1 b0  s1 b1  s0 b0  s0 b1  s1 b0  s1 b1
               k+0    k+8    k+16   k+24   k+1    k+9    k+17   k+25     (k = 32*tile_k + 2*t)

    The int4->fp16 conversion of cuda/quant_common.cuh turns nibbles (i, i + 4) into half2 i, so
    half2 i = 2*s + r of word j is exactly B register r of k-step s for n8 sub-tile j: after one
    16-byte load and 16 conversions a lane holds its B fragments for 2 k-steps x 4 sub-tiles.
    Tiles are stored n-major, (N/32, K/32, 32, 4), so each warp streams one contiguous run along K.

    scales (N/32, K/G, 8, 4) float16: [tile_n, group, g, j] = scale of column 32*tile_n + 8*j + g,
        so lane L loads its four sub-tile scales as one 8-byte vector.
    qzeros (N/32, K/G, 4) int32 = (N/32, K/G, 8) uint16 words, one per g: nibble j of halfword g
        is the zero of column 32*tile_n + 8*j + g; lane L loads 2 bytes.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .quantize import QuantizedWeight

AWQ_PACK = 8                                  # codes per int32 in the AWQ layout
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble i holds column AWQ_ORDER[i] of its 8

QUICK_TILE_K = 32      # k rows of one 512-byte tile (2 mma k-steps of 16)
QUICK_TILE_N = 32      # n columns of one tile (4 mma n8 sub-tiles)
QUICK_WORDS = 4        # int32 words per lane per tile (one 16-byte load)
WARP = 32


class PackedWeight(NamedTuple):
    """Packed tensors of one layer: ``qweight`` int32, ``qzeros`` int32, ``scales`` float16."""
    qweight: np.ndarray
    qzeros: np.ndarray
    scales: np.ndarray


def packed_shapes(layout: str, K: int, N: int, group_size: int) -> PackedWeight:
    """The shapes of (qweight, qzeros, scales) of a (K, N) layer with ``group_size`` (effective)
    in ``layout`` ("awq" or "quick"), as :func:`pack_awq` / :func:`pack_quick` write them."""
    G = K // group_size
    if layout == "awq":
        return PackedWeight((K, N // AWQ_PACK), (G, N // AWQ_PACK), (G, N))
    if layout == "quick":
        tn = N // QUICK_TILE_N
        return PackedWeight((tn, K // QUICK_TILE_K, WARP, QUICK_WORDS), (tn, G, 4), (tn, G, 8, 4))
    raise ValueError(f"layout={layout!r} is unknown; use 'awq' or 'quick'")


# ----------------------------------------------------------------------------------------- helpers
def _nibbles_to_int32(nibbles: np.ndarray) -> np.ndarray:
    """(..., 8) codes 0..15 -> (...) int32 with nibble i = nibbles[..., i]."""
    words = np.zeros(nibbles.shape[:-1], np.uint32)
    for i in range(8):
        words |= nibbles[..., i].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def _int32_to_nibbles(words: np.ndarray) -> np.ndarray:
    """(...) int32 -> (..., 8) uint8 nibbles, low to high."""
    w = np.ascontiguousarray(words).view(np.uint32)[..., None]
    return ((w >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).astype(np.uint8)


def _check_int32(name: str, arr, ndim: int):
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}"
                        + ("; call .get() on a CuPy array first" if hasattr(arr, "get") else ""))
    if arr.dtype not in (np.int32, np.uint32):
        raise TypeError(f"{name} must be int32, got {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")


def _check_scales(scales, shape):
    if not isinstance(scales, np.ndarray) or scales.dtype != np.float16:
        raise TypeError(f"scales must be a float16 numpy.ndarray, got "
                        f"{getattr(scales, 'dtype', type(scales).__name__)}")
    if scales.shape != shape:
        raise ValueError(f"scales has shape {scales.shape}, expected {shape} from qweight and qzeros")


def _group_size(K: int, n_groups: int, group_size) -> int:
    if n_groups == 0 or K % n_groups:
        raise ValueError(f"in_features={K} is not a multiple of the {n_groups} groups of qzeros/scales")
    G = K // n_groups
    if group_size is not None and group_size not in (G, -1 if n_groups == 1 else None):
        raise ValueError(f"group_size={group_size} disagrees with the tensors: K={K} in {n_groups} groups")
    return G


# -------------------------------------------------------------------------------------------- AWQ
def _awq_pack(values: np.ndarray) -> np.ndarray:
    """(N, R) codes in weight orientation -> (R, N/8) int32: word [r, j] nibble i = values[8j + AWQ_ORDER[i], r]."""
    N, R = values.shape
    v = values.reshape(N // AWQ_PACK, AWQ_PACK, R)
    words = np.zeros((N // AWQ_PACK, R), np.uint32)
    for i, column in enumerate(AWQ_ORDER):
        words |= v[:, column, :].astype(np.uint32) << np.uint32(4 * i)
    return np.ascontiguousarray(words.T).view(np.int32)


def _awq_unpack(words: np.ndarray) -> np.ndarray:
    """(R, N/8) int32 -> (N, R) uint8 codes; inverse of :func:`_awq_pack`."""
    R, J = words.shape
    w = np.ascontiguousarray(words.T).view(np.uint32)           # (N/8, R)
    out = np.empty((J, AWQ_PACK, R), np.uint8)
    for i, column in enumerate(AWQ_ORDER):
        out[:, column, :] = (w >> np.uint32(4 * i)) & np.uint32(0xF)
    return out.reshape(J * AWQ_PACK, R)


def _check_quantized(q):
    if not isinstance(q, QuantizedWeight):
        raise TypeError(f"q must be a QuantizedWeight (from quickcupy.quantize or unpack_*), got "
                        f"{type(q).__name__}")


def pack_awq(q: QuantizedWeight) -> PackedWeight:
    """AutoAWQ GEMM checkpoint tensors: qweight (K, N/8) int32, qzeros (K/G, N/8) int32, scales (K/G, N) fp16."""
    _check_quantized(q)
    N = q.out_features
    if N % AWQ_PACK:
        raise ValueError(f"out_features={N} is not a multiple of {AWQ_PACK} (the AWQ layout packs 8 columns per int32)")
    return PackedWeight(qweight=_awq_pack(q.codes), qzeros=_awq_pack(q.zeros),
                        scales=np.ascontiguousarray(q.scales.T))


def unpack_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size=None) -> QuantizedWeight:
    """Inverse of :func:`pack_awq`: the three tensors of an AutoAWQ checkpoint -> QuantizedWeight."""
    _check_int32("qweight", qweight, 2)
    _check_int32("qzeros", qzeros, 2)
    K, J = qweight.shape
    n_groups = qzeros.shape[0]
    if qzeros.shape[1] != J:
        raise ValueError(f"qzeros has {qzeros.shape[1]} packed columns but qweight has {J}")
    _check_scales(scales, (n_groups, J * AWQ_PACK))
    G = _group_size(K, n_groups, group_size)
    return QuantizedWeight(codes=_awq_unpack(qweight), zeros=_awq_unpack(qzeros),
                           scales=np.ascontiguousarray(scales.T), group_size=G)


# ------------------------------------------------------------------------------------------ QUICK
def _quick_weight_index(K: int, N: int):
    """Index maps of the QUICK qweight layout: arrays (k, n) of shape (N/32, K/32, 32, 4, 8).

    Element [tile_n, tile_k, lane, word, nibble] of the packed nibbles holds code (k, n).
    """
    tn, tk, lane, j, p = np.meshgrid(np.arange(N // QUICK_TILE_N), np.arange(K // QUICK_TILE_K),
                                     np.arange(WARP), np.arange(QUICK_WORDS), np.arange(8),
                                     indexing="ij", sparse=True)
    g, t = lane // 4, lane % 4
    e, s, r = p // 4, (p // 2) % 2, p % 2
    k = QUICK_TILE_K * tk + 16 * s + 8 * r + 2 * t + e
    n = QUICK_TILE_N * tn + 8 * j + g
    return k, n


def _quick_group_index(n_groups: int, N: int):
    """Index maps of the QUICK scales/zeros layout: (group, n) of shape (N/32, n_groups, 8, 4)."""
    tn, grp, g, j = np.meshgrid(np.arange(N // QUICK_TILE_N), np.arange(n_groups), np.arange(8),
                                np.arange(4), indexing="ij")
    return grp, QUICK_TILE_N * tn + 8 * j + g


def check_quick_shape(K: int, N: int):
    if N % QUICK_TILE_N:
        raise ValueError(f"out_features={N} is not a multiple of {QUICK_TILE_N} (the QUICK layout's tile width)")
    if K % QUICK_TILE_K:
        raise ValueError(f"in_features={K} is not a multiple of {QUICK_TILE_K} (the QUICK layout's tile depth)")


def pack_quick(q: QuantizedWeight) -> PackedWeight:
    """QUICK interleaved tensors (see module docstring): qweight (N/32, K/32, 32, 4) int32,
    qzeros (N/32, K/G, 4) int32, scales (N/32, K/G, 8, 4) float16."""
    _check_quantized(q)
    N, K = q.out_features, q.in_features
    check_quick_shape(K, N)
    k, n = _quick_weight_index(K, N)
    qweight = _nibbles_to_int32(q.codes[n, k])
    grp, n_g = _quick_group_index(q.n_groups, N)
    zeros = q.zeros[n_g, grp].astype(np.uint16)                       # (N/32, G', 8, 4)
    halfwords = (zeros << (4 * np.arange(4, dtype=np.uint16))).sum(axis=-1, dtype=np.uint16)
    qzeros = np.ascontiguousarray(halfwords).view(np.int32)           # (N/32, G', 4)
    scales = np.ascontiguousarray(q.scales[n_g, grp])
    return PackedWeight(qweight=qweight, qzeros=qzeros, scales=scales)


def unpack_quick(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size=None) -> QuantizedWeight:
    """Inverse of :func:`pack_quick`."""
    _check_int32("qweight", qweight, 4)
    _check_int32("qzeros", qzeros, 3)
    tiles_n, tiles_k, lanes, words = qweight.shape
    if (lanes, words) != (WARP, QUICK_WORDS):
        raise ValueError(f"qweight must have shape (N/32, K/32, 32, 4), got {qweight.shape}")
    N, K = tiles_n * QUICK_TILE_N, tiles_k * QUICK_TILE_K
    n_groups = qzeros.shape[1]
    if qzeros.shape != (tiles_n, n_groups, 4):
        raise ValueError(f"qzeros has shape {qzeros.shape}, expected ({tiles_n}, K/G, 4) from qweight")
    _check_scales(scales, (tiles_n, n_groups, 8, 4))
    G = _group_size(K, n_groups, group_size)

    k, n = _quick_weight_index(K, N)
    codes = np.empty((N, K), np.uint8)
    codes[n, k] = _int32_to_nibbles(qweight)
    grp, n_g = _quick_group_index(n_groups, N)
    halfwords = np.ascontiguousarray(qzeros).view(np.uint16)[..., None]  # (N/32, G', 8, 1)
    zero_nibbles = (halfwords >> (4 * np.arange(4, dtype=np.uint16))) & 0xF
    zeros = np.empty((N, n_groups), np.uint8)
    zeros[n_g, grp] = zero_nibbles
    scales_nk = np.empty((N, n_groups), np.float16)
    scales_nk[n_g, grp] = scales
    return QuantizedWeight(codes=codes, zeros=zeros, scales=scales_nk, group_size=G)

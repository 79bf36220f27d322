"""compressed-tensors W4A16 "pack-quantized" checkpoints (llm-compressor, vLLM), read into a QuantizedWeight.

Tensors of one linear layer, K = in_features, N = out_features, G = group_size::

    weight_packed     (N, ceil(K/8)) int32   packed along K: word [n, j] nibble i = code[n, 8j + i]
    weight_scale      (N, K/G) group strategy, (N, 1) channel strategy; float16, bfloat16 or float32
    weight_zero_point (ceil(N/8), K/G) int32 packed along N: word [j, g] nibble i = zero code of
                      row 8j + i (asymmetric only; absent when symmetric, the default)
    weight_shape      (2,) int: [N, K]
    weight_g_idx      (K,) int32 group of input feature k (optional, act-order; see .act_order)

The quantized values are signed 4-bit integers q in -8..7 (and zero points z in -8..7), and
``W = (q - z) * scale``. Packing stores each as the unsigned nibble ``q + 8`` (``z + 8``), low
nibble first. So a nibble is exactly our unsigned ``code`` and ``zero``: W = (code - zero) * scale,
with zero = 8 for symmetric layers. Scales become float16; a bfloat16/float32 scale that float16
cannot hold exactly is refused rather than rounded.
"""
from __future__ import annotations

import numpy as np

from ..layouts import _check_int32, _int32_to_nibbles
from ..quantize import QuantizedWeight
from .act_order import perm_from_g_idx

PACK = 8                 # 4-bit values per int32
SYMMETRIC_ZERO = 8       # the unsigned nibble of the signed zero point 0


def _scales_to_float16(weight_scale, N: int) -> np.ndarray:
    if not isinstance(weight_scale, np.ndarray):
        raise TypeError(f"weight_scale must be a numpy.ndarray, got {type(weight_scale).__name__}")
    if weight_scale.dtype not in (np.float16, np.float32) and weight_scale.dtype.name != "bfloat16":
        raise TypeError(f"weight_scale must be float16, bfloat16 or float32, got {weight_scale.dtype}")
    if weight_scale.ndim != 2 or weight_scale.shape[0] != N:
        raise ValueError(f"weight_scale must be (out_features, groups) = ({N}, K/G) for the group and "
                         f"channel strategies, got shape {weight_scale.shape}")
    s32 = weight_scale.astype(np.float32)
    with np.errstate(over="ignore"):
        s16 = s32.astype(np.float16)
    inexact = s16.astype(np.float32) != s32
    if inexact.any():
        n, g = (int(i) for i in np.argwhere(inexact)[0])
        raise ValueError(f"weight_scale[{n}, {g}] = {s32[n, g]} is not exactly representable in float16, "
                         f"which the kernels use")
    return s16


def unpack_compressed_tensors(weight_packed, weight_scale, weight_shape=None, weight_zero_point=None,
                              weight_g_idx=None):
    """A pack-quantized 4-bit layer's tensors (NumPy) -> (QuantizedWeight, perm).

    weight_shape defaults to (N, 8 * packed columns). perm: None, or (K,) int64 for act-order,
    such that the layer computes ``x[..., perm] @ q.dequantize().T``.
    """
    _check_int32("weight_packed", weight_packed, 2)
    N, J = weight_packed.shape
    if weight_shape is None:
        weight_shape = (N, J * PACK)
    shape = tuple(int(v) for v in np.asarray(weight_shape).reshape(-1))
    if len(shape) != 2 or shape[0] != N or -(-shape[1] // PACK) != J:
        raise ValueError(f"weight_shape={list(shape)} does not match weight_packed {weight_packed.shape}: "
                         f"expected [{N}, K] with ceil(K/8) = {J}")
    K = shape[1]
    scales = _scales_to_float16(weight_scale, N)
    n_groups = scales.shape[1]
    if n_groups == 0 or K % n_groups:
        raise ValueError(f"in_features={K} is not a multiple of the {n_groups} groups of weight_scale "
                         f"(a tensor-wide scale is not supported)")
    codes = _int32_to_nibbles(weight_packed).reshape(N, J * PACK)[:, :K]
    if weight_zero_point is None:
        zeros = np.full((N, n_groups), SYMMETRIC_ZERO, np.uint8)
    else:
        _check_int32("weight_zero_point", weight_zero_point, 2)
        if weight_zero_point.shape != (-(-N // PACK), n_groups):
            raise ValueError(f"weight_zero_point must be packed along out_features: shape "
                             f"(ceil(N/8), K/G) = ({-(-N // PACK)}, {n_groups}), got {weight_zero_point.shape}")
        # (N/8, G', 8) -> (N/8, 8, G') -> (N, G'): row 8j + i is nibble i of row j
        zeros = _int32_to_nibbles(weight_zero_point).transpose(0, 2, 1).reshape(-1, n_groups)[:N]
    perm = perm_from_g_idx(weight_g_idx, K, n_groups)
    if perm is not None:
        codes = codes[:, perm]
    q = QuantizedWeight(codes=np.ascontiguousarray(codes), zeros=np.ascontiguousarray(zeros),
                        scales=scales, group_size=K // n_groups)
    return q, perm

"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers, 4 bits), read into a QuantizedWeight.

Tensors of one linear layer, K = in_features, N = out_features, G = group_size (K for "-1")::

    qweight (K/8, N) int32    packed along K: word [i, n] nibble j (bits 4j..4j+3) = code[k = 8i + j, n]
    qzeros  (K/G, N/8) int32  packed along N: word [g, c] nibble j = stored zero of column 8c + j
    scales  (K/G, N) float16
    g_idx   (K,) int32        group of input feature k (optional; act-order when not k // G)

    W[n, k] = (code[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]

Zeros: the classic format (AutoGPTQ, ``checkpoint_format="gptq"``, what most published checkpoints
are; GPTQModel calls it v1) stores ``zero - 1`` and every reader adds the 1 back, so a stored nibble
15 means zero 16, which 4 bits cannot hold (and a zero of 0 could not be stored): that is refused
here. GPTQModel's ``"gptq_v2"`` stores the zero itself. Symmetric quantization (``sym=True``) has
zero 8 everywhere (stored as 7 in v1); it needs no special case since qzeros are always stored.

Act-order (``desc_act=True``): see :mod:`.act_order`; the codes come back permuted along K and the
permutation is returned beside them.
"""
from __future__ import annotations

import numpy as np

from ..layouts import _check_int32, _check_scales, _int32_to_nibbles
from ..quantize import MAX_CODE, QuantizedWeight
from .act_order import perm_from_g_idx

PACK = 8                                 # 4-bit codes per int32
FORMATS = ("gptq", "gptq_v2")            # config "checkpoint_format": zero stored minus one / as is


def unpack_gptq(qweight, qzeros, scales, g_idx=None, *, checkpoint_format: str = "gptq"):
    """A GPTQ layer's tensors (NumPy) -> (QuantizedWeight, perm).

    perm: None, or (K,) int64 for act-order, such that the layer computes
    ``x[..., perm] @ q.dequantize().T``; the codes are stored in that order.
    """
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} must be one of {FORMATS} "
                         f"(quantize_config's checkpoint_format; 'gptq' when absent)")
    _check_int32("qweight", qweight, 2)
    _check_int32("qzeros", qzeros, 2)
    K8, N = qweight.shape
    n_groups, N8 = qzeros.shape
    if N8 * PACK != N:
        raise ValueError(f"qzeros has {N8} packed columns ({N8 * PACK} outputs) but qweight has N={N}; "
                         f"qzeros must be (K/G, N/8)")
    _check_scales(scales, (n_groups, N))
    K = K8 * PACK
    if n_groups == 0 or K % n_groups:
        raise ValueError(f"in_features={K} (from qweight) is not a multiple of the {n_groups} groups of "
                         f"qzeros/scales")
    # (K/8, N, 8) nibbles -> (K/8, 8, N) -> (K, N): row 8i + j is nibble j of row i
    codes = _int32_to_nibbles(qweight).transpose(0, 2, 1).reshape(K, N).T
    zeros = _int32_to_nibbles(qzeros).reshape(n_groups, N).T.astype(np.int16)
    if checkpoint_format == "gptq":
        zeros += 1
        if zeros.max() > MAX_CODE:
            n, g = (int(i) for i in np.argwhere(zeros > MAX_CODE)[0])
            raise ValueError(f"qzeros holds a stored 15 (zero 16 in the v1 'gptq' format) at out_feature "
                             f"{n}, group {g}: not a 4-bit zero; if the checkpoint is GPTQModel's v2, "
                             f"pass checkpoint_format='gptq_v2'")
    perm = perm_from_g_idx(g_idx, K, n_groups)
    if perm is not None:
        codes = codes[:, perm]
    q = QuantizedWeight(codes=np.ascontiguousarray(codes), zeros=np.ascontiguousarray(zeros.astype(np.uint8)),
                        scales=np.ascontiguousarray(scales.T), group_size=K // n_groups)
    return q, perm

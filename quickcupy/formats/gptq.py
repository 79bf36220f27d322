"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers, 4 bits), read into a QuantizedWeight.

Tensors of one linear layer, K = in_features, N = out_features, G = group_size (K for "-1")::

    qweight (K/8, N) int32    packed along K: word [i, n] nibble j (bits 4j..4j+3) = code[k = 8i + j, n]
    qzeros  (K/G, N/8) int32  packed along N: word [g, c] nibble j = stored zero of column 8c + j
    scales  (K/G, N) float16  (a checkpoint's bfloat16/float32 taken when float16 holds it exactly)
    g_idx   (K,) int32        group of input feature k (optional; act-order when not k // G)

    W[n, k] = (code[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]

Zeros: the classic format (``checkpoint_format="gptq"``, what most published checkpoints are;
GPTQModel calls it v1) stores zero - 1, subtracted from each packed word as a whole::

    qzeros word = (sum_j zero[8c + j] * 16**j) - 0x11111111   mod 2**32

GPTQModel writes v1 so (it packs the zeros, then ``qzeros -= 0x11111111`` on int32 words) and reads
it back with ``+= 0x11111111``; a zero of 0 stores nibble 15 and borrows one from the nibble above.
This reader does the same: adding 0x11111111 to each word modulo 2**32, then unpacking, gives back
every zero 0..15 exactly, and any word decodes to 8 zeros in 0..15, so nothing is refused. Readers
that add 1 per nibble after unpacking (AutoGPTQ's, exllama's, vLLM's ``gptq_gemm``) agree on every
word without a zero of 0 (symmetric layers always) and differ on the others, where they read a
stored 15 as zero 16 and the nibble that lent it as one less. AutoGPTQ's packer subtracts 1 per
zero before packing: a zero of 0 becomes -1, cast to uint32 (0xFFFFFFFF on x86) and OR-ed in, which
sets its nibble and every higher one of the word to 15, so those zeros are lost when written,
whatever reads them. GPTQModel's ``"gptq_v2"`` stores the zero itself. Symmetric quantization
(``sym=True``) has zero 8 everywhere (stored as 7 in v1); it needs no special case since qzeros are
always stored.

Act-order (``desc_act=True``): see :mod:`.act_order`; the codes come back permuted along K and the
permutation is returned beside them.
"""
from __future__ import annotations

import numpy as np

from ..layouts import _check_int32, _check_scales, _int32_to_nibbles
from ..quantize import QuantizedWeight
from .act_order import perm_from_g_idx
from .scheme import (DEFAULT_GROUP_SIZE, FLOAT, INT32, INTEGER, Scheme, TensorSpec, check_bits, check_group_size,
                     n_groups, to_float16_exact)

PACK = 8                                 # 4-bit codes per int32
FORMATS = ("gptq", "gptq_v2")            # config "checkpoint_format": zero stored minus one / as is
V1_ZERO_OFFSET = 0x11111111              # one in each nibble: v1 subtracts it from every qzeros word


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
    words = np.ascontiguousarray(qzeros).view(np.uint32)
    if checkpoint_format == "gptq":
        words = words + np.uint32(V1_ZERO_OFFSET)   # uint32 wraps: undoes the writer's borrows exactly
    zeros = _int32_to_nibbles(words).reshape(n_groups, N).T
    perm = perm_from_g_idx(g_idx, K, n_groups)
    if perm is not None:
        codes = codes[:, perm]
    q = QuantizedWeight(codes=np.ascontiguousarray(codes), zeros=np.ascontiguousarray(zeros),
                        scales=np.ascontiguousarray(scales.T), group_size=K // n_groups)
    return q, perm


def check_config(qc: dict, in_features=()) -> Scheme:
    """quantization_config of a GPTQ checkpoint -> Scheme; ValueError naming the setting otherwise."""
    check_bits(qc.get("bits"), "quantization_config.bits")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise ValueError(f"quantization_config.checkpoint_format={fmt!r} is not supported; one of {FORMATS}")
    if qc.get("is_marlin_format"):
        raise ValueError("quantization_config.is_marlin_format=true is not supported: Marlin-repacked "
                         "GPTQ tensors are not the GPTQ layout")
    G = check_group_size(qc.get("group_size", DEFAULT_GROUP_SIZE), "quantization_config.group_size", in_features)
    return Scheme("gptq", fmt, G, True, qc)


def tensor_specs(scheme: Scheme, N: int, K: int) -> dict:
    """Tensor name suffix -> TensorSpec of a (N, K) layer."""
    g, n8 = n_groups(scheme.group_size, K), -(-N // PACK)
    return {"qweight": TensorSpec(INT32, (-(-K // PACK), N), "(K/8, N)"),
            "qzeros": TensorSpec(INT32, None if g is None else (g, n8), "(K/G, N/8)"),
            "scales": TensorSpec(FLOAT, None if g is None else (g, N), "(K/G, N)"),
            "g_idx": TensorSpec(INTEGER, (K,), "(K,)", required=False)}


def read(scheme: Scheme, get):
    """(QuantizedWeight, perm) from ``get(suffix, required=True)``, one of the layer's tensors."""
    return unpack_gptq(get("qweight"), get("qzeros"), to_float16_exact("scales", get("scales")),
                       get("g_idx", required=False), checkpoint_format=scheme.variant)

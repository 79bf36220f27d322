"""AutoAWQ "GEMM" checkpoints (AutoAWQ, transformers' AwqConfig), read into a QuantizedWeight.

Tensors of one linear layer, K = in_features, N = out_features, G = group_size (K for "-1")::

    qweight (K, N/8) int32    packed along N: nibble i of word [k, j] = code[k, n = 8j + AWQ_ORDER[i]]
    qzeros  (K/G, N/8) int32  the zeros, packed the same way
    scales  (K/G, N) float16

    W[n, k] = (code[k, n] - zero[k // G, n]) * scales[k // G, n]

The packing is also a kernel layout (the ``awq`` kernel reads it as stored), so its index map and
unpacker live in :mod:`quickcupy.layouts` (``AWQ_ORDER``, :func:`~quickcupy.layouts.unpack_awq`);
this module holds what belongs to the checkpoint: quantization_config's rules (4 bits, version
"gemm", zero points) and the tensors' names and shapes. bfloat16/float32 scales are taken when
float16 holds them exactly.
"""
from __future__ import annotations

from ..layouts import unpack_awq
from .scheme import (DEFAULT_GROUP_SIZE, FLOAT, INT32, Scheme, TensorSpec, check_bits, check_group_size,
                     n_groups, to_float16_exact)

PACK = 8                 # codes per int32
VERSIONS = ("gemm",)     # "gemv" and "marlin" pack differently


def check_config(qc: dict, in_features=()) -> Scheme:
    """quantization_config of an AWQ checkpoint (AutoAWQ's older ``w_bit`` / ``q_group_size`` names
    too) -> Scheme; ValueError naming the setting otherwise."""
    check_bits(qc.get("bits", qc.get("w_bit")), "quantization_config.bits")
    version = str(qc.get("version", "gemm")).lower()
    if version not in VERSIONS:
        raise ValueError(f"quantization_config.version={qc.get('version')!r} is not supported; "
                         f"only the 'gemm' packing loads")
    if qc.get("zero_point", True) is not True:
        raise ValueError(f"quantization_config.zero_point={qc.get('zero_point')!r} is not supported; "
                         f"AWQ's zero points are assumed")
    key = "group_size" if "group_size" in qc or "q_group_size" not in qc else "q_group_size"
    G = check_group_size(qc.get(key, DEFAULT_GROUP_SIZE), f"quantization_config.{key}", in_features)
    return Scheme("awq", version, G, True, qc)


def tensor_specs(scheme: Scheme, N: int, K: int) -> dict:
    """Tensor name suffix -> TensorSpec of a (N, K) layer."""
    g, n8 = n_groups(scheme.group_size, K), -(-N // PACK)
    return {"qweight": TensorSpec(INT32, (K, n8), "(K, N/8)"),
            "qzeros": TensorSpec(INT32, None if g is None else (g, n8), "(K/G, N/8)"),
            "scales": TensorSpec(FLOAT, None if g is None else (g, N), "(K/G, N)")}


def read(scheme: Scheme, get):
    """(QuantizedWeight, None) from ``get(suffix)``, which returns one of the layer's tensors."""
    return unpack_awq(get("qweight"), get("qzeros"), to_float16_exact("scales", get("scales"))), None

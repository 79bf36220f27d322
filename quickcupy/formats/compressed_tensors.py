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
from .scheme import FLOAT, INT32, INTEGER, Scheme, TensorSpec, check_group_size, n_groups, to_float16_exact

PACK = 8                 # 4-bit values per int32
SYMMETRIC_ZERO = 8       # the unsigned nibble of the signed zero point 0
FORMAT = "pack-quantized"
STRATEGIES = ("group", "channel")


def _scales_to_float16(weight_scale, N: int) -> np.ndarray:
    s16 = to_float16_exact("weight_scale", weight_scale)
    if s16.ndim != 2 or s16.shape[0] != N:
        raise ValueError(f"weight_scale must be (out_features, groups) = ({N}, K/G) for the group and "
                         f"channel strategies, got shape {s16.shape}")
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


def check_config(qc: dict, in_features=()) -> Scheme:
    """quantization_config of a compressed-tensors checkpoint: one config group of 4-bit int weights,
    pack-quantized, group or channel strategy, activations and KV cache left unquantized -> Scheme;
    ValueError naming the setting otherwise."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError("quantization_config.config_groups must hold exactly one group (one scheme for "
                         f"every quantized layer), got {None if groups is None else len(groups)}")
    name, group = next(iter(groups.items()))
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(group, dict):
        raise ValueError(f"{where} must be an object, got {type(group).__name__}")
    fmt, key = (group["format"], f"{where}.format") if group.get("format") else (qc.get("format"), "quantization_config.format")
    if fmt != FORMAT:
        raise ValueError(f"{key}={fmt!r} is not supported; only {FORMAT!r} (W4A16) loads")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"quantization_config.quantization_status={status!r} is not supported; only "
                         f"'compressed' (packed) checkpoints load")
    args = group.get("weights") or {}
    if args.get("num_bits") != 4 or args.get("type", "int") != "int":
        raise ValueError(f"{where}.weights num_bits={args.get('num_bits')!r} type={args.get('type')!r}: "
                         f"only 4-bit int weights load")
    strategy = args.get("strategy")
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}.weights strategy={strategy!r}: only 'group' and 'channel' load")
    for key in ("input_activations", "output_activations"):
        if group.get(key):
            raise ValueError(f"{where}.{key} is set: activations are quantized; only weight-only (W4A16) loads")
    if qc.get("kv_cache_scheme"):
        raise ValueError("quantization_config.kv_cache_scheme is set: quantized KV caches are not supported")
    if strategy == "channel":
        G = check_group_size(-1, f"{where}.weights.group_size", in_features)
    else:
        G = check_group_size(args.get("group_size"), f"{where}.weights.group_size", in_features)
    return Scheme("compressed-tensors", FORMAT, G, not args.get("symmetric", True), qc)


def tensor_specs(scheme: Scheme, N: int, K: int) -> dict:
    """Tensor name suffix -> TensorSpec of a (N, K) layer."""
    g = n_groups(scheme.group_size, K)
    return {"weight_packed": TensorSpec(INT32, (N, -(-K // PACK)), "(N, K/8)"),
            "weight_scale": TensorSpec(FLOAT, None if g is None else (N, g), "(N, K/G)"),
            "weight_shape": TensorSpec(INTEGER, (2,), "[N, K]"),
            "weight_zero_point": TensorSpec(INT32, None if g is None else (-(-N // PACK), g), "(N/8, K/G)",
                                            required=scheme.zero_points),
            "weight_g_idx": TensorSpec(INTEGER, (K,), "(K,)", required=False)}


def read(scheme: Scheme, get):
    """(QuantizedWeight, perm) from ``get(suffix, required=True)``, one of the layer's tensors."""
    return unpack_compressed_tensors(get("weight_packed"), get("weight_scale"), get("weight_shape"),
                                     get("weight_zero_point", required=scheme.zero_points),
                                     get("weight_g_idx", required=False))

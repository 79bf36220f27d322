"""One layer of a Hugging Face checkpoint, whatever its 4-bit format, from config.json's
``quantization_config``: the hook a model loader (e.g. :mod:`quickcupy.llama.checkpoint`) calls per
linear layer instead of naming one format.

    quant_method "awq"                 prefix.{qweight, qzeros, scales}            (quickcupy.layouts)
    quant_method "gptq"                prefix.{qweight, qzeros, scales[, g_idx]}   (.gptq)
    quant_method "compressed-tensors"  prefix.{weight_packed, weight_scale, weight_shape
                                       [, weight_zero_point, weight_g_idx]}         (.compressed_tensors)
"""
from __future__ import annotations

from ..layouts import unpack_awq
from .compressed_tensors import unpack_compressed_tensors
from .gptq import FORMATS, unpack_gptq

METHODS = ("awq", "gptq", "compressed-tensors")


def _weight_args(qc: dict) -> dict:
    """compressed-tensors: the weights' QuantizationArgs of the one config group (pack-quantized)."""
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError("quantization_config.config_groups must hold exactly one group (one scheme for "
                         f"every quantized layer), got {None if groups is None else len(groups)}")
    group = next(iter(groups.values()))
    fmt = group.get("format", fmt)
    if fmt != "pack-quantized":
        raise ValueError(f"compressed-tensors format={fmt!r} is not supported; only 'pack-quantized' (W4A16) loads")
    args = group.get("weights") or {}
    if args.get("num_bits") != 4 or args.get("type", "int") != "int":
        raise ValueError(f"compressed-tensors weights num_bits={args.get('num_bits')!r} "
                         f"type={args.get('type')!r}: only 4-bit int weights load")
    if args.get("strategy") not in ("group", "channel"):
        raise ValueError(f"compressed-tensors weights strategy={args.get('strategy')!r}: only 'group' and "
                         f"'channel' load")
    if group.get("input_activations"):
        raise ValueError("compressed-tensors input_activations are quantized: only weight-only (W4A16) loads")
    return args


def read_layer(quantization_config: dict, tensors, prefix: str):
    """(QuantizedWeight, perm) of the linear layer ``prefix`` (e.g. "model.layers.0.mlp.down_proj").

    quantization_config: config.json's object. tensors: a mapping name -> NumPy array holding at
    least this layer's tensors. perm: None, or the (K,) act-order permutation (see .act_order).
    ValueError naming the setting or the tensor when the format or a tensor is not supported.
    """
    qc = quantization_config
    if not isinstance(qc, dict):
        raise ValueError("quantization_config must be config.json's object (a dict)")
    method = str(qc.get("quant_method", "")).lower()
    if method not in METHODS:
        raise ValueError(f"quantization_config.quant_method={qc.get('quant_method')!r} is not supported; "
                         f"one of {METHODS}")

    def get(name, required=True):
        key = f"{prefix}.{name}"
        if key not in tensors:
            if required:
                raise ValueError(f"{key} is missing from the checkpoint")
            return None
        return tensors[key]

    if method == "compressed-tensors":
        args = _weight_args(qc)
        q, perm = unpack_compressed_tensors(get("weight_packed"), get("weight_scale"), get("weight_shape"),
                                            get("weight_zero_point", required=False),
                                            get("weight_g_idx", required=False))
        expected = args.get("group_size") if args["strategy"] == "group" else -1
    else:
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise ValueError(f"quantization_config.bits={bits!r} is not supported; only 4-bit checkpoints load")
        expected = qc.get("group_size", qc.get("q_group_size"))
        if method == "awq":
            q, perm = unpack_awq(get("qweight"), get("qzeros"), get("scales")), None
        else:
            fmt = qc.get("checkpoint_format", "gptq")
            if fmt not in FORMATS:
                raise ValueError(f"quantization_config.checkpoint_format={fmt!r} is not supported; one of {FORMATS}")
            q, perm = unpack_gptq(get("qweight"), get("qzeros"), get("scales"), get("g_idx", required=False),
                                  checkpoint_format=fmt)
    if expected is not None and expected != q.group_size and not (expected == -1 and q.n_groups == 1):
        raise ValueError(f"{prefix}: the tensors have group_size={q.group_size}, quantization_config says "
                         f"{expected}")
    return q, perm

"""One layer of a Hugging Face checkpoint, whatever its 4-bit format, from config.json's
``quantization_config``: the hooks a model loader (e.g. :mod:`quickcupy.llama.checkpoint`) calls
instead of naming one format. First :func:`check_quantization_config` (once), then per layer
:func:`layer_tensors` against the safetensors headers (nothing read yet), then :func:`read_layer`.

    quant_method "awq"                 prefix.{qweight, qzeros, scales}            (.awq)
    quant_method "gptq"                prefix.{qweight, qzeros, scales[, g_idx]}   (.gptq)
    quant_method "compressed-tensors"  prefix.{weight_packed, weight_scale, weight_shape
                                       [, weight_zero_point, weight_g_idx]}         (.compressed_tensors)

Each format's module holds its own rules (``check_config``), tensor shapes (``tensor_specs``) and
reader (``read``); this module picks the module by ``quant_method``.
"""
from __future__ import annotations

from . import awq, compressed_tensors, gptq
from .scheme import Scheme

READERS = {"awq": awq, "gptq": gptq, "compressed-tensors": compressed_tensors}
METHODS = tuple(READERS)


class MissingTensor(ValueError):
    """A tensor the format needs is not in the checkpoint (the message names it)."""


def check_quantization_config(quantization_config, in_features=()) -> Scheme:
    """config.json's ``quantization_config`` checked before any weight is read -> :class:`Scheme`.

    in_features: the K of every layer to be read; the group size must suit each (a multiple of 32
    dividing K, or -1: :func:`quickcupy.quantize.effective_group_size`). ValueError naming the
    setting and the rule: an unknown quant_method, bits other than 4, a group size the kernels
    refuse, an unknown GPTQ checkpoint_format, compressed-tensors other than pack-quantized W4A16,
    an AWQ version other than "gemm", ...
    """
    qc = quantization_config
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be config.json's object (a dict), got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    if method not in READERS:
        raise ValueError(f"quantization_config.quant_method={qc.get('quant_method')!r} is not supported; "
                         f"one of {METHODS}")
    return READERS[method].check_config(qc, in_features)


def layer_tensors(scheme: Scheme, prefix: str, out_features: int, in_features: int) -> dict:
    """Name -> :class:`~quickcupy.formats.scheme.TensorSpec` of the tensors of the (N, K) layer
    ``prefix`` in ``scheme``'s format, to check against the headers with
    :func:`~quickcupy.formats.scheme.check_tensors` before reading."""
    specs = READERS[scheme.method].tensor_specs(scheme, int(out_features), int(in_features))
    return {f"{prefix}.{suffix}": spec for suffix, spec in specs.items()}


def read_layer(quantization_config, tensors, prefix: str):
    """(QuantizedWeight, perm) of the linear layer ``prefix`` (e.g. "model.layers.0.mlp.down_proj").

    quantization_config: config.json's object, or the :class:`Scheme` checked from it. tensors: a
    mapping name -> NumPy array holding at least this layer's tensors (e.g. a lazy
    ``TensorStore``: only this layer's are read). perm: None, or the (K,) act-order permutation
    (see .act_order). ValueError naming the setting or the tensor when either is not supported.
    """
    scheme = (quantization_config if isinstance(quantization_config, Scheme)
              else check_quantization_config(quantization_config))

    def get(name, required=True):
        key = f"{prefix}.{name}"
        if key not in tensors:
            if required:
                raise MissingTensor(f"{key} is missing from the checkpoint")
            return None
        return tensors[key]

    try:
        q, perm = READERS[scheme.method].read(scheme, get)
    except MissingTensor:
        raise
    except (TypeError, ValueError) as exc:       # a wrong dtype too: every refusal here is a ValueError
        raise ValueError(f"{prefix}: {exc}") from exc
    expected = scheme.group_size
    if expected != q.group_size and not (expected == -1 and q.n_groups == 1):
        raise ValueError(f"{prefix}: the tensors have group_size={q.group_size}, quantization_config says "
                         f"{expected}")
    return q, perm

"""Readers of 4-bit checkpoint formats: AutoAWQ's GEMM (.awq; its packing is also a kernel layout,
unpacked by :mod:`quickcupy.layouts`), GPTQ (.gptq) and compressed-tensors pack-quantized
(.compressed_tensors).

Each reader turns a layer's checkpoint tensors (NumPy arrays) into a
:class:`~quickcupy.quantize.QuantizedWeight` plus ``perm``, the input-feature permutation of an
act-order checkpoint (None without one): the layer computes ``x[..., perm] @ W_hat.T``, so the
kernels never see ``g_idx``. ``QuantLinear.from_awq`` / ``from_gptq`` / ``from_compressed_tensors``
pack the result. From config.json's ``quantization_config`` (.config):
:func:`check_quantization_config` checks it once, :func:`layer_tensors` + :func:`check_tensors` check
a layer's tensors against the safetensors headers, :func:`read_layer` reads the layer.
"""
from .act_order import perm_from_g_idx
from .compressed_tensors import unpack_compressed_tensors
from .config import METHODS, check_quantization_config, layer_tensors, read_layer
from .gptq import unpack_gptq
from .scheme import Scheme, TensorSpec, check_tensors

__all__ = ["perm_from_g_idx", "unpack_gptq", "unpack_compressed_tensors", "METHODS", "check_quantization_config",
           "layer_tensors", "check_tensors", "read_layer", "Scheme", "TensorSpec"]

"""Readers of 4-bit checkpoint formats other than AutoAWQ's (that one lives in :mod:`quickcupy.layouts`).

Each reader turns a layer's checkpoint tensors (NumPy arrays) into a
:class:`~quickcupy.quantize.QuantizedWeight` plus ``perm``, the input-feature permutation of an
act-order checkpoint (None without one): the layer computes ``x[..., perm] @ W_hat.T``, so the
kernels never see ``g_idx``. ``QuantLinear.from_gptq`` / ``from_compressed_tensors`` pack the result;
:func:`read_layer` picks the reader from config.json's ``quantization_config``.
"""
from .act_order import perm_from_g_idx
from .compressed_tensors import unpack_compressed_tensors
from .config import read_layer
from .gptq import unpack_gptq

__all__ = ["perm_from_g_idx", "unpack_gptq", "unpack_compressed_tensors", "read_layer"]

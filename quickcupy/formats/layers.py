"""Which tensors of a checkpoint are 4-bit linear layers, from their names alone (no framework).

Each format marks a quantized linear layer ``prefix`` by one tensor (:data:`MARKERS`): AutoAWQ and
GPTQ by ``prefix.qweight``, compressed-tensors by ``prefix.weight_packed``. Every ``prefix.<part>``
tensor (qzeros, scales, g_idx, weight_scale, ..., bias) belongs to that layer, which
:func:`quickcupy.formats.read_layer` reads; the other tensors (embeddings, norms, a float lm_head,
layers left unquantized) load as they are.
"""
from __future__ import annotations

# The tensor whose presence makes ``prefix`` a 4-bit layer -> the quant_methods that write it.
MARKERS = {"qweight": ("awq", "gptq"), "weight_packed": ("compressed-tensors",)}


def quantized_prefixes(names) -> list:
    """The prefixes ``p`` with a ``p.qweight`` or ``p.weight_packed`` among ``names`` (tensor
    names, e.g. a :class:`~quickcupy.llama.checkpoint.TensorStore`), in the order of ``names``."""
    found = {}
    for name in names:
        prefix, _, part = name.rpartition(".")
        if prefix and part in MARKERS:
            found[prefix] = None
    return list(found)


def split_names(names) -> tuple:
    """(prefixes of 4-bit layers, names of every other tensor). A tensor ``p.part`` (``part``
    without a dot) of a quantized prefix ``p`` belongs to that layer, whatever ``part`` is."""
    names = list(names)
    prefixes = quantized_prefixes(names)
    quantized = set(prefixes)
    plain = [name for name in names if name.rpartition(".")[0] not in quantized]
    return prefixes, plain


__all__ = ["MARKERS", "quantized_prefixes", "split_names"]

"""quickcupy: CuPy kernels for 4-bit weight-only quantized GEMM (QUICK interleaved layout vs AWQ).

The library: :mod:`.quantize` (AutoAWQ's rule), :mod:`.layouts` (AWQ and QUICK packing),
:mod:`.dtypes` (activation dtypes), :mod:`.registry` (every kernel design), :mod:`.kernels` (loader,
plans, launch, workspaces), :mod:`.dispatch` (``kernel="auto"``), :mod:`.gemm` (:class:`QuantLinear`,
:func:`gemm`), :mod:`.formats` (checkpoint readers), :mod:`.attention`, :mod:`.reference`; the Llama
model in :mod:`.llama`; the bank-conflict model in :mod:`.analysis`; the command-line tools in
:mod:`.tools`; ``torch.nn.Module`` layers and transformers models in :mod:`.torch`, which only its
users import (the package never imports torch). Experiments live outside the package, in the
repository's ``dev/``.
"""
__version__ = "0.2.0"

from .quantize import QuantizedWeight, effective_group_size, quantize
from .layouts import PackedWeight, pack_awq, pack_quick, unpack_awq, unpack_quick
from .reference import reference_gemm, rel_error
from .gemm import KERNELS, QuantLinear, gemm
from ._cupy import warn_if_two_wheels

warn_if_two_wheels()   # once per process (none of the above imports cupy): with two CuPy wheels it is undefined

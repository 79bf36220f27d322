"""quickcupy: CuPy kernels for 4-bit weight-only quantized GEMM (QUICK interleaved layout vs AWQ)."""
__version__ = "0.1.0"

from .quantize import QuantizedWeight, quantize
from .layouts import PackedWeight, pack_awq, pack_quick, unpack_awq, unpack_quick
from .reference import reference_gemm
from .gemm import KERNELS, QuantLinear, gemm

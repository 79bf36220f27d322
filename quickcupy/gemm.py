"""The array-level API: :class:`QuantLinear` (one layer's packed weights on the GPU) and :func:`gemm`.

Every rule is checked here, in Python, before any launch: a wrong dtype, shape, alignment, device
or layout raises a ``TypeError``/``ValueError`` that names the argument.
"""
from __future__ import annotations

import functools
import sys

import numpy as np

from . import dispatch, dtypes, formats, kernels, registry
from ._cupy import import_cupy
from .dtypes import NAMES
from .layouts import pack_awq, pack_quick, packed_shapes, unpack_awq
from .quantize import QuantizedWeight, quantize

LAYOUTS = registry.LAYOUTS
# Kernel name -> description, for users and the tools (records in quickcupy.registry).
KERNELS = {name: v.description for name, v in registry.VARIANTS.items()}


def kernel_layout(kernel) -> str:
    """The weight layout a kernel (name or registry record) reads ("quick" or "awq")."""
    return registry.variant(kernel).layout


def check_layer_shape(layout: str, in_features: int, out_features: int):
    """Raises ValueError when a (K, N) layer cannot run in ``layout``."""
    k_mult, n_mult = registry.layout_rules(layout)
    if out_features % n_mult:
        raise ValueError(f"out_features={out_features} is not a multiple of {n_mult}, "
                         f"which the {layout} kernel needs")
    if in_features % k_mult:
        raise ValueError(f"in_features={in_features} is not a multiple of {k_mult}, which both kernels need")


class QuantLinear:
    """One linear layer y = x @ W.T (+ bias) with 4-bit weights resident on the current GPU.

    Attributes: ``layout`` ("quick" or "awq"), ``in_features`` K, ``out_features`` N,
    ``group_size`` G, ``qweight``/``qzeros``/``scales`` (CuPy arrays in that layout),
    ``bias`` (CuPy (N,) float16, or bfloat16 when given so; None), ``device`` (CuPy device id),
    ``perm`` (CuPy int64 (K,) or None: act-order checkpoints compute ``x[..., perm] @ W.T``, see
    :mod:`quickcupy.formats`).
    Build with :meth:`from_quantized`, :meth:`from_awq`, :meth:`from_gptq`,
    :meth:`from_compressed_tensors` or :meth:`from_float`.

    Activation dtypes: one layer serves float16 and bfloat16 ``x`` alike (the output and the bias
    used take x's dtype). ``scales`` stay float16 for both: the kernels widen them to fp32 exactly
    and, for bf16, split each into two bf16 parts so that (code - zero) * scale is rounded once to
    bf16 (cuda/quant_common.cuh); a bfloat16 checkpoint's scales are converted to float16 at load,
    which is exact in float16's normal range and refused otherwise (:mod:`quickcupy.formats`). The
    bias is kept in the dtype it came in (bfloat16, else float16) and converted once to the other
    dtype on first use (:meth:`bias_as`).
    """

    def __init__(self, qweight, qzeros, scales, *, layout: str, in_features: int, out_features: int,
                 group_size: int, bias=None, perm=None):
        """From tensors already packed in ``layout`` (:func:`quickcupy.layouts.packed_shapes`),
        NumPy (copied to the current GPU) or CuPy (on the current GPU, used as they are); most
        callers want :meth:`from_quantized` or a checkpoint reader instead."""
        cupy = import_cupy()               # without CuPy: an ImportError naming the extra to install
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is unknown; use one of {LAYOUTS}")
        check_layer_shape(layout, in_features, out_features)
        kernels.require_gpu()
        if group_size < 32 or in_features % group_size:
            raise ValueError(f"group_size={group_size} must divide in_features={in_features}")
        expected = packed_shapes(layout, in_features, out_features, group_size)
        self.device = cupy.cuda.Device().id
        for name, arr, shape, dtype in zip(expected._fields, (qweight, qzeros, scales), expected,
                                           (np.int32, np.int32, np.float16)):
            if tuple(arr.shape) != shape or arr.dtype != dtype:
                raise ValueError(f"{name} must be {np.dtype(dtype).name} of shape {shape} for a {layout} "
                                 f"layer of in_features={in_features}, out_features={out_features}, "
                                 f"group_size={group_size}; got {arr.dtype} {tuple(arr.shape)}")
            if isinstance(arr, cupy.ndarray) and arr.device.id != self.device:
                raise ValueError(f"{name} is on device {arr.device.id}, not the current device {self.device}")
        self.layout = layout
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.qweight, self.qzeros, self.scales = (cupy.ascontiguousarray(cupy.asarray(t))
                                                  for t in (qweight, qzeros, scales))
        self.bias = None
        if bias is not None:
            bias = bias.get() if hasattr(bias, "get") else np.asarray(bias)
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape (out_features,) = ({self.out_features},), got {bias.shape}")
            if not np.isfinite(bias.astype(np.float32)).all():
                raise ValueError("bias has NaN or inf values")
            keep = bias.dtype if bias.dtype.name == "bfloat16" else np.float16
            self.bias = cupy.asarray(bias.astype(keep))
        self._bias_as = {}
        self.perm = None
        if perm is not None:
            perm = perm.get() if hasattr(perm, "get") else np.asarray(perm)
            if perm.shape != (self.in_features,) or perm.dtype.kind not in "iu" or not np.array_equal(
                    np.sort(perm), np.arange(self.in_features)):
                raise ValueError(f"perm must be a permutation of range(in_features={self.in_features}), "
                                 f"got shape {perm.shape} {perm.dtype}")
            self.perm = cupy.asarray(perm.astype(np.int64))
        # the kernel a call without kernel= runs: auto for the layout auto chooses in, else the layout's own
        self.default_kernel = registry.variant("auto" if layout == dispatch.LAYOUT else layout)

    @classmethod
    def from_packed(cls, qweight, qzeros, scales, *, layout: str, in_features: int, out_features: int,
                    group_size: int, bias=None, perm=None) -> "QuantLinear":
        """From tensors already packed in ``layout`` (see :meth:`__init__`)."""
        return cls(qweight, qzeros, scales, layout=layout, in_features=in_features,
                   out_features=out_features, group_size=group_size, bias=bias, perm=perm)

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, layout: str = "quick", bias=None, perm=None) -> "QuantLinear":
        """Packs ``q`` in ``layout`` ("quick" or "awq") and copies it to the current GPU."""
        if not isinstance(q, QuantizedWeight):
            raise TypeError(f"q must be a QuantizedWeight, got {type(q).__name__}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is unknown; use one of {LAYOUTS}")
        check_layer_shape(layout, q.in_features, q.out_features)
        packed = pack_quick(q) if layout == "quick" else pack_awq(q)
        return cls.from_packed(*packed, layout=layout, in_features=q.in_features, out_features=q.out_features,
                               group_size=q.group_size, bias=bias, perm=perm)

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, bias=None, layout: str = "quick", group_size=None) -> "QuantLinear":
        """From the three tensors of an AutoAWQ checkpoint (NumPy or CuPy): qweight (K, N/8) int32,
        qzeros (K/G, N/8) int32, scales (K/G, N) float16."""
        host = [t.get() if hasattr(t, "get") else t for t in (qweight, qzeros, scales)]
        return cls.from_quantized(unpack_awq(*host, group_size=group_size), layout, bias)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, bias=None, layout: str = "quick",
                  checkpoint_format: str = "gptq") -> "QuantLinear":
        """From a GPTQ layer (NumPy or CuPy): qweight (K/8, N) int32, qzeros (K/G, N/8) int32,
        scales (K/G, N) float16, optional g_idx (K,) int32 (act-order: K is permuted once, here).
        checkpoint_format: "gptq" (zeros stored minus one, AutoGPTQ) or "gptq_v2" (GPTQModel);
        see :mod:`quickcupy.formats.gptq`."""
        host = [t.get() if hasattr(t, "get") else t for t in (qweight, qzeros, scales, g_idx)]
        q, perm = formats.unpack_gptq(*host, checkpoint_format=checkpoint_format)
        return cls.from_quantized(q, layout, bias, perm)

    @classmethod
    def from_compressed_tensors(cls, weight_packed, weight_scale, weight_shape=None, weight_zero_point=None,
                                weight_g_idx=None, bias=None, layout: str = "quick") -> "QuantLinear":
        """From a compressed-tensors W4A16 pack-quantized layer (NumPy or CuPy): weight_packed
        (N, K/8) int32, weight_scale (N, K/G) or (N, 1), optional weight_shape [N, K],
        weight_zero_point (N/8, K/G) int32 and weight_g_idx (K,); see
        :mod:`quickcupy.formats.compressed_tensors`."""
        host = [t.get() if hasattr(t, "get") else t
                for t in (weight_packed, weight_scale, weight_shape, weight_zero_point, weight_g_idx)]
        q, perm = formats.unpack_compressed_tensors(*host)
        return cls.from_quantized(q, layout, bias, perm)

    @classmethod
    def from_float(cls, weight, group_size: int = 128, layout: str = "quick", bias=None) -> "QuantLinear":
        """Quantizes a float16, bfloat16 or float32 weight (out_features, in_features), NumPy or CuPy,
        on the way (see :func:`quantize` for what each dtype gives)."""
        if hasattr(weight, "get"):
            weight = weight.get()
        return cls.from_quantized(quantize(weight, group_size), layout, bias)

    def copy(self) -> "QuantLinear":
        """A second layer with its own device buffers (e.g. to rotate weights in benchmarks)."""
        return self.from_packed(self.qweight.copy(), self.qzeros.copy(), self.scales.copy(), layout=self.layout,
                                in_features=self.in_features, out_features=self.out_features,
                                group_size=self.group_size, bias=self.bias, perm=self.perm)

    def bias_as(self, dtype):
        """The bias (N,) as ``dtype`` (x's: float16 or bfloat16), converted once and kept; None
        without a bias."""
        if self.bias is None or self.bias.dtype == dtype:
            return self.bias
        if dtype not in self._bias_as:
            self._bias_as[dtype] = self.bias.astype(dtype)
        return self._bias_as[dtype]

    @property
    def nbytes(self) -> int:
        return int(self.qweight.nbytes + self.qzeros.nbytes + self.scales.nbytes)

    def __call__(self, x, out=None, kernel=None, stream=None):
        return gemm(x, self, kernel=kernel, out=out, stream=stream)

    def __repr__(self):
        return (f"QuantLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, layout={self.layout!r}, bias={self.bias is not None})")


def _as_cupy(arg, name: str):
    """``arg`` as a CuPy array sharing its memory, and the caller's ``from_dlpack`` (None for a CuPy
    array) to hand a result back in the caller's array type.

    Foreign GPU arrays come in zero-copy through DLPack (PyTorch, JAX; made ready on the current
    stream by the protocol) or ``__cuda_array_interface__`` (Numba, ...). The way back is the
    ``from_dlpack`` of the array's top-level module if that module is already imported (``torch``),
    so no framework is ever imported here; otherwise results stay CuPy arrays.
    """
    import cupy
    if isinstance(arg, cupy.ndarray):
        return arg, None
    if isinstance(arg, np.ndarray):
        raise TypeError(f"{name} is a NumPy array; move it to the GPU first with cupy.asarray({name})")
    if hasattr(arg, "__dlpack__") and hasattr(arg, "__dlpack_device__"):
        device_type = int(arg.__dlpack_device__()[0])
        if device_type not in (2, 13):                  # kDLCUDA, kDLCUDAManaged
            raise TypeError(f"{name} is not in CUDA memory (DLPack device type {device_type}); move it "
                            f"to the GPU first")
        module = sys.modules.get(type(arg).__module__.split(".")[0])
        try:
            arr = cupy.from_dlpack(arg)
        except Exception as exc:          # e.g. a dtype CuPy has no type for; the export's own error type
            raise TypeError(f"{name} could not be read through DLPack: {type(exc).__name__}: {exc}") from exc
        return arr, getattr(module, "from_dlpack", None)
    if hasattr(arg, "__cuda_array_interface__"):
        return cupy.asarray(arg), None
    raise TypeError(f"{name} must be a GPU array (cupy.ndarray, or any array with DLPack or "
                    f"__cuda_array_interface__ such as a CUDA torch.Tensor), got {type(arg).__name__}")


class _StreamHandle:
    """A raw ``cudaStream_t`` in the CUDA stream protocol, which ``cupy.cuda.Stream.from_external`` takes."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def _as_stream(stream, device: int):
    """The CuPy stream to launch on: None (the current stream), a CuPy Stream, a raw
    ``cudaStream_t`` handle (int) or an object with one in ``.cuda_stream`` (``torch.cuda.Stream``)."""
    import cupy
    if stream is None:
        return None
    if isinstance(stream, cupy.cuda.stream._BaseStream):
        if stream.device_id not in (-1, device):
            raise ValueError(f"stream belongs to device {stream.device_id} but the layer's weights are on "
                             f"device {device}")
        return stream
    handle = getattr(stream, "cuda_stream", stream)
    if isinstance(handle, bool) or not isinstance(handle, (int, np.integer)) or handle < 0:
        raise TypeError(f"stream must be a cupy.cuda.Stream, a cudaStream_t handle (int >= 0) "
                        f"or have one in .cuda_stream, got {type(stream).__name__}")
    return _external_stream(int(handle))


@functools.lru_cache(maxsize=256)
def _external_stream(handle: int):
    """A CuPy stream wrapping a raw ``cudaStream_t``, made once per handle: the wrapper owns
    nothing, and CUDA reuses a handle only for a stream created after the old one's work is done."""
    import cupy
    return cupy.cuda.Stream.from_external(_StreamHandle(handle))


def _caller_stream(x, device: int):
    """The stream of the framework ``x`` comes from, when it has a current stream of its own that
    CuPy does not know: torch's (so that ``torch.cuda.graph`` and torch's stream order hold without
    ``stream=``); None for CuPy and other arrays (the current CuPy stream)."""
    module = type(x).__module__.split(".")[0]
    if module != "torch" or "torch" not in sys.modules:
        return None
    return _as_stream(sys.modules["torch"].cuda.current_stream(device), device)


def _check_x(x, layer: QuantLinear, parts: int = 1):
    """x checked as gemm's input: (..., parts * K) (parts 2: silu_mul's gate | up)."""
    import cupy
    if isinstance(x, np.ndarray):
        raise TypeError("x is a NumPy array; move it to the GPU first with cupy.asarray(x)")
    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"x must be a cupy.ndarray, got {type(x).__name__}")
    if x.dtype.name not in NAMES:
        raise TypeError(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != parts * layer.in_features:
        what = f" (silu_mul: gate | up, twice in_features {layer.in_features})" if parts == 2 else ""
        raise ValueError(f"x must have shape (..., {parts * layer.in_features}){what}, got {x.shape}")
    if x.size == 0:
        raise ValueError(f"x has no rows (shape {x.shape}); M must be at least 1")
    if not x.flags.c_contiguous:
        raise ValueError("x must be C-contiguous; call cupy.ascontiguousarray(x)")
    if x.data.ptr % 16:
        raise ValueError("x must be 16-byte aligned (its data pointer is not); copy it")
    if x.device.id != layer.device:
        raise ValueError(f"x is on device {x.device.id} but the layer's weights are on device {layer.device}")


def _check_out(out, shape, x, layer):
    import cupy
    if not isinstance(out, cupy.ndarray):
        raise TypeError(f"out must be a cupy.ndarray, got {type(out).__name__}")
    if out.dtype != x.dtype:
        raise TypeError(f"out must have x's dtype {x.dtype}, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    _check_placement(out, "out", layer)
    lo, hi = out.data.ptr, out.data.ptr + out.nbytes
    if lo < x.data.ptr + x.nbytes and x.data.ptr < hi:
        raise ValueError("out overlaps x; use a separate buffer")


def _check_placement(a, name: str, layer):
    """A CuPy operand the kernels read or write in 16-byte vectors: C-contiguous, 16-byte aligned,
    on the layer's device (ValueError naming ``name`` otherwise)."""
    if not a.flags.c_contiguous or a.data.ptr % 16:
        raise ValueError(f"{name} must be C-contiguous and 16-byte aligned")
    if a.device.id != layer.device:
        raise ValueError(f"{name} is on device {a.device.id} but the layer's weights are on device {layer.device}")


def _overlaps(a, b) -> bool:
    """Whether the memory of CuPy arrays ``a`` and ``b`` overlaps."""
    return a.data.ptr < b.data.ptr + b.nbytes and b.data.ptr < a.data.ptr + a.nbytes


def _check_norm(norm, x, layer, out):
    """(weight, eps) of gemm's ``norm``, checked: weight (K,) of x's dtype, C-contiguous, 16-byte
    aligned, on the layer's device, not overlapping ``out``; eps a finite real >= 0."""
    if not isinstance(norm, (tuple, list)) or len(norm) != 2:
        raise TypeError(f"norm must be (weight, eps), got {type(norm).__name__}")
    weight, eps = norm
    weight, _ = _as_cupy(weight, "norm weight")
    K = layer.in_features
    if weight.dtype != x.dtype or weight.shape != (K,):
        raise ValueError(f"norm weight must be ({K},) {x.dtype} (in_features, x's dtype), got {weight.shape} "
                         f"{weight.dtype}")
    _check_placement(weight, "norm weight", layer)
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.integer, np.floating)) \
            or not np.isfinite(eps) or eps < 0:
        raise ValueError(f"norm eps must be a finite number >= 0, got {eps!r}")
    if _overlaps(weight, out):
        raise ValueError("out overlaps the norm weight; use a separate buffer")
    return weight, float(eps)


def _check_residual(residual, out, layer):
    """gemm's ``residual`` as a CuPy array, checked: ``out``'s shape and dtype, C-contiguous, 16-byte
    aligned, on the layer's device; ``out`` itself (in place) or not overlapping it."""
    residual, _ = _as_cupy(residual, "residual")
    if residual.dtype != out.dtype or residual.shape != out.shape:
        raise ValueError(f"residual must be {out.shape} {out.dtype} (the output's shape, x's dtype), got "
                         f"{residual.shape} {residual.dtype}")
    _check_placement(residual, "residual", layer)
    if residual.data.ptr != out.data.ptr and _overlaps(residual, out):
        raise ValueError("out overlaps residual without being it; pass residual itself as out (in place) or a "
                         "separate buffer")
    return residual


def gemm(x, layer: QuantLinear, kernel=None, out=None, *, stream=None, tile_m=None, split_k=None, norm=None,
         residual=None, silu_mul=False):
    """y = x @ W.T (+ bias) with the 4-bit weights of ``layer``; with ``norm``, RMSNorm(x) takes
    x's place, with ``silu_mul``, silu(gate) * up of x = [gate | up]; with ``residual``, r + y is
    returned.

    x: float16 or bfloat16 (..., K), C-contiguous, on the layer's device; any number of rows M >= 1
    (bfloat16 CuPy arrays need ml_dtypes, which CuPy uses for the dtype). A CuPy
    array or any GPU array with DLPack or ``__cuda_array_interface__`` (a CUDA torch.Tensor, a JAX
    array), used without a copy.
    kernel: a name of :data:`KERNELS` (or its registry record); must read the layer's layout.
    Default: "auto" for the quick layout (the fastest kernel for M on this GPU, see
    :mod:`quickcupy.dispatch`), "awq" for awq.
    out: optional (..., N) GPU array of x's dtype (CuPy or foreign, as x) to write into; it is returned.
    stream: where to launch (see :func:`_as_stream`); default the current CuPy stream, or torch's
    current stream when x is a torch tensor.
    ``tile_m``/``split_k`` override the launch plan (tuning, tests).
    norm: None, or (weight, eps), weight (K,) of x's dtype (an array as x), eps a finite number >= 0:
    the GEMM's input is each row of x normalized, T(T(x * inv_rms) * weight) with inv_rms = 1 /
    sqrt(mean(x^2) + eps) in float32 (the math of :func:`quickcupy.llama.ops.add_rms_norm`), T x's
    dtype; x itself is not changed (an act-order layer gathers the normed row).
    silu_mul: x is (..., 2K), [gate | up] (a Llama MLP's gate|up output), and the GEMM's input is
    T(silu(gate) * up) (the math of :func:`quickcupy.llama.ops.silu_mul`, bit for bit, fused or
    not). Not with ``norm``.
    residual: None, or r (..., N) of x's dtype, C-contiguous (an array as x): the result is
    T(r + T(x @ W.T + bias)), the GEMM's output as without it, then the sum rounded once; ``out``
    may be r itself (an in-place residual add), else it must not overlap r.
    Where the kernel that runs has them in its own launch (:func:`fused`: quick_decode's register
    pipeline all three, its ring the residual), they cost no launch; otherwise gemm composes them:
    ``add_rms_norm`` or ``silu_mul`` into a scratch buffer before the GEMM, an elementwise add after
    it. A fused residual or SiLU * up equals the composed one bit for bit; a fused norm sums the
    squares in another order than add_rms_norm, so its inputs may differ from the composed ones in
    the last bit.
    Returns (..., N) of x's dtype: ``out`` if given, else a new array of x's type when x came through
    DLPack from an imported module with ``from_dlpack`` (torch), else a CuPy array.

    Under CUDA-graph capture (CuPy's or torch's), every buffer the call uses lives as long as a
    graph can replay it (:func:`quickcupy.kernels.workspace`), and ``auto`` never picks the cuBLAS
    path, which CuPy cannot capture.
    """
    cupy = import_cupy()
    if not isinstance(layer, QuantLinear):
        raise TypeError(f"layer must be a QuantLinear, got {type(layer).__name__}")
    if cupy.cuda.runtime.getDevice() != layer.device:
        with cupy.cuda.Device(layer.device):
            return gemm(x, layer, kernel, out, stream=stream, tile_m=tile_m, split_k=split_k, norm=norm,
                        residual=residual, silu_mul=silu_mul)
    stream = _as_stream(stream, layer.device) if stream is not None else _caller_stream(x, layer.device)
    if stream is not None:
        with stream:
            return _gemm(x, layer, kernel, out, tile_m, split_k, norm, residual, silu_mul)
    return _gemm(x, layer, kernel, out, tile_m, split_k, norm, residual, silu_mul)


def _launch_choice(v: registry.Variant, layer: QuantLinear, M: int, dtype: str, tile_m, split_k, prologue: int,
                   epilogue: bool):
    """(variant, plan) of a gemm call of M rows of ``dtype`` with kernel ``v`` (auto: its choice for M,
    under the current stream's capture state); the plan None for the dequant path. ``prologue``
    (0, registry.PRO_NORM, PRO_SILU_MUL) / ``epilogue``: the norm or SiLU * up / residual asked for
    (the plan says which its kernel fuses)."""
    N, K = layer.out_features, layer.in_features
    if v.path == "auto":
        if tile_m is not None or split_k is not None:
            raise ValueError("tile_m/split_k choose one kernel's launch; name that kernel instead of 'auto'")
        v = dispatch.kernel_for(M, N, K, layer.device, dtype, capturable=kernels.capturing())
    else:
        reason = kernels.unsupported_reason(v, layer.device)
        if reason is not None:
            raise ValueError(reason)
        v.design.check_dtype(dtype)
    if v.path == "dequant":
        if tile_m is not None or split_k is not None:
            raise ValueError(f"tile_m/split_k choose a GEMM kernel's launch; kernel={v.name!r} runs cuBLAS")
        if kernels.capturing():
            raise ValueError(f"kernel={v.name!r} runs cuBLAS, which CuPy cannot capture in a CUDA graph; "
                             f"name another kernel or use 'auto'")
        return v, None
    # act-order gathers x after the prologue's op: a prologue, which reads x as it is, does not fuse
    return v, _plan(v, M, N, K, layer.group_size, layer.device, tile_m, split_k, dtype,
                    prologue if layer.perm is None else 0, epilogue)


def fused(layer: QuantLinear, M: int, dtype="float16", kernel=None, *, norm: bool = False,
          residual: bool = False, silu_mul: bool = False) -> tuple:
    """(prologue, residual): whether a :func:`gemm` call on ``layer`` of M rows of ``dtype``
    ("float16" or "bfloat16") with ``kernel`` (None: the layer's default), given ``norm`` or
    ``silu_mul`` (the prologue) and/or ``residual`` as these flags say, runs each of them inside its
    GEMM launch (False: gemm composes it, or it was not asked for). For the current device and the
    current stream's capture state (under capture, auto may choose another kernel)."""
    p = launch_plan(layer, M, dtype, kernel, norm=norm, residual=residual, silu_mul=silu_mul)
    return (False, False) if p is None else (bool(p.prologue), p.epilogue)


def launch_plan(layer: QuantLinear, M: int, dtype="float16", kernel=None, *, norm: bool = False,
                residual: bool = False, silu_mul: bool = False):
    """The :class:`quickcupy.kernels.LaunchPlan` that call (the arguments as :func:`fused`'s) runs, or
    None for the dequant path (cuBLAS); e.g. :func:`quickcupy.kernels.takes_pdl` of it."""
    import cupy
    v = layer.default_kernel if kernel is None else registry.variant(kernel)
    if cupy.cuda.runtime.getDevice() != layer.device:
        with cupy.cuda.Device(layer.device):
            return launch_plan(layer, M, dtype, v, norm=norm, residual=residual, silu_mul=silu_mul)
    return _launch_choice(v, layer, M, dtypes.name(dtype), None, None, _prologue(norm, silu_mul), residual)[1]


def _prologue(norm: bool, silu_mul: bool) -> int:
    """quick_decode's prologue code (registry.PRO_*) of gemm's ``norm`` / ``silu_mul`` flags."""
    if norm and silu_mul:
        raise ValueError("norm and silu_mul cannot both be given: a GEMM's input is RMSNorm(x) or "
                         "silu(gate) * up, not both")
    return registry.PRO_NORM if norm else registry.PRO_SILU_MUL if silu_mul else 0


def _gemm(x, layer: QuantLinear, kernel, out, tile_m, split_k, norm=None, residual=None, silu_mul=False):
    """gemm on the layer's device and the chosen (current) stream."""
    import cupy
    x, to_caller = _as_cupy(x, "x")
    caller_out = out
    v = layer.default_kernel if kernel is None else registry.variant(kernel)   # the one name lookup
    if v.layout != layer.layout:
        raise ValueError(f"kernel={v.name!r} reads the {v.layout} layout but the layer is packed as "
                         f"{layer.layout!r}; build it with QuantLinear.from_quantized(..., layout={v.layout!r})")
    if not isinstance(silu_mul, (bool, np.bool_)):
        raise TypeError(f"silu_mul must be True or False, got {silu_mul!r}")
    prologue = _prologue(norm is not None, bool(silu_mul))
    _check_x(x, layer, 2 if silu_mul else 1)
    N, K = layer.out_features, layer.in_features
    shape = x.shape[:-1] + (N,)
    M = x.size // x.shape[-1]
    if out is None:
        with kernels.allocation_allowed():
            out = cupy.empty(shape, x.dtype)
    else:
        out, _ = _as_cupy(out, "out")
        _check_out(out, shape, x, layer)
    if norm is not None:
        norm = _check_norm(norm, x, layer, out)
    if residual is not None:
        residual = _check_residual(residual, out, layer)
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, (int, np.integer))
                                or split_k < 1):
        raise ValueError(f"split_k={split_k!r} must be a positive int (or None to choose by shape)")
    v, p = _launch_choice(v, layer, M, x.dtype.name, tile_m, split_k, prologue, residual is not None)
    kernels.record_gemm_pdl(kernels.takes_pdl(p))
    bias = layer.bias_as(x.dtype)
    ws = kernels.workspace(layer.device)
    if prologue and not (p is not None and p.prologue):      # composed: the GEMM's input first
        from .llama import ops
        if norm is not None:
            x = ops.add_rms_norm(x, norm[0], norm[1], out=_scratch(ws, "norm", x.shape, x.dtype))
        else:
            x = ops.silu_mul(x, out=_scratch(ws, "silu_mul", x.shape[:-1] + (K,), x.dtype))
    if layer.perm is not None:           # act-order: the kernels read K sorted by group (formats.act_order)
        gathered = ws.buffer("gather", x.size, x.dtype)[:x.size].reshape(x.shape)
        x = cupy.take(x, layer.perm, axis=-1, out=gathered)
    add_after = residual is not None and not (p is not None and p.epilogue)
    y = out
    if add_after and residual.data.ptr == out.data.ptr:   # composed in place: the GEMM's output aside
        y = _scratch(ws, "residual", shape, out.dtype)
    if p is None:
        kernels.launch_dequant(x, layer.qweight, layer.qzeros, layer.scales, bias, y, N, K, layer.group_size,
                               layer.device)
    else:
        kernels.launch(p, x, layer.qweight, layer.qzeros, layer.scales, bias, y, layer.device, norm, residual)
    if add_after:                        # T(r + y): one rounding of the float32 sum of two values of T
        cupy.add(residual, y, out=out)
    if caller_out is not None:
        return caller_out
    return to_caller(out) if to_caller is not None else out


def _scratch(ws, name: str, shape, dtype):
    """An intermediate of a composed norm or residual add: under capture, workspace buffer ``name``
    (it lives as long as the graph); else an array from CuPy's pool (a prefill's large ones are not
    kept)."""
    import cupy
    if kernels.capturing():
        n = int(np.prod(shape))
        return ws.buffer(name, n, dtype)[:n].reshape(shape)
    return cupy.empty(shape, dtype)


@functools.lru_cache(maxsize=4096)
def _plan(v: registry.Variant, M, N, K, group_size, device, tile_m, split_k, dtype, prologue=False,
          epilogue=False):
    return kernels.plan(v, M, N, K, group_size, kernels.device_limits(device), tile_m=tile_m,
                        split_k=split_k, dtype=dtype, prologue=prologue, epilogue=epilogue)


__all__ = ["QuantLinear", "gemm", "fused", "launch_plan", "KERNELS", "LAYOUTS", "kernel_layout", "check_layer_shape"]

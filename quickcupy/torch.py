"""PyTorch and transformers on quickcupy's 4-bit GEMM, with neither AutoAWQ nor a compiled extension.

:class:`QuickLinear` is a ``torch.nn.Module`` around one :class:`quickcupy.gemm.QuantLinear`: a CUDA
float16 or bfloat16 tensor goes into the kernels without a copy (DLPack), on torch's current
stream, so torch's stream order and ``torch.cuda.graph`` captures hold. :func:`load_causal_lm` builds
a transformers ``AutoModelForCausalLM`` from a 4-bit checkpoint directory (AutoAWQ, GPTQ or
compressed-tensors: what :func:`quickcupy.formats.read_layer` reads) with every quantized linear a
QuickLinear and every other tensor loaded as it is::

    from quickcupy.torch import load_causal_lm
    model = load_causal_lm("Llama-2-7B-AWQ")                 # float16 on the current CUDA device
    out = model.generate(input_ids.cuda(), max_new_tokens=64)

Imported only by its users: ``import quickcupy`` never imports torch, and neither torch (2.1 or
newer: the loader assigns tensors to a meta-device skeleton) nor transformers is a dependency of
quickcupy. Inference only: no gradient flows through a QuickLinear.
Its packed weights live in CuPy's memory pool on one GPU, outside torch's parameters:
``state_dict()`` and ``.to(device)`` do not see them (``.to(dtype)`` is harmless: one layer serves
float16 and bfloat16 activations alike).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np

from . import dtypes, formats, kernels, registry
from ._cupy import import_cupy
from .formats.layers import split_names
from .gemm import QuantLinear, gemm
from .quantize import QuantizedWeight

try:
    import torch
except ImportError as exc:
    raise ImportError("quickcupy.torch needs PyTorch, which quickcupy does not install: pip install torch") from exc

# The activation dtypes of the kernels, as torch spells them.
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


class QuickLinear(torch.nn.Module):
    """y = x @ W.T (+ bias) with 4-bit weights: ``torch.nn.Linear`` for inference.

    layer: the :class:`~quickcupy.gemm.QuantLinear` holding the packed weights, the bias and an
    act-order permutation (on one GPU). kernel: a name of :data:`quickcupy.KERNELS` that reads the
    layer's layout; None: the layer's default ("auto" for the quick layout, which picks by M and,
    under CUDA-graph capture, among the capturable kernels only). Settable later
    (``linear.kernel = "quick_decode"``). ``in_features`` K and ``out_features`` N as nn.Linear's.
    Build from a :class:`~quickcupy.quantize.QuantizedWeight` with :meth:`from_quantized`.
    """

    def __init__(self, layer: QuantLinear, kernel=None):
        super().__init__()
        if not isinstance(layer, QuantLinear):
            raise TypeError(f"layer must be a quickcupy.gemm.QuantLinear, got {type(layer).__name__}")
        self.layer = layer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.kernel = layer.default_kernel if kernel is None else kernel

    @property
    def kernel(self) -> str:
        return self._variant.name

    @kernel.setter
    def kernel(self, kernel):
        v = registry.variant(kernel)          # the name becomes its record once, here
        if v.layout != self.layer.layout:
            raise ValueError(f"kernel={v.name!r} reads the {v.layout} layout but the layer is packed as "
                             f"{self.layer.layout!r}; build it with QuickLinear.from_quantized(..., kernel={v.name!r})")
        reason = kernels.unsupported_reason(v, self.layer.device)
        if reason is not None:
            raise ValueError(reason)
        self._variant = v

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias=None, perm=None, kernel="auto", device=None) -> "QuickLinear":
        """Packs ``q`` in the layout ``kernel`` reads, on CUDA ``device`` (default: torch's current one).

        bias: (N,) float (a torch tensor of any device, NumPy or CuPy; kept in bfloat16 when given
        so, else float16) or None. perm: (K,) integer act-order permutation or None (the layer
        computes ``x[..., perm] @ W.T``, see :mod:`quickcupy.formats`).
        """
        if not isinstance(q, QuantizedWeight):
            raise TypeError(f"q must be a QuantizedWeight, got {type(q).__name__}")
        v = registry.variant(kernel)
        cupy = import_cupy()
        with cupy.cuda.Device(_cuda_index(device)):
            layer = QuantLinear.from_quantized(q, layout=v.layout, bias=_host(bias), perm=_host(perm))
        return cls(layer, v)

    def forward(self, x):
        """x: (..., K) float16 or bfloat16 CUDA tensor -> (..., N) of x's dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in DTYPES:
            raise TypeError(f"x must be float16 or bfloat16, got {x.dtype}")
        if x.device.type != "cuda":
            raise TypeError(f"x must be a CUDA tensor, got one on {x.device}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("QuickLinear computes no gradients, and x requires one; call it under "
                               "torch.no_grad() or torch.inference_mode()")
        shape = (*x.shape[:-1], self.out_features)
        if x.numel() == 0:
            return x.new_empty(shape)
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous() or x2.data_ptr() % 16:    # the kernels load 16-byte vectors of each row
            x2 = x2.clone(memory_format=torch.contiguous_format)
        out = _output((x2.shape[0], self.out_features), x2)
        gemm(x2, self.layer, kernel=self._variant, out=out)
        return out.view(shape)

    def extra_repr(self) -> str:
        layer = self.layer
        return (f"in_features={layer.in_features}, out_features={layer.out_features}, bias={layer.bias is not None}, "
                f"group_size={layer.group_size}, act_order={layer.perm is not None}, layout={layer.layout!r}, "
                f"kernel={self.kernel!r}")


def _output(shape, like):
    """The output buffer of a forward: torch's, so that under ``torch.cuda.graph`` it comes from
    the graph's private pool and lives as long as torch says."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _cuda_index(device) -> int:
    """The CUDA device index of ``device`` (a torch.device, "cuda:1", an int; None: torch's current)."""
    if device is None:
        return torch.cuda.current_device()
    d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if d.type != "cuda":
        raise ValueError(f"device={str(device)!r}: the 4-bit layers run on CUDA devices only")
    return torch.cuda.current_device() if d.index is None else d.index


def _cuda_device(device):
    """``device`` as a torch.device of CUDA with its index (see :func:`_cuda_index`)."""
    return torch.device("cuda", _cuda_index(device))


def _host(a):
    """A bias or permutation as NumPy (from torch on any device, CuPy or NumPy); None stays None."""
    if a is None or isinstance(a, np.ndarray):
        return a
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:       # NumPy has no bfloat16: its bits, as ml_dtypes' type
            return a.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return a.numpy()
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _torch_dtype(dtype):
    """torch.float16 or torch.bfloat16, from a torch dtype or a spelling of quickcupy.dtypes."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype}: the 4-bit kernels take float16 or bfloat16 activations")
        return dtype
    name = dtypes.name(dtype)
    return next(t for t, n in DTYPES.items() if n == name)


def _to_torch(name: str, a: np.ndarray, dtype, device):
    """A checkpoint tensor (NumPy; bfloat16 as ml_dtypes' type) on ``device``, floats as ``dtype``;
    ValueError naming it when it cannot be held (NaN or inf after the conversion)."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:              # torch.from_numpy shares memory and wants it writable
        a = a.copy()
    try:
        t = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype.name == "bfloat16"
             else torch.from_numpy(a))
    except TypeError as exc:
        raise ValueError(f"{name} has dtype {a.dtype}, which torch cannot hold ({exc})") from None
    if not t.is_floating_point():
        return t.to(device)
    t = t.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or inf as {dtype} (a value beyond its range, or one in the checkpoint)")
    return t


def _replace(model, name: str, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _quick_linear(model, qc: dict, store, prefix: str, kernel, index: int, unused: list) -> QuickLinear:
    """The QuickLinear of checkpoint layer ``prefix``, checked against the model's nn.Linear there."""
    try:
        linear = model.get_submodule(prefix)
    except AttributeError:
        raise ValueError(f"{prefix} is a 4-bit layer of the checkpoint but {type(model).__name__} (built from "
                         f"config.json) has no module of that name") from None
    if not isinstance(linear, torch.nn.Linear):
        raise ValueError(f"{prefix} is a 4-bit layer of the checkpoint but a {type(linear).__name__} in "
                         f"{type(model).__name__}, not a torch.nn.Linear")
    try:
        q, perm = formats.read_layer(qc, store, prefix)
    except ValueError as exc:
        raise ValueError(str(exc) if prefix in str(exc) else f"{prefix}: {exc}") from exc
    if (q.in_features, q.out_features) != (linear.in_features, linear.out_features):
        raise ValueError(f"{prefix} has (in_features, out_features) = {(q.in_features, q.out_features)} in the "
                         f"checkpoint, {(linear.in_features, linear.out_features)} in the model built from config.json")
    bias = None
    if linear.bias is not None:            # the model decides, as transformers' own loading does
        if f"{prefix}.bias" not in store:
            raise ValueError(f"{prefix}.bias is missing from the checkpoint; the model's {prefix} has a bias")
        bias = store[f"{prefix}.bias"]
    elif f"{prefix}.bias" in store:
        unused.append(f"{prefix}.bias")
    try:
        return QuickLinear.from_quantized(q, bias, perm, kernel, index)
    except ValueError as exc:
        raise ValueError(f"{prefix}: {exc}") from exc


def _rebuild_meta_buffers(model, device):
    """Buffers that checkpoints do not hold (non-persistent: the rotary embedding's ``inv_freq``)
    were made on the meta device with the skeleton; each module holding one is built again on
    ``device`` from its config, as transformers builds rotary embeddings: ``cls(config)`` under
    ``torch.device(device)``."""
    for name, module in list(model.named_modules()):
        meta = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None)
        if config is None or "Rotary" not in type(module).__name__:
            raise ValueError(f"{name}.{meta[0]} is not in the checkpoint and {type(module).__name__} is not a rotary "
                             f"embedding that can be built again from its config")
        try:
            with torch.device(device):      # transformers 5 deprecates the device argument; the context serves all
                rebuilt = type(module)(config=config)
        except TypeError as exc:
            raise ValueError(f"{name}: {type(module).__name__}(config=...) failed ({exc}); this "
                             f"transformers version builds rotary embeddings another way") from None
        _replace(model, name, rebuilt)


def load_causal_lm(path, dtype=torch.float16, device="cuda", kernel="auto"):
    """A transformers ``AutoModelForCausalLM`` of the 4-bit checkpoint directory ``path``, in eval
    mode, each quantized linear a :class:`QuickLinear`.

    path: a local directory of config.json (with the quantization_config of an AutoAWQ, GPTQ or
    compressed-tensors W4A16 checkpoint, see :func:`quickcupy.formats.read_layer`) and
    ``*.safetensors`` files (generation_config.json is read when present). dtype: of the
    activations and of every float tensor, torch.float16 or torch.bfloat16 (or "fp16", "bf16").
    device: the CUDA device (default torch's current one). kernel: every QuickLinear's.

    The steps: config.json through ``transformers.AutoConfig`` without its quantization_config (so
    that transformers' own AWQ/GPTQ integration stays out); the model built on the meta device;
    each checkpoint prefix with a ``.qweight`` or ``.weight_packed`` tensor (its bias when the
    model's linear has one) made a QuickLinear; every other tensor loaded as ``dtype`` on
    ``device``; tied embeddings tied again; rotary tables built on ``device``. Checkpoint tensors
    the model has no place for are left out with a warning (transformers does the same).
    FileNotFoundError / ValueError name what is missing or cannot be served; ImportError when
    transformers (or safetensors) is not installed.
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("load_causal_lm needs transformers, which quickcupy does not install: "
                          "pip install transformers") from exc
    from .llama.checkpoint import TensorStore

    registry.variant(kernel)                        # a bad name fails before anything is read
    torch_dtype = _torch_dtype(dtype)
    device = _cuda_device(device)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: it has no config.json")
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path / 'config.json'} is not a JSON object ({exc})") from None
    if not isinstance(qc, dict):
        raise ValueError(f"{path / 'config.json'} has no quantization_config: not a 4-bit checkpoint "
                         f"(transformers loads a float one itself)")
    store = TensorStore(path)
    prefixes, plain = split_names(store)
    if not prefixes:
        raise ValueError(f"{path} holds no 4-bit layer: no tensor is named <prefix>.qweight or <prefix>.weight_packed")

    config = transformers.AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "pretraining_tp", 1) != 1:
        config.pretraining_tp = 1                   # its path slices linear weights, which a QuickLinear has not
    if "lm_head" in prefixes:
        config.tie_word_embeddings = False          # a 4-bit lm_head is the checkpoint's own, tied to nothing
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)

    unused = []
    for prefix in prefixes:
        _replace(model, prefix, _quick_linear(model, qc, store, prefix, kernel, device.index, unused))

    expected = model.state_dict(keep_vars=True)     # every persistent tensor the model still needs
    state = {}
    for name in plain:
        target = expected.get(name)
        if target is None:
            if not name.endswith("rotary_emb.inv_freq"):     # older exports saved the rotary tables
                unused.append(name)
            continue
        a = store[name]
        if tuple(a.shape) != tuple(target.shape):
            raise ValueError(f"{name} has shape {tuple(a.shape)} in the checkpoint, the model needs {tuple(target.shape)}")
        state[name] = _to_torch(name, a, torch_dtype, device)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()                             # a no-op unless config.json ties the embeddings
    _rebuild_meta_buffers(model, device)
    missing = ([n for n, p in model.named_parameters() if p.is_meta]
               + [n for n, b in model.named_buffers() if b is not None and b.is_meta])
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) the model needs, first: {', '.join(missing[:3])}")
    if unused:
        warnings.warn(f"{path}: {len(unused)} checkpoint tensor(s) have no place in {type(model).__name__} and "
                      f"were not loaded, first: {', '.join(unused[:3])}", stacklevel=2)
    if (path / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(path))
    model.requires_grad_(False)
    return model.eval()


__all__ = ["QuickLinear", "load_causal_lm", "DTYPES"]

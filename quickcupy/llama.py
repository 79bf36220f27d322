"""A Llama decoder stack on 4-bit weights: the end-to-end check and benchmark of the GEMM kernels.

One decoder block, written once against an array module ``xp`` (NumPy float32 on the CPU, CuPy
float16 on the GPU)::

    x ──┬─ RMSNorm ─ qkv (one fused linear) ─ rope(q, k) ─ causal GQA attention (+KV cache) ─ o ─(+)─┐
        └──────────────────────────────────────────────────────────────────────────────────────────┘
    x ──┬─ RMSNorm ─ gate|up (one fused linear) ─ silu(gate) * up ─ down ─(+)─┐
        └─────────────────────────────────────────────────────────────────────┘

The linear layers come from :func:`make_linear` by backend name: ``"numpy"`` (float32 reference,
``y = x @ W.T``), ``"fp16"`` (cuBLAS through ``cupy.matmul``), ``"awq"`` and ``"quick"``
(:class:`quickcupy.gemm.QuantLinear` with that layout). The input of the stack is hidden states
(batch, seq, hidden); there is no embedding and no LM head.

Weights are random (:func:`random_layers`) or read from an AutoAWQ checkpoint directory
(:func:`load_awq_checkpoint`; :func:`save_awq_checkpoint` writes one). The tool
``python -m quickcupy llama`` times prefill and decode for fp16, AWQ and QUICK side by side.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np

from .errors import UsageError
from .report import write_json
from .kernels import DECODE_HEAD_DIMS, DECODE_HEADS_PER_BLOCK, DECODE_THREADS, get_function
from .layouts import pack_awq, unpack_awq
from .quantize import SUPPORTED_GROUP_SIZES, QuantizedWeight, check_group_size, quantize

BACKENDS = ("numpy", "fp16", "awq", "quick")

Weight = Union[np.ndarray, QuantizedWeight]   # (out_features N, in_features K) float, or 4-bit


# ------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LlamaConfig:
    """Model dimensions, with the Hugging Face ``config.json`` names."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "num_hidden_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer))
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        H, nh, nkv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if H % nh:
            raise ValueError(f"hidden_size={H} is not a multiple of num_attention_heads={nh}")
        if nh % nkv:
            raise ValueError(f"num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
        if (H // nh) % 2:
            raise ValueError(f"head_dim = hidden_size / num_attention_heads = {H // nh} must be even "
                             f"(rotary embeddings rotate pairs)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        """``"7b"``, ``"13b"``, ``"70b"`` (Llama-2 dimensions) or ``"tiny"`` (for CPU tests)."""
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}") from None

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` dict (extra keys are ignored; HF defaults apply)."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type={d['model_type']!r} is not supported; only 'llama' models load")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                               "num_hidden_layers") if k not in d]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        config = cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                     num_attention_heads=d["num_attention_heads"],
                     num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                     num_hidden_layers=d["num_hidden_layers"],
                     rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=d.get("rope_theta", 10000.0))
        if d.get("head_dim") not in (None, config.head_dim):
            raise ValueError(f"head_dim={d['head_dim']} differs from hidden_size / num_attention_heads = "
                             f"{config.head_dim}; such models are not supported")
        if d.get("rope_scaling"):
            warnings.warn(f"rope_scaling={d['rope_scaling']} is not implemented: plain rotary embeddings "
                          f"are used, so outputs differ from the original model (speed does not)")
        return config


PRESETS = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, rms_norm_eps=1e-5, rope_theta=10000.0),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               num_hidden_layers=32, rms_norm_eps=1e-5, rope_theta=10000.0),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                num_hidden_layers=40, rms_norm_eps=1e-5, rope_theta=10000.0),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                num_hidden_layers=80, rms_norm_eps=1e-5, rope_theta=10000.0),
}


# ------------------------------------------------------------------------------------------ weights
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}   # name -> HF sub-module
NORMS = ("input_layernorm", "post_attention_layernorm")


def projection_shapes(config: LlamaConfig) -> dict:
    """(out_features, in_features) of each projection of one layer."""
    H, I, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q),
            "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}


def _shape(w: Weight) -> tuple:
    return (w.out_features, w.in_features) if isinstance(w, QuantizedWeight) else tuple(w.shape)


@dataclass
class LayerWeights:
    """The tensors of one decoder layer.

    Projections: (out_features, in_features) float NumPy arrays or :class:`QuantizedWeight`.
    Norms: (hidden_size,) float16, as in checkpoints.
    """

    q_proj: Weight
    k_proj: Weight
    v_proj: Weight
    o_proj: Weight
    gate_proj: Weight
    up_proj: Weight
    down_proj: Weight
    input_layernorm: np.ndarray
    post_attention_layernorm: np.ndarray

    def projections(self) -> dict:
        return {name: getattr(self, name) for name in PROJECTIONS}

    def map_projections(self, fn) -> "LayerWeights":
        return dataclasses.replace(self, **{name: fn(w) for name, w in self.projections().items()})

    def quantized(self, group_size: int = 128) -> "LayerWeights":
        """Float projections quantized with AutoAWQ's rule (already-quantized ones are kept)."""
        return self.map_projections(
            lambda w: w if isinstance(w, QuantizedWeight) else quantize(np.asarray(w, np.float32), group_size))

    def dequantized(self) -> "LayerWeights":
        """float32 projections (``(code - zero) * scale`` for quantized ones)."""
        return self.map_projections(
            lambda w: w.dequantize(np.float32) if isinstance(w, QuantizedWeight) else np.asarray(w, np.float32))

    def check(self, config: LlamaConfig, where: str = "layer"):
        """Raises ValueError naming the first tensor whose shape disagrees with ``config``."""
        for name, shape in projection_shapes(config).items():
            if _shape(getattr(self, name)) != shape:
                raise ValueError(f"{where} {name} has shape {_shape(getattr(self, name))}, "
                                 f"the config needs (out_features, in_features) = {shape}")
        for name in NORMS:
            if np.shape(getattr(self, name)) != (config.hidden_size,):
                raise ValueError(f"{where} {name} has shape {np.shape(getattr(self, name))}, "
                                 f"the config needs ({config.hidden_size},)")


def random_layers(config: LlamaConfig, seed: int = 0, std: float = 0.02) -> list:
    """``config.num_hidden_layers`` layers of random float32 weights at the usual init scale
    (normal, std 0.02) and norm weights near 1 (float16)."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(config.num_hidden_layers):
        tensors = {}
        for name, shape in projection_shapes(config).items():
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(std)
            tensors[name] = w
        for name in NORMS:
            tensors[name] = (1 + 0.05 * rng.standard_normal(config.hidden_size)).astype(np.float16)
        layers.append(LayerWeights(**tensors))
    return layers


def fuse(weights: list) -> Weight:
    """Concatenates projections sharing their input along out_features (q|k|v, gate|up).

    Float weights concatenate as arrays; quantized ones concatenate codes, zeros and scales by row,
    which is the quantization of the concatenated weight since AWQ quantizes each row on its own.
    """
    if all(isinstance(w, QuantizedWeight) for w in weights):
        if len({(w.in_features, w.group_size) for w in weights}) != 1:
            raise ValueError("fused projections must share in_features and group_size, got "
                             f"{[(w.in_features, w.group_size) for w in weights]}")
        return QuantizedWeight(codes=np.concatenate([w.codes for w in weights]),
                               zeros=np.concatenate([w.zeros for w in weights]),
                               scales=np.concatenate([w.scales for w in weights]),
                               group_size=weights[0].group_size)
    if any(isinstance(w, QuantizedWeight) for w in weights):
        raise TypeError("cannot fuse float and quantized projections")
    return np.concatenate(weights, axis=0)


# ------------------------------------------------------------------------------------ linear layers
class NumpyLinear:
    """Float32 reference on the CPU: x (..., K) float32 -> x @ W.T (..., N) float32."""

    def __init__(self, weight: np.ndarray):
        self.weight = np.ascontiguousarray(weight, np.float32)      # (N, K)
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x):
        # A 2-D product is one BLAS call; a 3-D one may loop over the batch.
        return (x.reshape(-1, self.in_features) @ self.weight.T).reshape(*x.shape[:-1], self.out_features)


class Fp16Linear:
    """cuBLAS float16 GEMM (float32 accumulation): x (..., K) cupy float16 -> (..., N) float16."""

    def __init__(self, weight: np.ndarray):
        import cupy
        # W.T stored (K, N) row-major so the product is x @ W_t with both operands contiguous.
        self.weight_t = cupy.ascontiguousarray(cupy.asarray(np.asarray(weight, np.float16)).T)
        self.in_features, self.out_features = self.weight_t.shape

    def __call__(self, x):
        # 2-D: one GEMM; cupy.matmul of (B, S, K) @ (K, N) would run B broadcast GEMMs instead.
        return (x.reshape(-1, self.in_features) @ self.weight_t).reshape(*x.shape[:-1], self.out_features)


class QuantizedLinear:
    """4-bit GEMM of :mod:`quickcupy.gemm`: x (..., K) cupy float16 -> (..., N) float16."""

    def __init__(self, q: QuantizedWeight, layout: str):
        try:
            from .gemm import QuantLinear
        except ImportError as exc:
            raise RuntimeError(f"backend {layout!r} needs quickcupy.gemm.QuantLinear, which is not "
                               f"importable ({exc})") from exc
        self.layer = QuantLinear.from_quantized(q, layout=layout)
        self.out_features, self.in_features = q.out_features, q.in_features

    def __call__(self, x):
        import cupy
        x2 = cupy.ascontiguousarray(x.reshape(-1, self.in_features))
        if x2.data.ptr % 16:                 # the kernels load 16-byte vectors; a view may be offset
            x2 = x2.copy()
        y = self.layer(x2)
        return y.reshape(*x.shape[:-1], self.out_features)


def make_linear(backend: str, weight: Weight, group_size: int = 128):
    """A linear layer ``y = x @ W.T`` of ``weight`` (N, K) on ``backend``.

    Float weights are quantized (with ``group_size``) for "awq"/"quick"; quantized weights are
    dequantized for "numpy"/"fp16".
    """
    check_backend(backend)
    if backend in ("numpy", "fp16"):
        if isinstance(weight, QuantizedWeight):
            weight = weight.dequantize(np.float32)
        return NumpyLinear(weight) if backend == "numpy" else Fp16Linear(weight)
    if not isinstance(weight, QuantizedWeight):
        weight = quantize(np.asarray(weight, np.float32), group_size)
    return QuantizedLinear(weight, layout=backend)


def check_backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")


def array_module(backend: str):
    """(xp, activation dtype) of a backend: NumPy float32 for "numpy", CuPy float16 otherwise."""
    check_backend(backend)
    if backend == "numpy":
        return np, np.dtype(np.float32)
    import cupy
    return cupy, np.dtype(np.float16)


# ----------------------------------------------------------------------------------- block pieces
def rms_norm(x, weight, eps: float):
    """x (..., H) -> x / rms(x) * weight, the mean square taken in float32 (as Hugging Face does)."""
    xp = _xp(x)
    x32 = x.astype(np.float32, copy=False)
    inv_rms = 1 / xp.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + np.float32(eps))
    return (x32 * inv_rms).astype(x.dtype, copy=False) * weight


def rope_tables(config: LlamaConfig, positions: np.ndarray):
    """cos, sin (len(positions), head_dim / 2) float32 of rotary angles pos * theta^(-2i / head_dim).

    Computed in float64 on the host, so the NumPy and CuPy blocks rotate by identical angles.
    """
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """Rotates x (B, S, heads, head_dim) at positions given by cos, sin (S, head_dim / 2).

    Hugging Face's "rotate_half" pairing (element i with i + head_dim/2), which AutoAWQ checkpoints
    of Llama expect: their q/k weights are permuted for exactly this convention.
    """
    xp = _xp(x)
    half = x.shape[-1] // 2
    x32 = x.astype(np.float32, copy=False)
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return xp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype, copy=False)


def attended_length(S: int, start: int, cache_max_len: int | None) -> int:
    """How many key positions :func:`attention` scores: the S new ones when nothing precedes them,
    else the whole cache (unwritten slots included, masked): a prefix slice of the cache would be
    strided, and cupy.matmul copies strided operands, which costs more than the masked slots."""
    return S if cache_max_len is None or start == 0 else cache_max_len


def causal_bias(xp, start: int, S: int, T: int):
    """(S, T) float32: 0 where key j may be seen by query start + i (j <= start + i), else -inf.
    None when no key lies after any query. Also hides the cache's unwritten slots (j >= start + S)."""
    if T - 1 <= start:
        return None
    after = xp.arange(T)[None, :] > (start + xp.arange(S))[:, None]
    return xp.where(after, -np.inf, 0.0).astype(np.float32)


def attention(q, k, v, start: int = 0, kv_cache=None, bias="auto", fused: bool = True):
    """Causal grouped-query attention.

    q: (B, S, n_heads, d); k, v: (B, S, n_kv_heads, d), rotated, for positions start .. start+S-1.
    kv_cache: None, or (keys (B, n_kv, d, max_len), values (B, n_kv, max_len, d)) of one layer;
    this call writes its k, v at [start, start + S). Returns (B, S, n_heads * d), q's dtype.
    Query head h reads KV head h // (n_heads / n_kv_heads), as Hugging Face's ``repeat_kv``.
    bias: :func:`causal_bias` for these positions ("auto": computed here; a model computes it once
    for all its layers).
    fused: a decode step on CuPy (S == 1, a float16 cache, head_dim a multiple of 32 in 64..256) runs
    :func:`decode_attention` (one kernel; bias unused); False, or any other case, runs the batched
    matmuls below, the reference it is tested against.
    """
    xp = _xp(q)
    B, S, nh, d = q.shape
    nkv = k.shape[2]
    group = nh // nkv
    k_t = k.transpose(0, 2, 3, 1)                    # (B, nkv, d, S)
    v_t = v.transpose(0, 2, 1, 3)                    # (B, nkv, S, d)
    if kv_cache is not None:
        cache_k, cache_v = kv_cache
        cache_k[..., start:start + S] = k_t
        cache_v[:, :, start:start + S] = v_t
        if (fused and S == 1 and xp is not np and q.dtype == cache_k.dtype == cache_v.dtype == np.float16
                and _decode_head_dim_error(d) is None):
            return decode_attention(q.reshape(B, nh, d), cache_k, cache_v, start + 1)
    if kv_cache is None or start == 0:               # as attended_length() says
        keys, values = xp.ascontiguousarray(k_t), xp.ascontiguousarray(v_t)
    else:
        keys, values = cache_k, cache_v
    T = keys.shape[-1]
    if isinstance(bias, str):
        bias = causal_bias(xp, start, S, T)

    # The `group` query heads sharing one KV head become rows of one matrix: a batched GEMM per KV head.
    qg = xp.ascontiguousarray(q.transpose(0, 2, 1, 3)).reshape(B, nkv, group * S, d)
    scores = xp.matmul(qg, keys).astype(np.float32, copy=False)          # (B, nkv, group*S, T)
    scores *= np.float32(1 / math.sqrt(d))
    scores = scores.reshape(B, nkv, group, S, T)
    if bias is not None:
        scores += bias
    scores -= scores.max(axis=-1, keepdims=True)                          # softmax in float32
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = xp.matmul(scores.astype(q.dtype).reshape(B, nkv, group * S, T), values)  # (B, nkv, group*S, d)
    out = out.reshape(B, nh, S, d).transpose(0, 2, 1, 3).reshape(B, S, nh * d)
    return xp.ascontiguousarray(out)


def _decode_head_dim_error(d: int):
    """Why :func:`decode_attention` cannot take head_dim ``d`` (None when it can): a warp of the
    kernel spans head_dim, and CI compiles the instances from kernels.DECODE_HEAD_DIMS."""
    lo, hi = min(DECODE_HEAD_DIMS), max(DECODE_HEAD_DIMS)
    if d % 32 or not lo <= d <= hi:
        return f"head_dim={d} is not a multiple of 32 between {lo} and {hi}"
    return None


def decode_attention(q, keys, values, length: int):
    """Attention of one new token per sequence over its first ``length`` cached positions, in one
    kernel (cuda/decode_attention.cu; float32 softmax). CuPy float16 arrays:

    q: (B, n_heads, d); keys (B, n_kv, d, max_len), values (B, n_kv, max_len, d): a layer's
    :class:`KVCache` tensors, C-contiguous, positions >= length not read. d: a multiple of 32 in
    64..256. Returns (B, 1, n_heads * d), as :func:`attention` for S = 1.
    """
    if q.ndim != 3 or keys.ndim != 4 or values.ndim != 4:
        raise ValueError(f"q, keys, values must be 3-D, 4-D, 4-D, got shapes {q.shape}, {keys.shape}, "
                         f"{values.shape}")
    B, nh, d = q.shape
    nkv, max_len = keys.shape[1], keys.shape[3]
    error = _decode_head_dim_error(d)
    if error:
        raise ValueError(f"decode_attention: {error}")
    if keys.shape != (B, nkv, d, max_len) or values.shape != (B, nkv, max_len, d):
        raise ValueError(f"keys {keys.shape} and values {values.shape} must be (B, n_kv, d, max_len) and "
                         f"(B, n_kv, max_len, d) with B={B}, d={d} of q {q.shape}")
    if nh % nkv:
        raise ValueError(f"n_heads={nh} is not a multiple of n_kv={nkv}")
    if not 1 <= length <= max_len:
        raise ValueError(f"length={length} must lie in 1..max_len={max_len}")
    for name, a in (("q", q), ("keys", keys), ("values", values)):
        if a.dtype != np.float16:
            raise ValueError(f"{name} must be float16, got {a.dtype}")
    if not (keys.flags.c_contiguous and values.flags.c_contiguous):
        raise ValueError("keys and values must be C-contiguous (as KVCache allocates them)")
    import cupy
    q = cupy.ascontiguousarray(q)
    heads = next(g for g in DECODE_HEADS_PER_BLOCK if (nh // nkv) % g == 0)   # heads of one KV head per block
    fn = get_function(q.device.id, "decode_attention.cu", f"decode_attention<{d}, {heads}>")
    out = cupy.empty((B, 1, nh * d), np.float16)
    fn((B * nh // heads,), (DECODE_THREADS,),
       (q, keys, values, out, np.int32(nh), np.int32(nkv), np.int32(max_len), np.int32(length)))
    return out


def silu_mul(gate, up):
    """silu(gate) * up in float32, returned in gate's dtype. Shapes (..., I)."""
    xp = _xp(gate)
    g = gate.astype(np.float32, copy=False)
    return (g / (1 + xp.exp(-g)) * up).astype(gate.dtype, copy=False)


def _xp(a):
    return np if isinstance(a, np.ndarray) else sys.modules["cupy"]


# ----------------------------------------------------------------------------------------- the stack
class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``max_len`` positions.

    keys[i]: (batch, n_kv_heads, head_dim, max_len), stored transposed so q @ keys is a GEMM on a
    contiguous operand; values[i]: (batch, n_kv_heads, max_len, head_dim). Zero-filled: unwritten
    slots get probability 0, and 0 * garbage could be NaN. ``length``: positions written so far.
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, xp=np, dtype=np.float32,
                 num_layers: int | None = None):
        n = config.num_hidden_layers if num_layers is None else num_layers
        nkv, d = config.num_key_value_heads, config.head_dim
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.keys = [xp.zeros((batch, nkv, d, max_len), dtype) for _ in range(n)]
        self.values = [xp.zeros((batch, nkv, max_len, d), dtype) for _ in range(n)]

    @staticmethod
    def nbytes(config: LlamaConfig, batch: int, max_len: int, itemsize: int = 2, num_layers=None) -> int:
        n = config.num_hidden_layers if num_layers is None else num_layers
        return 2 * n * batch * config.num_key_value_heads * config.head_dim * max_len * itemsize

    def reset(self):
        """Forgets the sequences (old entries stay, finite, and are masked until overwritten)."""
        self.length = 0


class LlamaBlock:
    """One decoder layer on one backend. Call with x (B, S, hidden) in the backend's dtype."""

    def __init__(self, config: LlamaConfig, weights: LayerWeights, backend: str = "numpy",
                 group_size: int = 128):
        weights.check(config)
        self.config = config
        self.xp, self.dtype = array_module(backend)
        # q|k|v and gate|up each become one GEMM: one launch and one pass over x instead of three/two.
        self.qkv_proj = make_linear(backend, fuse([weights.q_proj, weights.k_proj, weights.v_proj]), group_size)
        self.o_proj = make_linear(backend, weights.o_proj, group_size)
        self.gate_up_proj = make_linear(backend, fuse([weights.gate_proj, weights.up_proj]), group_size)
        self.down_proj = make_linear(backend, weights.down_proj, group_size)
        self.input_norm = self.xp.asarray(np.asarray(weights.input_layernorm, self.dtype))
        self.post_norm = self.xp.asarray(np.asarray(weights.post_attention_layernorm, self.dtype))

    def __call__(self, x, cos, sin, start: int = 0, kv_cache=None, bias="auto"):
        """x (B, S, hidden) at positions start.. -> (B, S, hidden); cos, sin (S, head_dim/2) float32;
        bias: see :func:`attention`."""
        c = self.config
        B, S, _ = x.shape
        nh, nkv, I = c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
        qkv = self.qkv_proj(rms_norm(x, self.input_norm, c.rms_norm_eps)).reshape(B, S, nh + 2 * nkv, c.head_dim)
        qk = apply_rope(qkv[:, :, :nh + nkv], cos, sin)        # q and k heads rotated in one pass
        attn = attention(qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv:], start, kv_cache, bias)
        x = x + self.o_proj(attn)
        gate_up = self.gate_up_proj(rms_norm(x, self.post_norm, c.rms_norm_eps))
        return x + self.down_proj(silu_mul(gate_up[..., :I], gate_up[..., I:]))


class LlamaModel:
    """A stack of decoder blocks on one backend ("numpy", "fp16", "awq", "quick").

    layers: list of :class:`LayerWeights`, float or quantized (converted as :func:`make_linear`
    says); its length must equal ``config.num_hidden_layers``.
    """

    def __init__(self, config: LlamaConfig, layers: list, backend: str = "numpy", group_size: int = 128):
        if len(layers) != config.num_hidden_layers:
            raise ValueError(f"got {len(layers)} layers of weights but num_hidden_layers="
                             f"{config.num_hidden_layers}")
        for i, w in enumerate(layers):
            w.check(config, where=f"layer {i}")
        self.config, self.backend = config, backend
        self.xp, self.dtype = array_module(backend)
        self.blocks = [LlamaBlock(config, w, backend, group_size) for w in layers]
        self._cos = self._sin = None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        self._rope(0, max_len)      # the rope table covers every position: no upload during decode
        return KVCache(self.config, batch, max_len, self.xp, self.dtype, len(self.blocks))

    def _rope(self, start: int, length: int):
        """cos, sin rows for positions [start, start + length), from a device table grown on demand
        (so a decode step uploads nothing)."""
        if self._cos is None or self._cos.shape[0] < start + length:
            n = max(256, 1 << (start + length - 1).bit_length())
            cos, sin = rope_tables(self.config, np.arange(n))
            self._cos, self._sin = self.xp.asarray(cos), self.xp.asarray(sin)
        return self._cos[start:start + length], self._sin[start:start + length]

    def __call__(self, x, cache: KVCache | None = None):
        """x (B, S, hidden) -> (B, S, hidden), in the backend's array module and dtype
        (NumPy input is moved to the GPU). Without a cache: one causal pass over the S positions.
        With a cache: positions continue at ``cache.length`` (prefill, then one token at a time)."""
        x = self.xp.asarray(x, dtype=self.dtype)
        if x.ndim != 3 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"x must be (batch, seq, {self.config.hidden_size}), got shape {x.shape}")
        B, S, _ = x.shape
        start = 0
        if cache is not None:
            start = cache.length
            if cache.batch != B:
                raise ValueError(f"the cache holds batch={cache.batch} sequences, x has batch={B}")
            if start + S > cache.max_len:
                raise ValueError(f"{start} cached + {S} new positions exceed the cache's max_len={cache.max_len}")
        cos, sin = self._rope(start, S)
        bias = causal_bias(self.xp, start, S, attended_length(S, start, None if cache is None else cache.max_len))
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, cos, sin, start, kv, bias)
        if cache is not None:
            cache.length += S
        return x


# --------------------------------------------------------------------------------------- checkpoints
class Checkpoint(NamedTuple):
    config: LlamaConfig
    layers: list        # of LayerWeights with QuantizedWeight projections and float16 norms
    group_size: int     # as config.json says (-1: one group per row)


def _safetensors():
    try:
        from safetensors import safe_open
        from safetensors.numpy import save_file
    except ImportError as exc:
        raise ImportError("AutoAWQ checkpoints need the 'safetensors' package: "
                          "pip install 'quickcupy[llama]'") from exc
    return safe_open, save_file


def _layer_prefix(i: int, name: str) -> str:
    return f"model.layers.{i}.{PROJECTIONS[name]}.{name}" if name in PROJECTIONS else f"model.layers.{i}.{name}"


def tensor_names(i: int) -> list:
    """The checkpoint tensor names of layer ``i`` that the block reads."""
    return ([f"{_layer_prefix(i, p)}.{part}" for p in PROJECTIONS for part in ("qweight", "qzeros", "scales")]
            + [f"{_layer_prefix(i, n)}.weight" for n in NORMS])


def save_awq_checkpoint(path, config: LlamaConfig, layers: list, group_size: int | None = None,
                        shards: int = 1) -> Path:
    """Writes ``layers`` as an AutoAWQ "GEMM" checkpoint: config.json + ``shards`` safetensors files
    (and model.safetensors.index.json when sharded). Float projections are quantized with
    ``group_size``. Returns the directory."""
    _, save_file = _safetensors()
    path = Path(path)
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"got {len(layers)} layers but num_hidden_layers={config.num_hidden_layers}")
    if group_size is not None:
        check_group_size(group_size, config.hidden_size)
    layers = [w.quantized(128 if group_size is None else group_size) for w in layers]
    qs = [q for w in layers for q in w.projections().values()]
    sizes = {q.group_size for q in qs}
    if len(sizes) == 1:
        written_group_size = sizes.pop()
    elif all(q.n_groups == 1 for q in qs):
        written_group_size = -1
    else:
        raise ValueError(f"all projections must share one group size, got {sorted(sizes)}")
    for i, w in enumerate(layers):
        w.check(config, where=f"layer {i}")

    path.mkdir(parents=True, exist_ok=True)
    shards = max(1, min(int(shards), len(layers)))
    files = (["model.safetensors"] if shards == 1 else
             [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)])
    weight_map = {}
    for s, indices in enumerate(np.array_split(np.arange(len(layers)), shards)):
        tensors = {}
        for i in indices.tolist():
            for name, q in layers[i].projections().items():
                packed = pack_awq(q)
                for part in ("qweight", "qzeros", "scales"):
                    tensors[f"{_layer_prefix(i, name)}.{part}"] = np.ascontiguousarray(getattr(packed, part))
            for name in NORMS:
                tensors[f"{_layer_prefix(i, name)}.weight"] = np.asarray(getattr(layers[i], name), np.float16)
        save_file(tensors, str(path / files[s]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, files[s]))
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
                 **config.to_dict(),
                 "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": written_group_size,
                                         "zero_point": True, "version": "gemm"}}
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    return path


def _check_quantization_config(qc) -> int:
    """Validates config.json's quantization_config; returns its group size."""
    if not isinstance(qc, dict):
        raise ValueError("config.json has no quantization_config: not an AutoAWQ checkpoint")
    if str(qc.get("quant_method", "")).lower() != "awq":
        raise ValueError(f"quantization_config.quant_method={qc.get('quant_method')!r} is not supported; "
                         f"only 'awq' checkpoints load")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ValueError(f"quantization_config.bits={bits!r} is not supported; only 4-bit checkpoints load")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config.version={qc.get('version')!r} is not supported; "
                         f"only the 'gemm' packing loads")
    if qc.get("zero_point", True) is not True:
        raise ValueError("quantization_config.zero_point=false is not supported; AWQ's zero points are assumed")
    group_size = qc.get("group_size", qc.get("q_group_size"))
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"quantization_config.group_size={group_size!r} is not one of {SUPPORTED_GROUP_SIZES}")
    return group_size


def _tensor_files(path: Path) -> dict:
    """Tensor name -> safetensors file, from the index if there is one, else from every file's header."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    names = {}
    for f in files:
        with _open_tensors(f) as fh:
            names.update(dict.fromkeys(fh.keys(), f))
    return names


def _open_tensors(f: Path):
    """safe_open(f) for NumPy, with an unreadable file reported as a ValueError naming it."""
    safe_open, _ = _safetensors()
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist")
    try:
        return safe_open(str(f), framework="np")
    except Exception as exc:      # safetensors raises its own SafetensorError
        raise ValueError(f"{f} is not a readable safetensors file ({exc})") from exc


def load_awq_checkpoint(path, num_layers: int | None = None) -> Checkpoint:
    """Reads the first ``num_layers`` (default: all) decoder layers of an AutoAWQ GEMM checkpoint.

    The returned config has ``num_hidden_layers`` = the number of layers read.
    Raises FileNotFoundError / ValueError naming what is missing or unsupported.
    """
    _safetensors()                   # a clear ImportError before anything else
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: it has no config.json")
    raw = json.loads((path / "config.json").read_text())
    group_size = _check_quantization_config(raw.get("quantization_config"))
    config = LlamaConfig.from_dict(raw)
    n = config.num_hidden_layers if num_layers is None else num_layers
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= config.num_hidden_layers:
        raise ValueError(f"num_layers={num_layers!r} must lie in 1..{config.num_hidden_layers} "
                         f"(the checkpoint's num_hidden_layers)")
    config = config.replace(num_hidden_layers=n)

    files = _tensor_files(path)
    wanted = [name for i in range(n) for name in tensor_names(i)]
    missing = [name for name in wanted if name not in files]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) the model needs, first: {', '.join(missing[:3])}")
    tensors = {}
    for f in sorted(set(files[name] for name in wanted)):
        with _open_tensors(f) as fh:
            for name in wanted:
                if files[name] == f:
                    try:
                        tensors[name] = fh.get_tensor(name)
                    except Exception as exc:     # e.g. bfloat16, which NumPy cannot hold
                        raise ValueError(f"{name} in {f} cannot be read as NumPy ({exc})") from exc

    layers = []
    for i in range(n):
        weights = {}
        for name in PROJECTIONS:
            prefix = _layer_prefix(i, name)
            try:
                weights[name] = unpack_awq(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"],
                                           tensors[f"{prefix}.scales"], group_size=group_size)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{prefix}: {exc}") from exc
        for name in NORMS:
            norm = tensors[f"{_layer_prefix(i, name)}.weight"]
            if norm.dtype.kind != "f":
                raise ValueError(f"{_layer_prefix(i, name)}.weight must be float16, got {norm.dtype}")
            weights[name] = norm.astype(np.float16)
        layer = LayerWeights(**weights)
        layer.check(config, where=f"model.layers.{i}")
        layers.append(layer)
    return Checkpoint(config, layers, group_size)


# ------------------------------------------------------------------------------------ command line
def add_parser(subparsers):
    p = subparsers.add_parser(
        "llama", help="Llama decoder blocks: prefill/decode tokens/s of fp16, AWQ and QUICK",
        description="Times a stack of Llama decoder blocks (prefill of batch x prompt tokens, then gen "
                    "tokens one at a time with a KV cache) per backend, and checks the output against "
                    "the float32 NumPy reference.")
    p.add_argument("--preset", default="7b", help=f"model dimensions: {', '.join(PRESETS)} (default 7b)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="AutoAWQ checkpoint directory (config.json + *.safetensors) instead of random weights")
    p.add_argument("--layers", default="4", help="decoder blocks to run (default 4)")
    p.add_argument("--batch", default="1,16,64,256", help="comma-separated batch sizes (default 1,16,64,256)")
    p.add_argument("--prompt", default="128", help="prompt tokens per sequence (default 128)")
    p.add_argument("--gen", default="128", help="tokens decoded one at a time after the prompt (default 128)")
    p.add_argument("--backends", default="fp16,awq,quick",
                   help=f"comma-separated, from {', '.join(BACKENDS)} (default fp16,awq,quick)")
    p.add_argument("--group-size", default=None,
                   help="32, 64, 128 or -1 for random weights (default 128; a checkpoint brings its own)")
    p.add_argument("--seed", default="0", help="seed of the random weights and inputs (default 0)")
    p.add_argument("--check-tokens", default="8",
                   help="tokens of the batch-1 prefill compared with the NumPy reference (default 8; 0 skips)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.set_defaults(func=run)


def _parse_int(name: str, text, lo: int) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {text!r}") from None
    if value < lo:
        raise UsageError(f"{name} must be at least {lo}, got {value}")
    return value


def _options(args) -> dict:
    """Validated options from the parsed arguments; UsageError (one line) on a bad value."""
    o = {"checkpoint": args.checkpoint, "json": args.json, "preset": args.preset}
    if args.checkpoint is None and args.preset not in PRESETS:
        raise UsageError(f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    o["layers"] = _parse_int("--layers", args.layers, 1)
    o["batches"] = [_parse_int("--batch", b, 1) for b in str(args.batch).split(",")]
    o["prompt"] = _parse_int("--prompt", args.prompt, 1)
    o["gen"] = _parse_int("--gen", args.gen, 0)
    o["seed"] = _parse_int("--seed", args.seed, 0)
    o["check_tokens"] = _parse_int("--check-tokens", args.check_tokens, 0)
    o["backends"] = [b.strip() for b in str(args.backends).split(",") if b.strip()]
    bad = [b for b in o["backends"] if b not in BACKENDS]
    if bad or not o["backends"]:
        raise UsageError(f"--backends {args.backends!r}: use names from {', '.join(BACKENDS)}")
    o["group_size"] = None
    if args.group_size is not None:
        try:
            o["group_size"] = int(args.group_size)
        except ValueError:
            raise UsageError(f"--group-size must be one of {SUPPORTED_GROUP_SIZES}, got {args.group_size!r}") from None
        if o["group_size"] not in SUPPORTED_GROUP_SIZES:
            raise UsageError(f"--group-size must be one of {SUPPORTED_GROUP_SIZES}, got {o['group_size']}")
    return o


class _Progress:
    """One status line on stderr, rewritten in place on a terminal, one line per phase otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()

    def __call__(self, msg: str, detail: bool = False):
        if self.tty:
            print(f"\r{msg}\x1b[K", end="", file=sys.stderr, flush=True)
        elif not detail:
            print(msg, file=sys.stderr, flush=True)

    def done(self):
        if self.tty:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)


class _Timer:
    """Seconds of a with-block: CUDA events around the GPU work, or perf_counter on the CPU."""

    def __init__(self, xp):
        self.gpu = xp is not np

    def __enter__(self):
        if self.gpu:
            import cupy
            self._events = (cupy.cuda.Event(), cupy.cuda.Event())
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.gpu:
            import cupy
            self._events[1].record()
            self._events[1].synchronize()
            self.seconds = cupy.cuda.get_elapsed_time(*self._events) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


def estimate_gpu_bytes(config: LlamaConfig, backend: str, batch: int, prompt: int, gen: int,
                       group_size: int = 128) -> dict:
    """Rough GPU memory of one benchmark run: weights, KV cache, inputs and prefill temporaries."""
    H, I, d = config.hidden_size, config.intermediate_size, config.head_dim
    nh, nkv, L = config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers
    params = L * sum(n * k for n, k in projection_shapes(config).values())
    if backend in ("awq", "quick"):
        G = 128 if group_size in (None, -1) else group_size
        weights = params // 2 + params // G * 3          # 4-bit codes + fp16 scale and 4-bit zero per group
    else:
        weights = params * 2
    tokens = batch * prompt
    activations = (tokens * ((nh + 2 * nkv) * d * 2 * 3 + H * 4 * 6 + 2 * I * 2 + I * 4 * 3)
                   + batch * nh * prompt * prompt * (2 + 4 + 4))   # scores: fp16, fp32, mask sum
    return {"weights": weights, "kv_cache": KVCache.nbytes(config, batch, prompt + gen, 2, L),
            "inputs": batch * (prompt + gen) * H * 2, "activations": activations}


def _relative_error(y, ref) -> float:
    y = np.asarray(y.get() if hasattr(y, "get") else y, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def _random_hidden(xp, seed: int, shape, dtype):
    """Hidden states ~ N(0, 1), generated where they are used."""
    if xp is np:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    return xp.random.RandomState(seed).standard_normal(shape, dtype=np.float32).astype(dtype)


def run(args) -> int:
    from .device import device_info, no_gpu_reason, versions

    o = _options(args)
    progress = _Progress()
    reason = no_gpu_reason()
    gpu = reason is None

    # --------------------------------------------------------------- model dimensions and weights
    if o["checkpoint"]:
        try:
            if (Path(o["checkpoint"]) / "config.json").is_file():
                progress(f"reading {o['checkpoint']}")
            ckpt = load_awq_checkpoint(o["checkpoint"], num_layers=o["layers"])
        except (OSError, ValueError, ImportError) as exc:
            raise UsageError(f"--checkpoint: {exc}") from None
        if o["group_size"] not in (None, ckpt.group_size):
            raise UsageError(f"--group-size {o['group_size']} disagrees with the checkpoint's "
                             f"group_size={ckpt.group_size}")
        config, group_size, float_layers, quant_layers = ckpt.config, ckpt.group_size, None, ckpt.layers
        source = f"AutoAWQ checkpoint {o['checkpoint']}"
    else:
        preset = o["preset"] if gpu else "tiny"
        config = LlamaConfig.preset(preset).replace(num_hidden_layers=o["layers"])
        group_size = 128 if o["group_size"] is None else o["group_size"]
        try:
            for name, (n, k) in projection_shapes(config).items():
                check_group_size(group_size, k)
        except ValueError as exc:
            raise UsageError(f"--group-size: {exc}") from None
        float_layers, quant_layers = None, None
        source = f"random weights (seed {o['seed']})"

    if gpu:
        backends = o["backends"]
        _check_gpu_memory(config, backends, o, group_size)
    else:
        backends = ["numpy"]
        what = "the NumPy float32 path" + ("" if o["checkpoint"] or o["preset"] == "tiny"
                                           else f" with the tiny preset instead of {o['preset']}")
        print(f"{reason}: running {what} on the CPU")

    if quant_layers is None:
        progress(f"random weights: {config.num_hidden_layers} layers of {_describe(config)}")
        float_layers = random_layers(config, seed=o["seed"])
    if quant_layers is None and (not gpu or {"awq", "quick"} & set(backends)):
        progress(f"quantizing (group size {group_size})")
        quant_layers = [w.quantized(group_size) for w in float_layers]

    # ----------------------------------------------------------------- NumPy float32 references
    accuracy = []
    refs = {}
    if o["check_tokens"]:
        x_check = _random_hidden(np, o["seed"] + 1, (1, o["check_tokens"], config.hidden_size), np.float32)
        progress("NumPy float32 reference")
        refs["fp32"] = LlamaModel(config, float_layers or quant_layers, "numpy")(x_check)
        if float_layers is not None and quant_layers is not None:
            progress("NumPy reference with the dequantized 4-bit weights")
            refs["deq"] = LlamaModel(config, quant_layers, "numpy")(x_check)
        else:
            refs["deq"] = refs["fp32"]
        if quant_layers is not None:
            # The 4-bit weights' own error, in exact float32 arithmetic: what the kernels should match.
            accuracy.append({"backend": "numpy", "weights": f"int4 g{group_size}, dequantized",
                             "vs_fp32": _relative_error(refs["deq"], refs["fp32"]) if float_layers else None,
                             "vs_same_weights": 0.0})

    # ------------------------------------------------------------------------ timing per backend
    results = []
    for backend in backends:
        progress(f"[{backend}] building {config.num_hidden_layers} blocks")
        layers = quant_layers if backend in ("awq", "quick") else (float_layers or quant_layers)
        model = LlamaModel(config, layers, backend, group_size)
        if gpu and o["check_tokens"]:
            y = model(x_check)
            same = refs["deq"] if backend in ("awq", "quick") else refs["fp32"]
            accuracy.append({"backend": backend,
                             "weights": f"int4 g{group_size}" if backend in ("awq", "quick") else
                             ("fp16" if float_layers else "fp16, dequantized int4"),
                             "vs_fp32": _relative_error(y, refs["fp32"]),
                             "vs_same_weights": _relative_error(y, same)})
        for batch in o["batches"]:
            results.append(_time_one(model, backend, batch, o, progress))
        del model
        if gpu:
            import cupy
            cupy.get_default_memory_pool().free_all_blocks()
    progress.done()

    # ---------------------------------------------------------------------------------- report
    report = {
        "command": _command_line(o), "versions": versions(), "device": device_info() if gpu else
        {"available": False, "reason": reason}, "config": config.to_dict(), "source": source,
        "group_size": group_size, "prompt": o["prompt"], "gen": o["gen"],
        "throughput": results, "accuracy": accuracy,
    }
    print(_format_report(report, backends))
    if o["json"]:
        write_json(o["json"], report, indent=2)
    return 0


def _describe(config: LlamaConfig) -> str:
    return (f"hidden {config.hidden_size}, {config.num_attention_heads} heads / "
            f"{config.num_key_value_heads} KV heads, intermediate {config.intermediate_size}")


def _check_gpu_memory(config, backends, o, group_size):
    """Fails early, in one line, when the largest batch cannot fit in the free GPU memory."""
    import cupy
    free, _ = cupy.cuda.runtime.memGetInfo()
    free += cupy.get_default_memory_pool().free_bytes()
    batch = max(o["batches"])
    for backend in backends:
        if backend == "numpy":
            continue
        need = estimate_gpu_bytes(config, backend, batch, o["prompt"], o["gen"], group_size)
        total = sum(need.values()) * 1.1 + (256 << 20)     # margin: cuBLAS workspace, fragmentation
        if total > free:
            parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in need.items())
            raise UsageError(f"{backend} at batch={batch}, prompt={o['prompt']}, gen={o['gen']} needs about "
                             f"{total / 2**30:.1f} GiB ({parts} GiB) but {free / 2**30:.1f} GiB of GPU memory "
                             f"is free; lower --batch, --prompt, --gen or --layers")


def _time_one(model: LlamaModel, backend: str, batch: int, o: dict, progress) -> dict:
    """Prefill of batch x prompt tokens, then ``gen`` single-token decode steps, on a fresh cache.

    Two clocks. Wall: each forward launched from Python, one CuPy call per operation, as this runner
    really runs (at small batch a decode step costs more in launch overhead than on the GPU; CuPy
    refuses to capture cuBLAS calls in a CUDA graph). GPU: each forward queued behind a spin kernel
    (quickcupy.timing), so the events measure the GPU's work alone, what a runtime without
    per-launch overhead (C++, CUDA graphs) would see; ``gpu_time_exact`` is False if the host ever
    fell behind the spin (the GPU time is then an upper bound).
    """
    from .timing import gpu_seconds_behind_spin
    xp, H = model.xp, model.config.hidden_size
    prompt, gen = o["prompt"], o["gen"]
    cache = model.new_cache(batch, prompt + gen)
    x = _random_hidden(xp, o["seed"] + 2, (batch, prompt, H), model.dtype)
    # (gen, batch, 1, H): each step's input x_dec[t] is contiguous.
    x_dec = _random_hidden(xp, o["seed"] + 3, (gen, batch, 1, H), model.dtype)

    progress(f"[{backend}] batch {batch}: warm-up")
    model(x, cache)                      # compiles kernels, picks cuBLAS algorithms for these shapes
    for t in range(min(gen, 2)):
        model(x_dec[t], cache)
    cache.reset()

    progress(f"[{backend}] batch {batch}: prefill {batch} x {prompt} tokens")
    with _Timer(xp) as prefill:
        model(x, cache)
    with _Timer(xp) as decode:
        for t in range(gen):
            if t % 16 == 0:
                progress(f"[{backend}] batch {batch}: decode step {t + 1}/{gen}", detail=True)
            model(x_dec[t], cache)
    out = {"backend": backend, "batch": batch,
           "prefill_s": prefill.seconds, "prefill_tokens_per_s": batch * prompt / prefill.seconds,
           "decode_s": decode.seconds,
           "decode_tokens_per_s": batch * gen / decode.seconds if gen else None}
    if xp is np:
        return out

    progress(f"[{backend}] batch {batch}: GPU time of prefill and decode")
    cache.reset()
    host = 2 * prefill.seconds           # generous first guess of the host's launch time
    exact = True
    prefill_gpu, host, ahead = gpu_seconds_behind_spin(lambda: model(x, cache), host)
    exact &= ahead
    decode_gpu = 0.0
    for t in range(gen):
        seconds, host, ahead = gpu_seconds_behind_spin(lambda: model(x_dec[t], cache), host)
        decode_gpu += seconds
        exact &= ahead
    out.update({"prefill_gpu_s": prefill_gpu, "prefill_gpu_tokens_per_s": batch * prompt / prefill_gpu,
                "decode_gpu_s": decode_gpu,
                "decode_gpu_tokens_per_s": batch * gen / decode_gpu if gen else None,
                "gpu_time_exact": bool(exact)})
    return out


def _command_line(o: dict) -> str:
    parts = ["python -m quickcupy llama"]
    parts += [f"--checkpoint {o['checkpoint']}"] if o["checkpoint"] else [f"--preset {o['preset']}"]
    parts += [f"--layers {o['layers']}", f"--batch {','.join(map(str, o['batches']))}",
              f"--prompt {o['prompt']}", f"--gen {o['gen']}", f"--backends {','.join(o['backends'])}"]
    if o["group_size"] is not None:
        parts.append(f"--group-size {o['group_size']}")
    return " ".join(parts)


def _table(headers: list, rows: list) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def _format_report(r: dict, backends: list) -> str:
    c = LlamaConfig(**r["config"])
    dev = r["device"]
    lines = [
        f"command: {r['command']}",
        f"device:  {dev['name'] if dev.get('available') else 'CPU (' + dev['reason'] + ')'}; "
        f"quickcupy {r['versions']['quickcupy']}, cupy {r['versions'].get('cupy')}, numpy {r['versions']['numpy']}",
        f"model:   {c.num_hidden_layers} Llama blocks ({_describe(c)}), {r['source']}, group size {r['group_size']}",
        f"run:     prefill batch x {r['prompt']} tokens, then {r['gen']} decode steps with the KV cache",
    ]
    by = {(t["backend"], t["batch"]): t for t in r["throughput"]}
    batches = sorted({t["batch"] for t in r["throughput"]})
    ratio = "awq" in backends and "quick" in backends
    metrics = [("prefill_tokens_per_s", "prefill tokens/s, wall clock"),
               ("decode_tokens_per_s", "decode tokens/s, wall clock (each step launched from Python: small "
                                       "batches measure CuPy's launch overhead more than the GEMMs)"),
               ("prefill_gpu_tokens_per_s", "prefill tokens/s, GPU time (launch overhead hidden behind a spin kernel)"),
               ("decode_gpu_tokens_per_s", "decode tokens/s, GPU time (launch overhead hidden behind a spin kernel)")]
    if any(t.get("gpu_time_exact") is False for t in r["throughput"]):
        lines.append("note: the host fell behind the spin kernel at least once; GPU times are upper bounds")
    for key, title in metrics:
        if all(t.get(key) is None for t in r["throughput"]):
            continue
        rows = []
        for batch in batches:
            values = [by[b, batch].get(key) for b in backends]
            row = [batch] + [_fmt_rate(v) for v in values]
            if ratio:
                q, a = by["quick", batch].get(key), by["awq", batch].get(key)
                row.append(f"{q / a:.2f}x" if q and a else "-")
            rows.append(row)
        lines += ["", title, _table(["batch"] + backends + (["quick/awq"] if ratio else []), rows)]
    if r["accuracy"]:
        rows = [[a["backend"], a["weights"], _fmt_err(a["vs_fp32"]), _fmt_err(a["vs_same_weights"])]
                for a in r["accuracy"]]
        lines += ["", f"relative error ||y - ref|| / ||ref|| of the stack output, batch 1 prefill; refs are the "
                      f"float32 NumPy stack with float weights, and with this row's weights",
                  _table(["backend", "weights", "vs float32 reference", "vs same weights in NumPy"], rows)]
    return "\n".join(lines)


def _fmt_rate(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _fmt_err(v) -> str:
    return "-" if v is None else f"{v:.2e}"

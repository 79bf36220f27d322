"""A Llama-family decoder stack on 4-bit weights: the end-to-end check and benchmark of the GEMM kernels.

One decoder block, written once against an array module ``xp`` (NumPy float32 on the CPU, CuPy
float16 or bfloat16 on the GPU: the model's ``dtype``)::

    x ──┬─ RMSNorm ─ qkv (one fused linear) ─ rope(q, k) ─ causal GQA attention (+KV cache) ─ o ─(+)─┐
        └──────────────────────────────────────────────────────────────────────────────────────────┘
    x ──┬─ RMSNorm ─ gate|up (one fused linear) ─ silu(gate) * up ─ down ─(+)─┐
        └─────────────────────────────────────────────────────────────────────┘

The families that share this block (Llama 2 and 3.x, Mistral, Qwen2/2.5) are rows of
:data:`quickcupy.llama.families.FAMILIES`; what a row switches on is a field of
:class:`LlamaConfig` applied here: rope scaling (:func:`rope_tables`), a sliding attention window
(:func:`causal_bias`, the decode kernel's ``window``), biases on projections, tied embeddings.
Each projection may also carry an act-order perm (``x[..., perm] @ W.T``); projections sharing
their input fuse when their perms agree (:func:`fused_linear`).

The linear layers come from :func:`make_linear` by backend name: ``"numpy"`` (float32 reference,
``y = x @ W.T``), ``"dense"`` (16-bit weights in the model's dtype, cuBLAS through ``cupy.matmul``;
``"fp16"`` is its float16-only name from before bfloat16), ``"awq"`` and ``"quick"``
(:class:`quickcupy.gemm.QuantLinear` with that layout). The input of the stack is hidden states
(batch, seq, hidden); :class:`LlamaModel` with :class:`HeadWeights` adds the embedding, the final
norm and the LM head. Decode attention on the GPU is the library kernel
:func:`quickcupy.attention.decode_attention`.

Weights are random (:func:`random_layers`) or read from an AutoAWQ checkpoint directory
(:mod:`quickcupy.llama.checkpoint`). The tool ``python -m quickcupy llama``
(:mod:`quickcupy.tools.llama_bench`) times prefill and decode for dense, AWQ and QUICK side by side.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Union

import numpy as np

from .. import dtypes, kernels
from ..attention import decode_attention, decode_attention_rope, decode_head_dim_error
from ..gemm import QuantLinear, gemm
from ..quantize import QuantizedWeight, quantize
from . import families, ops

BACKENDS = ("numpy", "dense", "fp16", "awq", "quick", "auto")
# Backends whose GEMMs are cuBLAS (cupy.matmul on 16-bit weights): "fp16" is "dense" held to float16.
DENSE_BACKENDS = ("dense", "fp16")
# Activation dtypes of the GPU backends: quickcupy.dtypes.NAMES ("numpy" runs float32 whatever is asked).
# 4-bit backends -> (weight layout, gemm kernel): "awq"/"quick" run their design (the paper's
# comparison); "auto" runs quickcupy.gemm's choice by M (the decode kernel for small batches).
QUANTIZED_BACKENDS = {"awq": ("awq", "awq"), "quick": ("quick", "quick"), "auto": ("quick", "auto")}

Weight = Union[np.ndarray, QuantizedWeight]   # (out_features N, in_features K) float, or 4-bit


# ------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LlamaConfig:
    """Model dimensions and family features, with the Hugging Face ``config.json`` names.

    model_type: the family (a row of :data:`quickcupy.llama.families.FAMILIES`: "llama", "mistral",
    "qwen2"). rope_scaling: None or :class:`~quickcupy.llama.families.RopeScaling` (a config.json
    dict is converted). sliding_window: None, or W: query position i attends to key positions j with
    i - W < j <= i (Mistral; other families refuse it). attention_bias, mlp_bias: the family's bias
    flags (None: the family's value; :attr:`bias_projections` says which projections they cover).
    tie_word_embeddings: the LM head is embed_tokens (:class:`HeadWeights` then has lm_head None).
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    model_type: str = "llama"
    rope_scaling: families.RopeScaling | None = None
    sliding_window: int | None = None
    attention_bias: bool | None = None
    mlp_bias: bool | None = None
    tie_word_embeddings: bool = False

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
        row = families.family(self.model_type)
        object.__setattr__(self, "rope_scaling", families.RopeScaling.from_dict(self.rope_scaling))
        for name, value in row.fixed.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
            elif getattr(self, name) != value:
                raise ValueError(f"model_type={self.model_type!r} always has {name}={value}, "
                                 f"got {getattr(self, name)!r}")
        for name, projections in (("attention_bias", row.attention_bias), ("mlp_bias", row.mlp_bias)):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, False)
            elif not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {value!r}")
            elif value and not projections:
                raise ValueError(f"model_type={self.model_type!r} has no {name}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        window = self.sliding_window
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window <= 0:
                raise ValueError(f"sliding_window must be None or a positive int, got {window!r}")
            if not row.sliding_window:
                raise ValueError(f"model_type={self.model_type!r} has no sliding window; sliding_window "
                                 f"must be None, got {window}")
            object.__setattr__(self, "sliding_window", int(window))
        if not isinstance(self.tie_word_embeddings, (bool, np.bool_)):
            raise ValueError(f"tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
        object.__setattr__(self, "tie_word_embeddings", bool(self.tie_word_embeddings))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def family(self) -> families.Family:
        return families.FAMILIES[self.model_type]

    @property
    def bias_projections(self) -> tuple:
        """The projections whose bias the config's flags switch on (in PROJECTIONS order)."""
        row = self.family
        on = (row.attention_bias if self.attention_bias else ()) + (row.mlp_bias if self.mlp_bias else ())
        return tuple(name for name in PROJECTIONS if name in on)

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
        """The fields as config.json holds them (rope_scaling as its dict): ``LlamaConfig(**d)`` and
        :meth:`from_dict` both give the config back."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` dict, by the rules of its ``model_type``'s row of
        :data:`~quickcupy.llama.families.FAMILIES` (keys the computation does not use are ignored;
        transformers' defaults apply). ValueError names a refused key and the rule."""
        config = cls(**families.config_kwargs(d))
        if d.get("head_dim") not in (None, config.head_dim):
            raise ValueError(f"head_dim={d['head_dim']} differs from hidden_size / num_attention_heads = "
                             f"{config.head_dim}; such models are not supported")
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
# Published configurations of other models of the families (quickcupy.llama.families), for their
# GEMM shapes (bench --models, the GPU shape tests); "7b", "13b", "70b" above are Llama-2's.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
MODELS = {
    "llama2-7b": PRESETS["7b"], "llama2-13b": PRESETS["13b"], "llama2-70b": PRESETS["70b"],
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32, rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama3-70b": dict(PRESETS["70b"], rope_theta=500000.0),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        num_hidden_layers=32, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=32, rms_norm_eps=1e-5, rope_theta=1000000.0, model_type="mistral"),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                       num_hidden_layers=28, rms_norm_eps=1e-6, rope_theta=1000000.0, model_type="qwen2"),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=8,
                        num_hidden_layers=48, rms_norm_eps=1e-6, rope_theta=1000000.0, model_type="qwen2"),
}


def gemm_shapes(config) -> dict:
    """(K, N) of the four GEMMs of one block as the runner fuses them: qkv, o, gate|up, down."""
    H, I, d = config.hidden_size, config.intermediate_size, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    return {"qkv": (H, (nh + 2 * nkv) * d), "o": (nh * d, H), "gate_up": (H, 2 * I), "down": (I, H)}


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
    biases: projection name -> (out_features,) float bias (Qwen2's q/k/v); absent names have none
    (those of ``config.bias_projections`` must be present; others are allowed).
    perms: projection name -> (in_features,) int64 act-order permutation (the projection computes
    ``x[..., perm] @ W.T``, see :mod:`quickcupy.formats.act_order`); absent names have none.
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
    biases: dict = dataclasses.field(default_factory=dict)
    perms: dict = dataclasses.field(default_factory=dict)

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
        shapes = projection_shapes(config)
        for kind, table, axis in (("bias", self.biases, 0), ("perm", self.perms, 1)):
            for name, a in table.items():
                if name not in shapes:
                    raise ValueError(f"{where} has a {kind} for {name!r}, which is not a projection "
                                     f"({', '.join(PROJECTIONS)})")
                if np.shape(a) != (shapes[name][axis],):
                    raise ValueError(f"{where} {name} {kind} has shape {np.shape(a)}, the config needs "
                                     f"({shapes[name][axis]},)")
        missing = [name for name in config.bias_projections if name not in self.biases]
        if missing:
            raise ValueError(f"{where} has no bias for {', '.join(missing)}, which model_type="
                             f"{config.model_type!r} with attention_bias={config.attention_bias}, "
                             f"mlp_bias={config.mlp_bias} has")


def random_layers(config: LlamaConfig, seed: int = 0, std: float = 0.02) -> list:
    """``config.num_hidden_layers`` layers of random float32 weights at the usual init scale
    (normal, std 0.02) and norm weights near 1 (float16); the projections of
    ``config.bias_projections`` get a float32 bias (normal, std * sqrt(in_features): the scale of
    the product on inputs of rms 1)."""
    rng = np.random.default_rng(seed)
    layers = []
    shapes = projection_shapes(config)
    for _ in range(config.num_hidden_layers):
        tensors = {}
        for name, shape in shapes.items():
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(std)
            tensors[name] = w
        for name in NORMS:
            tensors[name] = (1 + 0.05 * rng.standard_normal(config.hidden_size)).astype(np.float16)
        # Drawn last, so a config without biases gets the weights it always got from a seed.
        biases = {name: (std * math.sqrt(shapes[name][1]) * rng.standard_normal(shapes[name][0])).astype(np.float32)
                  for name in config.bias_projections}
        layers.append(LayerWeights(**tensors, biases=biases))
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


def fuse_biases(biases: list, out_features: list):
    """The bias of :func:`fuse`'s concatenation: None when no member has one, else the biases
    (float32) concatenated, zeros for a member without one (``out_features``: each member's N)."""
    if all(b is None for b in biases):
        return None
    return np.concatenate([np.zeros(n, np.float32) if b is None else np.asarray(b, np.float32)
                           for b, n in zip(biases, out_features)])


def same_perm(a, b) -> bool:
    """Whether two act-order perms (None or (K,) ints) gather x alike (None: the identity)."""
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a, b)


# ------------------------------------------------------------------------------------ linear layers
def _check_bias_perm(bias, perm, N: int, K: int):
    """bias (N,) finite floats, perm a permutation of range(K) (each may be None); ValueError else.
    Returns them as float32 / int64 NumPy arrays."""
    if bias is not None:
        bias = np.asarray(bias.get() if hasattr(bias, "get") else bias)
        # bfloat16 (ml_dtypes' type, as checkpoints are read) has kind "V", not "f".
        if bias.shape != (N,) or not (bias.dtype.kind == "f" or bias.dtype.name == "bfloat16"):
            raise ValueError(f"bias must be a float (out_features,) = ({N},) array, got {bias.dtype} {bias.shape}")
        bias = bias.astype(np.float32)
        if not np.isfinite(bias).all():
            raise ValueError("bias has NaN or inf values")
    if perm is not None:
        perm = np.asarray(perm.get() if hasattr(perm, "get") else perm)
        if perm.shape != (K,) or perm.dtype.kind not in "iu" or not np.array_equal(np.sort(perm), np.arange(K)):
            raise ValueError(f"perm must be a permutation of range(in_features={K}), got {perm.dtype} {perm.shape}")
        perm = perm.astype(np.int64)
    return bias, perm


class NumpyLinear:
    """Float32 reference on the CPU: x (..., K) float32 -> x[..., perm] @ W.T + bias (..., N)
    float32 (perm, bias: None or as :func:`make_linear` takes them). Every linear of the runner
    also takes ``silu_mul=True``: x is then (..., 2K) [gate | up] and silu(gate) * up its input."""

    def __init__(self, weight: np.ndarray, bias=None, perm=None):
        self.weight = np.ascontiguousarray(weight, np.float32)      # (N, K)
        self.out_features, self.in_features = self.weight.shape
        self.bias, self.perm = _check_bias_perm(bias, perm, self.out_features, self.in_features)

    def __call__(self, x, silu_mul=False):
        x = _gated(x) if silu_mul else x
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        # A 2-D product is one BLAS call; a 3-D one may loop over the batch.
        y = x2 @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class DenseLinear:
    """cuBLAS GEMM of 16-bit weights (float32 accumulation): x (..., K) cupy ``dtype`` (float16 or
    bfloat16) -> x[..., perm] @ W.T + bias (..., N) of that dtype. The perm is folded into the
    weight's columns once (no gather per call); the bias is added after the GEMM, in float32.
    Not capturable in a CUDA graph (CuPy raises NotImplementedError for cuBLAS under capture)."""

    def __init__(self, weight: np.ndarray, dtype="float16", bias=None, perm=None):
        import cupy
        w = np.asarray(weight, np.float32)
        bias, perm = _check_bias_perm(bias, perm, *w.shape)
        if perm is not None:
            # x[..., perm] @ W.T == x @ W'.T with W'[:, perm] = W
            folded = np.empty_like(w)
            folded[:, perm] = w
            w = folded
        # W.T stored (K, N) row-major so the product is x @ W_t with both operands contiguous.
        self.weight_t = cupy.ascontiguousarray(cupy.asarray(w.astype(dtypes.np_dtype(dtype))).T)
        self.in_features, self.out_features = self.weight_t.shape
        self.bias = None if bias is None else cupy.asarray(bias)     # float32

    def __call__(self, x, silu_mul=False):
        x = _gated(x) if silu_mul else x
        # 2-D: one GEMM; cupy.matmul of (B, S, K) @ (K, N) would run B broadcast GEMMs instead.
        y = x.reshape(-1, self.in_features) @ self.weight_t
        if self.bias is not None:        # added in float32 (bfloat16 arithmetic goes through it anyway)
            y = (y.astype(np.float32) + self.bias).astype(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class QuantizedLinear:
    """4-bit GEMM of :mod:`quickcupy.gemm`: x (..., K) cupy float16 or bfloat16 -> x[..., perm] @ W.T
    + bias (..., N) of x's dtype (one layer serves both; the bias is added in the GEMM's epilogue,
    the perm is a gather of x). Under CUDA-graph capture ``auto`` keeps to the kernels a graph can
    hold (:func:`quickcupy.gemm`)."""

    def __init__(self, q: QuantizedWeight, layout: str, kernel: str, bias=None, perm=None):
        self.layer = QuantLinear.from_quantized(q, layout, bias, perm)
        self.kernel = kernel
        self.out_features, self.in_features = q.out_features, q.in_features

    def __call__(self, x, silu_mul=False):
        import cupy
        x2 = cupy.ascontiguousarray(x.reshape(-1, x.shape[-1]))
        if x2.data.ptr % 16:                 # the kernels load 16-byte vectors; a view may be offset
            x2 = x2.copy()
        y = gemm(x2, self.layer, kernel=self.kernel, silu_mul=silu_mul)   # fused where the kernel has it
        return y.reshape(*x.shape[:-1], self.out_features)


class ConcatLinear:
    """Projections of one input that cannot be fused (their act-order perms differ): a linear
    each, outputs concatenated along the last axis (correct; a GEMM per member and a copy)."""

    def __init__(self, linears: list):
        self.linears = linears
        self.in_features = linears[0].in_features
        self.out_features = sum(layer.out_features for layer in linears)

    def __call__(self, x, silu_mul=False):
        x = _gated(x) if silu_mul else x
        return _xp(x).concatenate([layer(x) for layer in self.linears], axis=-1)


def make_linear(backend: str, weight: Weight, group_size: int = 128, dtype="float16", bias=None, perm=None):
    """A linear layer ``y = x[..., perm] @ W.T + bias`` of ``weight`` (N, K) on ``backend``, for
    activations of ``dtype`` (the dense backend stores its weights in it; "numpy" is float32).
    bias: None or (N,) float (float16, bfloat16 or float32); perm: None or an act-order permutation
    (K,) of range(K) (:mod:`quickcupy.formats.act_order`).

    Float weights are quantized (with ``group_size``) for the 4-bit backends; quantized weights are
    dequantized for "numpy" and the dense backends.
    """
    dtype = check_dtype(backend, dtype)
    bias, perm = _check_bias_perm(bias, perm, *_shape(weight))
    if backend == "numpy" or backend in DENSE_BACKENDS:
        if isinstance(weight, QuantizedWeight):
            weight = weight.dequantize(np.float32)
        return NumpyLinear(weight, bias, perm) if backend == "numpy" else DenseLinear(weight, dtype, bias, perm)
    if not isinstance(weight, QuantizedWeight):
        weight = quantize(np.asarray(weight, np.float32), group_size)
    # The bias in the activations' dtype, so that bfloat16 models round it once (QuantLinear keeps a
    # bfloat16 bias as it is, any other as float16).
    bias = None if bias is None else bias.astype(dtypes.np_dtype(dtype))
    return QuantizedLinear(weight, *QUANTIZED_BACKENDS[backend], bias=bias, perm=perm)


def fused_linear(weights: "LayerWeights", names: tuple, linear):
    """One linear for the projections ``names`` of ``weights``, which share their input (q|k|v,
    gate|up): their weights and biases fused (:func:`fuse`, :func:`fuse_biases`) when they share
    their act-order perm; else each run of neighbours sharing one is fused, and a
    :class:`ConcatLinear` joins the runs. linear(weight, bias, perm) builds one (:func:`make_linear`
    on the block's backend)."""
    runs = []                            # [names] of neighbours with one perm
    for name in names:
        if runs and same_perm(weights.perms.get(runs[-1][0]), weights.perms.get(name)):
            runs[-1].append(name)
        else:
            runs.append([name])
    layers = []
    for run in runs:
        ws = [getattr(weights, name) for name in run]
        bias = fuse_biases([weights.biases.get(name) for name in run], [_shape(w)[0] for w in ws])
        layers.append(linear(ws[0] if len(ws) == 1 else fuse(ws), bias, weights.perms.get(run[0])))
    return layers[0] if len(layers) == 1 else ConcatLinear(layers)


def check_backend(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")


def check_dtype(backend: str, dtype) -> str:
    """The activation dtype's NumPy name, checked against the backend: "float16" or "bfloat16"
    (backend "fp16" takes float16 only: "dense" is its bfloat16-capable name)."""
    check_backend(backend)
    name = dtypes.name(dtype)
    if backend == "fp16" and name != "float16":
        raise ValueError(f"backend='fp16' runs float16 only, got dtype={name}; use backend='dense' "
                         f"for {name} cuBLAS")
    return name


def array_module(backend: str, dtype="float16"):
    """(xp, activation dtype) of a backend: NumPy float32 for "numpy", CuPy ``dtype`` otherwise
    (float16, or bfloat16 as ml_dtypes' NumPy type, which CuPy uses)."""
    name = check_dtype(backend, dtype)
    if backend == "numpy":
        return np, np.dtype(np.float32)
    import cupy
    return cupy, dtypes.np_dtype(name)


# ----------------------------------------------------------------------------------- block pieces
def rms_norm(x, weight, eps: float):
    """x (..., H) -> x / rms(x) * weight, the mean square taken in float32 (as Hugging Face does)."""
    xp = _xp(x)
    x32 = x.astype(np.float32, copy=False)
    inv_rms = 1 / xp.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + np.float32(eps))
    return (x32 * inv_rms).astype(x.dtype, copy=False) * weight


def rope_tables(config: LlamaConfig, positions: np.ndarray):
    """cos, sin (len(positions), head_dim / 2) float32 of rotary angles pos * inv_freq[i], where
    inv_freq[i] = theta^(-2i / head_dim), scaled as ``config.rope_scaling`` says (linear, llama3).

    Computed in float64 on the host, so the NumPy and CuPy blocks rotate by identical angles.
    """
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if config.rope_scaling is not None:
        inv_freq = config.rope_scaling.apply(inv_freq)
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


def causal_bias(xp, start: int, S: int, T: int, window: int | None = None):
    """(S, T) float32: 0 where key j may be seen by query start + i, else -inf: j <= start + i, and
    with a sliding ``window`` also j > start + i - window (Mistral's rule). None when every query
    sees every key. Also hides the cache's unwritten slots (j >= start + S)."""
    if T - 1 <= start and (window is None or start + S - 1 - window < 0):
        return None
    j, i = xp.arange(T)[None, :], (start + xp.arange(S))[:, None]
    hidden = j > i
    if window is not None:
        hidden |= j <= i - window
    return xp.where(hidden, -np.inf, 0.0).astype(np.float32)


def attention(q, k, v, start: int = 0, kv_cache=None, bias="auto", fused: bool = True, written: bool = False,
              window: int | None = None):
    """Causal grouped-query attention, optionally over a sliding window of keys.

    q: (B, S, n_heads, d); k, v: (B, S, n_kv_heads, d), rotated, for positions start .. start+S-1.
    kv_cache: None, or (keys (B, n_kv, d, max_len), values (B, n_kv, max_len, d)) of one layer;
    this call writes its k, v at [start, start + S). Returns (B, S, n_heads * d), q's dtype.
    Query head h reads KV head h // (n_heads / n_kv_heads), as Hugging Face's ``repeat_kv``.
    bias: :func:`causal_bias` for these positions ("auto": computed here; a model computes it once
    for all its layers).
    fused: a decode step on CuPy (S == 1, a float16 or bfloat16 cache of q's dtype, head_dim a multiple
    of 32 in 64..256) runs
    :func:`decode_attention` (one kernel; bias unused); False, or any other case, runs the batched
    matmuls below, the reference it is tested against.
    written: k and v are already in kv_cache at [start, start + S) (:func:`ops.rope_cache` wrote them).
    window: None, or W: query position i sees keys i - W < j <= i (the bias, and the fused kernel).
    """
    xp = _xp(q)
    B, S, nh, d = q.shape
    nkv = k.shape[2]
    group = nh // nkv
    k_t = k.transpose(0, 2, 3, 1)                    # (B, nkv, d, S)
    v_t = v.transpose(0, 2, 1, 3)                    # (B, nkv, S, d)
    if kv_cache is not None:
        cache_k, cache_v = kv_cache
        if not written:
            cache_k[..., start:start + S] = k_t
            cache_v[:, :, start:start + S] = v_t
        if (fused and S == 1 and xp is not np and q.dtype == cache_k.dtype == cache_v.dtype
                and q.dtype.name in dtypes.NAMES and decode_head_dim_error(d) is None):
            return decode_attention(q.reshape(B, nh, d), cache_k, cache_v, start + 1, window=window)
    if kv_cache is None or start == 0:               # as attended_length() says
        keys, values = xp.ascontiguousarray(k_t), xp.ascontiguousarray(v_t)
    else:
        keys, values = cache_k, cache_v
    T = keys.shape[-1]
    if isinstance(bias, str):
        bias = causal_bias(xp, start, S, T, window)

    def matmul(a, b):
        # CuPy 14.2 takes bfloat16 for an integer type in batched (ndim > 2) matmul and fails ("data
        # type 'E' not understood"): such products run on float32 copies, which hold bfloat16 exactly.
        if xp is not np and a.dtype.name == "bfloat16":
            return xp.matmul(a.astype(np.float32), b.astype(np.float32))
        return xp.matmul(a, b)

    # The `group` query heads sharing one KV head become rows of one matrix: a batched GEMM per KV head.
    qg = xp.ascontiguousarray(q.transpose(0, 2, 1, 3)).reshape(B, nkv, group * S, d)
    scores = matmul(qg, keys).astype(np.float32, copy=False)             # (B, nkv, group*S, T)
    scores *= np.float32(1 / math.sqrt(d))
    scores = scores.reshape(B, nkv, group, S, T)
    if bias is not None:
        scores += bias
    scores -= scores.max(axis=-1, keepdims=True)                          # softmax in float32
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = matmul(scores.astype(q.dtype).reshape(B, nkv, group * S, T), values)     # (B, nkv, group*S, d)
    out = out.reshape(B, nh, S, d).transpose(0, 2, 1, 3).reshape(B, S, nh * d)
    return xp.ascontiguousarray(out).astype(q.dtype, copy=False)


def silu_mul(gate, up):
    """silu(gate) * up in float32, returned in gate's dtype. Shapes (..., I)."""
    xp = _xp(gate)
    g = gate.astype(np.float32, copy=False)
    return (g / (1 + xp.exp(-g)) * up).astype(gate.dtype, copy=False)


def _gated(gate_up):
    """silu(gate) * up of gate_up (..., 2I) = [gate | up], for a linear whose GEMM cannot take it
    in: :func:`ops.silu_mul`'s kernel on CuPy (float16, bfloat16), :func:`silu_mul` otherwise."""
    if _xp(gate_up) is np or gate_up.dtype == np.float32:
        I = gate_up.shape[-1] // 2
        return silu_mul(gate_up[..., :I], gate_up[..., I:])
    return ops.silu_mul(gate_up)


def _xp(a):
    return np if isinstance(a, np.ndarray) else sys.modules["cupy"]


def _device(xp, a, dtype):
    """A float host array (float16 norms, embeddings) on ``xp`` as ``dtype`` (through float32, the
    one conversion NumPy and ml_dtypes' bfloat16 both have)."""
    return xp.asarray(np.asarray(a, np.float32).astype(dtype))


# ----------------------------------------------------------------------------------------- the stack
class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``max_len`` positions.

    keys[i]: (batch, n_kv_heads, head_dim, max_len), stored transposed so q @ keys is a GEMM on a
    contiguous operand; values[i]: (batch, n_kv_heads, max_len, head_dim). Zero-filled: unwritten
    slots get probability 0, and 0 * garbage could be NaN. ``length``: positions written so far.
    On the GPU, max_len is rounded up to a multiple of 8, so rows of K^T start 16-byte aligned and
    the decode attention copies them in 16-byte chunks.
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, xp=np, dtype=np.float32,
                 num_layers: int | None = None):
        n = config.num_hidden_layers if num_layers is None else num_layers
        nkv, d = config.num_key_value_heads, config.head_dim
        if xp is not np:
            max_len = -(-max_len // 8) * 8
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.keys = [xp.zeros((batch, nkv, d, max_len), dtype) for _ in range(n)]
        self.values = [xp.zeros((batch, nkv, max_len, d), dtype) for _ in range(n)]
        # On the GPU, the position of the next token also lives in device memory (int32 (1,)): the
        # kernels read it there, so a captured decode step replays at every position.
        self.start_dev = None if xp is np else xp.zeros(1, np.int32)

    @staticmethod
    def nbytes(config: LlamaConfig, batch: int, max_len: int, itemsize: int = 2, num_layers=None) -> int:
        n = config.num_hidden_layers if num_layers is None else num_layers
        return 2 * n * batch * config.num_key_value_heads * config.head_dim * max_len * itemsize

    def reset(self):
        """Forgets the sequences (old entries stay, finite, and are masked until overwritten)."""
        self.length = 0


class LlamaBlock:
    """One decoder layer on one backend. Call with x (B, S, hidden) in the backend's dtype
    (float32 for "numpy", else ``dtype``: float16 or bfloat16)."""

    # Tensor parallelism (quickcupy.llama.parallel): sums the partial outputs of the row-parallel
    # o_proj and down_proj across ranks (in place, returning the sum) before the residual adds;
    # None on one device.
    reduce = None

    def __init__(self, config: LlamaConfig, weights: LayerWeights, backend: str = "numpy",
                 group_size: int = 128, dtype="float16"):
        weights.check(config)
        self.config = config
        self.xp, self.dtype = array_module(backend, dtype)
        linear = lambda w, bias, perm: make_linear(backend, w, group_size, dtype, bias, perm)  # noqa: E731
        # q|k|v and gate|up each become one GEMM: one launch and one pass over x instead of three/two
        # (unless their act-order perms differ: fused_linear).
        self.qkv_proj = fused_linear(weights, ("q_proj", "k_proj", "v_proj"), linear)
        self.o_proj = fused_linear(weights, ("o_proj",), linear)
        self.gate_up_proj = fused_linear(weights, ("gate_proj", "up_proj"), linear)
        self.down_proj = fused_linear(weights, ("down_proj",), linear)
        self.input_norm = _device(self.xp, weights.input_layernorm, self.dtype)
        self.post_norm = _device(self.xp, weights.post_attention_layernorm, self.dtype)

    def __call__(self, x, cos, sin, start: int = 0, kv_cache=None, bias="auto"):
        """x (B, S, hidden) at positions start.. -> (B, S, hidden); cos, sin (S, head_dim/2) float32;
        bias: see :func:`attention`."""
        c = self.config
        B, S, _ = x.shape
        nh, nkv, I = c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
        qkv = self.qkv_proj(rms_norm(x, self.input_norm, c.rms_norm_eps)).reshape(B, S, nh + 2 * nkv, c.head_dim)
        qk = apply_rope(qkv[:, :, :nh + nkv], cos, sin)        # q and k heads rotated in one pass
        attn = attention(qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv:], start, kv_cache, bias,
                         window=c.sliding_window)
        x = x + self._reduced(self.o_proj(attn))
        gate_up = self.gate_up_proj(rms_norm(x, self.post_norm, c.rms_norm_eps))
        return x + self._reduced(self.down_proj(silu_mul(gate_up[..., :I], gate_up[..., I:])))

    def step(self, x, delta, tables, start: int, start_dev, kv_cache=None, bias="auto"):
        """The GPU block from fused kernels (:mod:`quickcupy.llama.ops`), returning its output
        *increment*: x (B, S, hidden) (float16 or bfloat16) is the residual stream, to which ``delta``
        (the previous block's increment, or None) is added in place by the first RMSNorm. tables:
        the model's full (cos, sin) tables; start_dev: (1,) int32 device array holding ``start``.
        A decode step (S == 1 with a cache) reads positions only from start_dev: capturable; its
        rotary embedding and cache write run inside the attention kernel, and silu(gate) * up inside
        the down GEMM where its kernel has the prologue (quick_decode's register pipeline: 3
        launches per layer besides the GEMMs, norm, attention, norm; else 4, silu * up apart).
        """
        c = self.config
        B, S, _ = x.shape
        nh, nkv, d, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        qkv = self.qkv_proj(ops.add_rms_norm(x, self.input_norm, eps, delta)).reshape(B, S, nh + 2 * nkv, d)
        cache_k, cache_v = (None, None) if kv_cache is None else kv_cache
        if kv_cache is not None and S == 1 and decode_head_dim_error(d) is None:
            attn = decode_attention_rope(qkv, cache_k, cache_v, *tables, nh, 1, start=start_dev,
                                         window=c.sliding_window)
        else:
            qk = ops.rope_cache(qkv, *tables, start_dev, nh, nkv, cache_k, cache_v)
            attn = attention(qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv:], start, kv_cache, bias,
                             written=True, window=c.sliding_window)
        h = ops.add_rms_norm(x, self.post_norm, eps, self._reduced(self.o_proj(attn)))
        return self._reduced(self.down_proj(self.gate_up_proj(h), silu_mul=True))

    def _reduced(self, y):
        return y if self.reduce is None else self.reduce(y)


@dataclass
class HeadWeights:
    """The tensors around the stack: embed_tokens (vocab, hidden) float, norm (hidden,) float16,
    lm_head (vocab, hidden) float or :class:`QuantizedWeight`, or None when tied to embed_tokens
    (exactly when the config's tie_word_embeddings is true)."""

    embed_tokens: np.ndarray
    norm: np.ndarray
    lm_head: Weight | None = None

    def check(self, config: LlamaConfig):
        V, H = np.shape(self.embed_tokens)[0], config.hidden_size
        if np.ndim(self.embed_tokens) != 2 or np.shape(self.embed_tokens)[1] != H:
            raise ValueError(f"embed_tokens has shape {np.shape(self.embed_tokens)}, the config needs (vocab, {H})")
        if np.shape(self.norm) != (H,):
            raise ValueError(f"norm has shape {np.shape(self.norm)}, the config needs ({H},)")
        if self.lm_head is not None and _shape(self.lm_head) != (V, H):
            raise ValueError(f"lm_head has shape {_shape(self.lm_head)}, embed_tokens needs ({V}, {H})")
        if (self.lm_head is None) != config.tie_word_embeddings:
            raise ValueError(f"lm_head is {'None (tied to embed_tokens)' if self.lm_head is None else 'given'} "
                             f"but the config's tie_word_embeddings is {config.tie_word_embeddings}: "
                             f"a tied model's head has lm_head None, an untied one's has its own")


def random_head(config: LlamaConfig, vocab_size: int, seed: int = 0, std: float = 0.02) -> HeadWeights:
    """Random embedding and LM head (normal, std ``std``; none when the config ties them) and a
    final norm near 1."""
    rng = np.random.default_rng(seed)
    shape = (vocab_size, config.hidden_size)
    embed = (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
    norm = (1 + 0.05 * rng.standard_normal(config.hidden_size)).astype(np.float16)
    lm_head = std * rng.standard_normal(shape, dtype=np.float32)
    return HeadWeights(embed, norm, None if config.tie_word_embeddings else lm_head)


class LlamaModel:
    """A stack of decoder blocks on one backend (see BACKENDS), optionally with its embedding,
    final norm and LM head (``head``: :class:`HeadWeights`), which :meth:`logits` and
    :meth:`generate` need.

    layers: list of :class:`LayerWeights`, float or quantized (converted as :func:`make_linear`
    says); its length must equal ``config.num_hidden_layers``. dtype: the activations' on the GPU,
    "float16" or "bfloat16" (the NumPy backend computes in float32 whatever is asked). A float LM
    head stays dense (cuBLAS, in ``dtype``) on every GPU backend; a quantized one runs the backend's
    4-bit GEMM.
    """

    def __init__(self, config: LlamaConfig, layers: list, backend: str = "numpy", group_size: int = 128,
                 head: HeadWeights | None = None, dtype="float16"):
        if len(layers) != config.num_hidden_layers:
            raise ValueError(f"got {len(layers)} layers of weights but num_hidden_layers="
                             f"{config.num_hidden_layers}")
        for i, w in enumerate(layers):
            w.check(config, where=f"layer {i}")
        self.config, self.backend = config, backend
        self.xp, self.dtype = array_module(backend, dtype)
        self.blocks = [LlamaBlock(config, w, backend, group_size, dtype) for w in layers]
        self._cos = self._sin = None
        self.head = head is not None
        if head is not None:
            head.check(config)
            self.vocab_size = head.embed_tokens.shape[0]
            self.embed = _device(self.xp, head.embed_tokens, self.dtype)
            self.final_norm = _device(self.xp, head.norm, self.dtype)
            lm = head.embed_tokens if head.lm_head is None else head.lm_head
            self.lm_head = make_linear(backend if isinstance(lm, QuantizedWeight) or backend == "numpy"
                                       else "dense", lm, group_size, dtype)
        if self.xp is not np:
            self._zero = self.xp.zeros(1, np.int32)     # start_dev of a pass without a cache
        self._graphs = {}     # batch -> DecodeGraph

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

    def _positions(self, x, cache):
        B, S, _ = x.shape
        if cache is None:
            return 0
        if cache.batch != B:
            raise ValueError(f"the cache holds batch={cache.batch} sequences, x has batch={B}")
        if cache.length + S > cache.max_len:
            raise ValueError(f"{cache.length} cached + {S} new positions exceed the cache's max_len={cache.max_len}")
        return cache.length

    def _stack_gpu(self, x, cache, fill_start: bool = True):
        """The blocks on the GPU: x (B, S, hidden) float16 C-contiguous, modified in place.
        Returns (x, delta): the hidden states are x + delta (the last add is left to the caller,
        which fuses it into the final norm). fill_start=False: cache.start_dev already holds the
        position (a captured step reads it there)."""
        B, S, _ = x.shape
        start = self._positions(x, cache)
        if cache is not None and fill_start:
            cache.start_dev.fill(start)
        start_dev = self._zero if cache is None else cache.start_dev
        self._rope(start, S)
        decode = cache is not None and S == 1 and decode_head_dim_error(self.config.head_dim) is None
        bias = None if decode else causal_bias(
            self.xp, start, S, attended_length(S, start, None if cache is None else cache.max_len),
            self.config.sliding_window)
        delta = None
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            delta = block.step(x, delta, (self._cos, self._sin), start, start_dev, kv, bias)
        return x, delta

    def __call__(self, x, cache: KVCache | None = None):
        """x (B, S, hidden) -> (B, S, hidden), in the backend's array module and dtype
        (NumPy input is moved to the GPU). Without a cache: one causal pass over the S positions.
        With a cache: positions continue at ``cache.length`` (prefill, then one token at a time)."""
        x = self.xp.array(x, dtype=self.dtype, order="C")       # a copy: the GPU path adds in place
        if x.ndim != 3 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"x must be (batch, seq, {self.config.hidden_size}), got shape {x.shape}")
        if self.xp is not np:
            x, delta = self._stack_gpu(x, cache)
            x += delta
        else:
            x = self._stack_numpy(x, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return x

    def _stack_numpy(self, x, cache):
        """The blocks on NumPy: x (B, S, hidden) float32 -> hidden states (cache.length unchanged)."""
        S = x.shape[1]
        start = self._positions(x, cache)
        cos, sin = self._rope(start, S)
        bias = causal_bias(np, start, S, attended_length(S, start, None if cache is None else cache.max_len),
                           self.config.sliding_window)
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, cos, sin, start, kv, bias)
        return x

    # --------------------------------------------------------------------------- tokens in, logits out
    def _check_ids(self, token_ids):
        if not self.head:
            raise ValueError("this model has no embedding / LM head: build it with head=HeadWeights(...)")
        ids = token_ids if self.xp is not np and isinstance(token_ids, self.xp.ndarray) else np.asarray(token_ids)
        if ids.ndim != 2 or ids.shape[1] < 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"token_ids must be a (batch, seq) integer array, got {ids.dtype} {ids.shape}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token_ids must lie in 0..{self.vocab_size - 1}")
        return self.xp.asarray(ids, np.int64)

    def _normed_hidden(self, ids, cache, fill_start: bool = True):
        """ids (B, S) int64 on the model's device -> final-normed hidden states (B, S, hidden)."""
        c = self.config
        x = self.xp.take(self.embed, ids, axis=0)               # (B, S, hidden), a new array
        if self.xp is np:
            return rms_norm(self._stack_numpy(x.astype(np.float32), cache), self.final_norm, c.rms_norm_eps)
        x, delta = self._stack_gpu(x, cache, fill_start)
        return ops.add_rms_norm(x, self.final_norm, c.rms_norm_eps, delta)

    def logits(self, token_ids, cache: KVCache | None = None):
        """token_ids (B, S) -> logits (B, S, vocab) (float32 on NumPy, the model's dtype on the GPU)."""
        ids = self._check_ids(token_ids)
        S = ids.shape[1]
        if cache is not None:
            self._positions(ids[..., None], cache)
        h = self._normed_hidden(ids, cache)
        if cache is not None:
            cache.length += S
        return self.lm_head(h)

    def _sample(self, logits, temperature: float, top_k, rng, out=None):
        """logits (B, vocab) -> (B,) int64 token ids: greedy (temperature 0) or sampled."""
        xp = self.xp
        if temperature == 0:
            if xp is np:
                return np.argmax(logits, axis=-1)
            return ops.argmax_rows(xp.ascontiguousarray(logits), out)
        scaled = logits.astype(np.float32) / np.float32(temperature)
        if top_k:
            kth = xp.sort(scaled, axis=-1)[:, -top_k][:, None]
            scaled = xp.where(scaled < kth, np.float32(-np.inf), scaled)
        # Gumbel-max: argmax(logits / T + Gumbel noise) is a sample of softmax(logits / T).
        u = xp.maximum(rng.random(scaled.shape, dtype=np.float32), np.float32(1e-20))
        return xp.argmax(scaled - xp.log(-xp.log(u)), axis=-1)

    def decode_graph(self, cache: KVCache) -> "DecodeGraph":
        """The captured decode step for ``cache`` (captured on first use; again only for a new
        cache, which :meth:`generate` makes only when the batch grows or the length does not fit)."""
        g = self._graphs.get(cache.batch)
        if g is None or g.cache is not cache:
            g = self._graphs[cache.batch] = DecodeGraph(self, cache)
        return g

    def generate(self, token_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 0, graph: bool | None = None):
        """Continues each of the B prompts token_ids (B, S) by ``max_new_tokens`` tokens.

        Greedy when temperature == 0, else samples softmax(logits / temperature), restricted to the
        top_k most likely tokens when top_k is given. graph: run decode steps as one CUDA graph
        replay (:class:`DecodeGraph`); default: on for the 4-bit GPU backends. The fp16 backend runs
        eagerly: its GEMMs are cuBLAS calls, which CuPy cannot capture.
        Returns (B, max_new_tokens) int64 NumPy array (:meth:`stream` gives them step by step).
        """
        out = None
        for i, tok in enumerate(self.stream(token_ids, max_new_tokens, temperature, top_k, seed, graph)):
            if out is None:
                out = self.xp.empty((tok.shape[0], max_new_tokens), np.int64)
            out[:, i] = tok
        return out if self.xp is np else out.get()

    def stream(self, token_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               seed: int = 0, graph: bool | None = None):
        """The tokens of :meth:`generate` (same arguments), one step at a time: an iterator of
        ``max_new_tokens`` (B,) int64 arrays on the model's device, CuPy's not synchronized (reading
        one waits for its step), so that a caller can time the prefill apart or stop early (at an
        end-of-sequence token). The arguments are checked at the call; the prefill runs at the
        first ``next``."""
        ids = self._check_ids(token_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                                  or not 1 <= top_k <= self.vocab_size):
            raise ValueError(f"top_k must be None or an int in 1..{self.vocab_size}, got {top_k!r}")
        capturable = self.backend in QUANTIZED_BACKENDS
        if graph and not capturable:
            raise ValueError(f"graph=True needs a 4-bit GPU backend ({', '.join(QUANTIZED_BACKENDS)}); "
                             f"backend={self.backend!r} runs cuBLAS or NumPy, which cannot be captured")
        return self._steps(ids, max_new_tokens, temperature, top_k, seed, capturable if graph is None else graph)

    def _steps(self, ids, max_new_tokens: int, temperature: float, top_k, seed: int, graph: bool):
        """The generator behind :meth:`stream`, on checked arguments."""
        B, S = ids.shape
        cache = self._cache(B, S + max_new_tokens)
        rng = np.random.default_rng(seed) if self.xp is np else self.xp.random.default_rng(seed)
        tok = self._sample(self.prefill(ids, cache, graph), temperature, top_k, rng)
        yield tok
        for _ in range(1, max_new_tokens):
            tok = self._sample(self.decode_step(tok, cache, graph), temperature, top_k, rng)
            yield tok

    def prefill(self, ids, cache: KVCache, graph: bool = False):
        """ids (B, S) int64 on the model's device, at positions cache.length.. -> logits of the last
        position (B, vocab). graph: the decode steps that follow replay :meth:`decode_graph`."""
        h = self._normed_hidden(ids, cache)
        cache.length += ids.shape[1]
        if graph:
            cache.start_dev.fill(cache.length)     # the graph reads the position there and advances it
        return self.lm_head(h[:, -1])

    def decode_step(self, tok, cache: KVCache, graph: bool = False):
        """tok (B,) int64 on the model's device: the next token of each sequence -> logits (B, vocab).
        graph: one replay of the captured step (after :meth:`prefill` with graph=True)."""
        if graph:
            g = self.decode_graph(cache)
            g.ids[:, 0] = tok
            h = g.replay()
        else:
            h = self._normed_hidden(tok[:, None], cache)
        cache.length += 1
        return self.lm_head(h[:, -1])

    def _cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache for generate, reused (and its graph with it) while batch and length fit."""
        cache = getattr(self, "_gen_cache", None)
        if cache is None or cache.batch != batch or cache.max_len < max_len:
            cache = self._gen_cache = self.new_cache(batch, max(max_len, 256))
        cache.reset()
        return cache


class DecodeGraph:
    """One decode step of the whole model, embedding to final norm (all layers), as a CUDA graph.

    Captured on a non-default stream with its own memory pool and GEMM workspace: one eager step
    first (compiles, fills the pool and the workspace), then the same step under capture, whose
    allocations the pool serves from its cached blocks; neither is shared, so every intermediate
    and scratch buffer stays the graph's for as long as it lives. The step reads the token ids from ``ids`` (B, 1) and
    the position from ``cache.start_dev``, advances the position as its last node, and leaves the
    normed hidden states in ``hidden`` (B, 1, hidden). The LM head and sampling run after it
    (a dense LM head is cuBLAS). Replays on the current stream; the caller adds 1 to cache.length.
    ``pdl``: whether the step was captured with programmatic dependent launch (on sm_90+, only when
    every GEMM of the warm-up step took part in it: :func:`quickcupy.kernels.takes_pdl`).
    """

    def __init__(self, model: LlamaModel, cache: KVCache):
        import cupy
        if model.backend not in QUANTIZED_BACKENDS:
            raise ValueError(f"backend={model.backend!r} cannot be captured (cuBLAS); use awq, quick or auto")
        error = decode_head_dim_error(model.config.head_dim)
        if error:
            raise ValueError(f"a decode graph needs the fused decode attention: {error}")
        self.cache = cache
        model._rope(0, cache.max_len)
        self.tables = (model._cos, model._sin)     # kept alive: the graph reads them
        self.ids = cupy.zeros((cache.batch, 1), np.int64)
        self.pool = cupy.cuda.MemoryPool()
        self.workspace = kernels.Workspace()       # the GEMMs' scratch, as long-lived as the graph
        self.stream = cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.get_current_stream().synchronize()       # cache and ids are ready before the side stream reads them
        with cupy.cuda.using_allocator(self.pool.malloc), self.stream, kernels.using_workspace(self.workspace):
            # The warm-up writes the cache at the current position, which the first replay rewrites.
            with kernels.recording_gemm_pdl() as gemms:
                model._normed_hidden(self.ids, cache, fill_start=False)
            # Programmatic dependent launch only where every GEMM of the step takes part: between
            # GEMMs that do not, the small kernels' attribute cost the quick backend 3% at batch 1
            # (2647 against 2566 us a step, results/h100/llama_decode_ab.txt).
            self.pdl = all(gemms)
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                with kernels.pdl_allowed(self.pdl):
                    self.hidden = model._normed_hidden(self.ids, cache, fill_start=False)
                    ops.advance_position(cache.start_dev)
            finally:
                self.graph = self.stream.end_capture()

    def replay(self):
        import cupy
        self.graph.launch(cupy.cuda.get_current_stream())
        return self.hidden

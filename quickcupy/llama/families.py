"""Model families as rows of one table: what each Hugging Face ``model_type`` adds to the Llama
decoder block, and the rules that read its ``config.json`` into :class:`~quickcupy.llama.LlamaConfig`.

Every family here is the Llama block (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU)
with at most a few features switched on, each a field of LlamaConfig:

=========  =======================  ===============================================================
family     checkpoints              features (config.json keys)
=========  =======================  ===============================================================
llama      Llama 2, 3, 3.1, 3.2     ``attention_bias`` (q/k/v/o), ``mlp_bias``, ``rope_scaling``
                                    ("llama3": 3.1, 3.2), ``tie_word_embeddings`` (3.2 1B/3B)
mistral    Mistral 7B               ``sliding_window`` (v0.1: 4096; v0.2 on: null)
qwen2      Qwen2, Qwen2.5           q/k/v biases always, ``tie_word_embeddings`` (the small ones);
                                    ``use_sliding_window`` true is refused (per-layer windows)
=========  =======================  ===============================================================

``rope_scaling`` (any family, as in transformers): null or rope type "default", "linear" or
"llama3" (:class:`RopeScaling`); other types ("yarn", "dynamic", "longrope", ...) are refused.

Adding a family is one row of :data:`FAMILIES`; a feature no row has yet is one field of
:class:`Family` (and of LlamaConfig), read in :func:`config_kwargs` and applied by the block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

QKV = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """One model family: its transformers class and the features its config.json may switch on."""

    architecture: str                  # config.json's "architectures" entry (the transformers class)
    # The projections config.attention_bias / config.mlp_bias put a bias on (transformers' meaning
    # of the flag in this family); empty: the family has no such flag.
    attention_bias: tuple = ()
    mlp_bias: tuple = ()
    # LlamaConfig field -> the value every model of the family has (qwen2: q/k/v biases).
    fixed: dict = field(default_factory=dict)
    sliding_window: bool = False       # config.sliding_window may be set (else it must be None)
    # config.json key -> transformers' value when the key is absent (where it differs from llama's).
    defaults: dict = field(default_factory=dict)
    # config.json key -> why a true value of it cannot run here.
    refused: dict = field(default_factory=dict)


FAMILIES = {
    "llama": Family("LlamaForCausalLM", attention_bias=QKV + ("o_proj",), mlp_bias=MLP),
    "mistral": Family("MistralForCausalLM", fixed={"attention_bias": False, "mlp_bias": False},
                      sliding_window=True, defaults={"sliding_window": 4096}),
    "qwen2": Family("Qwen2ForCausalLM", attention_bias=QKV, fixed={"attention_bias": True, "mlp_bias": False},
                    refused={"use_sliding_window": "sliding windows on the layers from max_window_layers on "
                                                   "are not implemented"}),
}


def family(model_type) -> Family:
    """The row of ``model_type``; ValueError naming the supported ones otherwise."""
    try:
        return FAMILIES[model_type]
    except (KeyError, TypeError):
        raise ValueError(f"model_type={model_type!r} is not supported; supported: "
                         f"{', '.join(map(repr, FAMILIES))}") from None


# ----------------------------------------------------------------------------------- rope scaling
ROPE_TYPES = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """config.json's ``rope_scaling``, validated: rope_type "linear" (every inverse frequency divided
    by ``factor``) or "llama3" (Llama 3.1's: low frequencies divided by ``factor``, high ones kept,
    a smooth blend between, the band set by ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings``). Both leave the attention scale at 1."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_dict(cls, d) -> "RopeScaling | None":
        """From config.json's dict (transformers' keys; "type" is the older name of "rope_type");
        None for null or rope type "default". ValueError names the key and the rule."""
        if d is None:
            return None
        if isinstance(d, RopeScaling):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"rope_scaling must be null or an object, got {d!r}")
        rope_type = d.get("rope_type", d.get("type"))
        if rope_type == "default":
            return None
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported; supported: "
                             f"{', '.join(map(repr, ROPE_TYPES))} (or null / 'default')")
        keys = ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                              if rope_type == "llama3" else ())
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"rope_scaling of rope_type {rope_type!r} lacks {', '.join(missing)}")
        return cls(rope_type, **{k: d[k] for k in keys})

    def __post_init__(self):
        def number(name, value, rule, ok):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
                    math.isfinite(value) and ok(value)):
                raise ValueError(f"rope_scaling.{name} must be {rule}, got {value!r}")
            return value
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not supported; supported: "
                             f"{', '.join(map(repr, ROPE_TYPES))}")
        object.__setattr__(self, "factor", float(number("factor", self.factor, "a number >= 1", lambda v: v >= 1)))
        if self.rope_type != "llama3":
            for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if getattr(self, name) is not None:
                    raise ValueError(f"rope_scaling.{name} belongs to rope_type 'llama3', not {self.rope_type!r}")
            return
        low = float(number("low_freq_factor", self.low_freq_factor, "a positive number", lambda v: v > 0))
        high = float(number("high_freq_factor", self.high_freq_factor,
                            f"a number > low_freq_factor={low}", lambda v: v > low))
        n = self.original_max_position_embeddings
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"rope_scaling.original_max_position_embeddings must be a positive int, got {n!r}")
        object.__setattr__(self, "low_freq_factor", low)
        object.__setattr__(self, "high_freq_factor", high)
        object.__setattr__(self, "original_max_position_embeddings", int(n))

    def to_dict(self) -> dict:
        """config.json's form (the keys of this rope type only)."""
        d = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                     original_max_position_embeddings=self.original_max_position_embeddings)
        return d

    def apply(self, inv_freq: np.ndarray) -> np.ndarray:
        """The scaled inverse frequencies (float64) of the unscaled ones ``inv_freq`` (head_dim / 2,)
        float64, as transformers' ``_compute_linear_scaling_rope_parameters`` and
        ``_compute_llama3_parameters`` compute them."""
        inv_freq = np.asarray(inv_freq, np.float64)
        if self.rope_type == "linear":
            return inv_freq / self.factor
        old = self.original_max_position_embeddings
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        # Wavelengths beyond the original context are slowed by `factor`, those under
        # high_wavelen kept; between, a blend linear in (original context / wavelength).
        smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        return np.where(wavelen > low_wavelen, inv_freq / self.factor,
                        np.where(wavelen < high_wavelen, inv_freq, blended))


# ------------------------------------------------------------------------------ config.json reading
REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")


def config_kwargs(d: dict) -> dict:
    """LlamaConfig's arguments from a Hugging Face ``config.json`` dict, by its family's row:
    transformers' defaults for absent keys, the family's fixed values, its refusals. Keys that do
    not change the computation (vocab_size, torch_dtype, quantization_config, ...) are ignored."""
    if not isinstance(d, dict):
        raise ValueError(f"a config must be a dict (config.json's object), got {type(d).__name__}")
    model_type = d.get("model_type", "llama")
    row = family(model_type)
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    for key, why in row.refused.items():
        if d.get(key):
            raise ValueError(f"{key}={d[key]!r} is not supported for model_type={model_type!r}: {why}")
    kwargs = {k: d[k] for k in REQUIRED}
    kwargs.update(num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                  rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=d.get("rope_theta", 10000.0),
                  model_type=model_type, rope_scaling=RopeScaling.from_dict(d.get("rope_scaling")),
                  tie_word_embeddings=d.get("tie_word_embeddings", False))
    if row.sliding_window:        # absent: transformers' default; null: no window
        kwargs["sliding_window"] = d.get("sliding_window", row.defaults.get("sliding_window"))
    for name, projections in (("attention_bias", row.attention_bias), ("mlp_bias", row.mlp_bias)):
        if name in row.fixed:
            kwargs[name] = row.fixed[name]
        elif projections:
            kwargs[name] = d.get(name, False)
    return kwargs

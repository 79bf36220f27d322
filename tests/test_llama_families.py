"""Model families (quickcupy.llama.families): config.json parsing per family and its refusals; on
the CPU, each family's features in the NumPy model against a float64 reference written here (Llama
3.1's rope scaling, also beyond 8192 positions, Mistral's sliding window with and without a cache,
Qwen2's q/k/v biases and tied embeddings, act-order perms that differ between fused projections);
on the GPU, the windowed decode attention kernel against float64, and each family's model against
Hugging Face transformers (tests/hf_models.py) in float16 and bfloat16."""
import dataclasses
import json
import math

import numpy as np
import pytest

from conftest import attention_f64, rel_error
from hf_models import LOGIT_TOLERANCE, assert_no_near_tie, greedy_design
from quickcupy.attention import decode_attention
from quickcupy.llama import (HeadWeights, LlamaConfig, LlamaModel, load_checkpoint, random_head,
                             random_layers, rope_tables, save_awq_checkpoint)
from quickcupy.llama.families import FAMILIES, RopeScaling
from quickcupy.llama.model import MODELS, ConcatLinear, NumpyLinear, causal_bias, fuse_biases, make_linear

LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
# One tiny configuration per family, each with its feature on (GQA, head_dim 64).
FAMILY_CONFIGS = {
    "llama": LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE),
    "mistral": LlamaConfig(**TINY, rope_theta=1e6, model_type="mistral", sliding_window=5),
    "qwen2": LlamaConfig(**TINY, rope_theta=1e6, rms_norm_eps=1e-6, model_type="qwen2", tie_word_embeddings=True),
}
VOCAB = 512


def _seed(rng):
    return int(rng.integers(2**31))


# ---------------------------------------------------------------------------------- config.json
# The keys that matter of published config.json files (values as the model repositories have them).
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
             "max_position_embeddings": 4096, "vocab_size": 32000, "torch_dtype": "float16"}
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
              "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE,
              "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
              "max_position_embeddings": 131072, "vocab_size": 128256, "torch_dtype": "bfloat16"}
LLAMA32_1B = {**LLAMA31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
              "rope_scaling": {**LLAMA31_ROPE, "factor": 32.0}, "tie_word_embeddings": True}
MISTRAL_V01 = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
               "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
               "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
               "tie_word_embeddings": False, "vocab_size": 32000}
MISTRAL_V03 = {**MISTRAL_V01, "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32768}
QWEN25_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
              "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
              "num_hidden_layers": 24, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
              "use_sliding_window": False, "max_window_layers": 21, "tie_word_embeddings": True,
              "vocab_size": 151936, "torch_dtype": "bfloat16"}
QWEN25_7B = {**QWEN25_05B, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
             "num_key_value_heads": 4, "num_hidden_layers": 28, "sliding_window": 131072, "max_window_layers": 28,
             "tie_word_embeddings": False}


@pytest.mark.parametrize("d,expected", [
    (LLAMA2_7B, dict(model_type="llama", rope_theta=10000.0, rope_scaling=None, sliding_window=None,
                     attention_bias=False, tie_word_embeddings=False, bias_projections=())),
    (LLAMA31_8B, dict(model_type="llama", rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                      sliding_window=None, tie_word_embeddings=False, bias_projections=())),
    (LLAMA32_1B, dict(rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
                      head_dim=64)),
    (MISTRAL_V01, dict(model_type="mistral", sliding_window=4096, attention_bias=False, bias_projections=())),
    (MISTRAL_V03, dict(model_type="mistral", sliding_window=None, rope_theta=1e6)),
    ({k: v for k, v in MISTRAL_V01.items() if k != "sliding_window"}, dict(sliding_window=4096)),  # transformers' default
    (QWEN25_05B, dict(model_type="qwen2", sliding_window=None, attention_bias=True, mlp_bias=False,
                      tie_word_embeddings=True, bias_projections=("q_proj", "k_proj", "v_proj"), rms_norm_eps=1e-6)),
    (QWEN25_7B, dict(model_type="qwen2", tie_word_embeddings=False, num_key_value_heads=4)),
    ({**LLAMA2_7B, "rope_scaling": {"type": "linear", "factor": 4.0}}, dict(rope_scaling=RopeScaling("linear", 4.0))),
    ({**LLAMA2_7B, "rope_scaling": {"rope_type": "default"}}, dict(rope_scaling=None)),
    ({**LLAMA2_7B, "attention_bias": True}, dict(bias_projections=("q_proj", "k_proj", "v_proj", "o_proj"))),
    ({**LLAMA2_7B, "mlp_bias": True}, dict(bias_projections=("gate_proj", "up_proj", "down_proj"))),
], ids=["llama2", "llama3.1", "llama3.2-tied", "mistral-v0.1", "mistral-v0.3", "mistral-default-window",
        "qwen2.5-0.5b", "qwen2.5-7b", "linear-rope", "default-rope", "llama-attention-bias", "llama-mlp-bias"])
def test_config_json_of_each_family(d, expected):
    c = LlamaConfig.from_dict(d)
    for name, value in expected.items():
        assert getattr(c, name) == value, name
    # The dict round-trips through config.json (save_awq_checkpoint writes to_dict) and the constructor.
    assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert LlamaConfig(**c.to_dict()) == c


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gemma"}, "model_type='gemma' is not supported; supported: 'llama', 'mistral', 'qwen2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type='dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope' is not supported"),
    ({"rope_scaling": {"factor": 2.0}}, "rope_scaling.rope_type=None is not supported"),
    ({"rope_scaling": "llama3"}, "rope_scaling must be null or an object"),
    ({"rope_scaling": {**LLAMA31_ROPE, "original_max_position_embeddings": None}},
     "original_max_position_embeddings must be a positive int"),
    ({"rope_scaling": {k: v for k, v in LLAMA31_ROPE.items() if k != "low_freq_factor"}},
     "rope_scaling of rope_type 'llama3' lacks low_freq_factor"),
    ({"rope_scaling": {**LLAMA31_ROPE, "high_freq_factor": 1.0}}, "high_freq_factor must be a number > low_freq_factor"),
    ({"rope_scaling": {**LLAMA31_ROPE, "factor": 0.5}}, "rope_scaling.factor must be a number >= 1"),
    ({"head_dim": 128, "hidden_size": 5120}, "head_dim=128 differs from hidden_size / num_attention_heads = 160"),
    ({"num_attention_heads": None}, "num_attention_heads must be a positive int"),
])
def test_config_json_refusals_name_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_dict({**LLAMA31_8B, **change})


def test_qwen2_sliding_window_is_refused_by_name():
    with pytest.raises(ValueError, match="use_sliding_window=True is not supported for model_type='qwen2': "
                                         "sliding windows on the layers from max_window_layers on"):
        LlamaConfig.from_dict({**QWEN25_7B, "use_sliding_window": True})


@pytest.mark.parametrize("kwargs,match", [
    (dict(sliding_window=16), "model_type='llama' has no sliding window; sliding_window must be None, got 16"),
    (dict(model_type="qwen2", sliding_window=16), "model_type='qwen2' has no sliding window"),
    (dict(model_type="mistral", sliding_window=0), "sliding_window must be None or a positive int, got 0"),
    (dict(model_type="qwen2", attention_bias=False), "model_type='qwen2' always has attention_bias=True"),
    (dict(model_type="mistral", attention_bias=True), "model_type='mistral' always has attention_bias=False"),
    (dict(attention_bias=1), "attention_bias must be a bool, got 1"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be a bool"),
    (dict(model_type="Llama"), "model_type='Llama' is not supported"),
])
def test_config_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**TINY, **kwargs)


def test_rope_scaling_fields_belong_to_their_type():
    with pytest.raises(ValueError, match="rope_scaling.low_freq_factor belongs to rope_type 'llama3', not 'linear'"):
        RopeScaling("linear", 2.0, low_freq_factor=1.0)


def test_models_carry_their_family():
    configs = {name: LlamaConfig(**d) for name, d in MODELS.items()}
    assert configs["mistral-7b"].model_type == "mistral" and configs["mistral-7b"].sliding_window is None
    assert configs["qwen2.5-7b"].bias_projections == ("q_proj", "k_proj", "v_proj")
    assert configs["llama3.1-8b"].rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert configs["llama2-7b"] == LlamaConfig.preset("7b") and configs["llama2-7b"].bias_projections == ()
    assert {c.model_type for c in configs.values()} == set(FAMILIES)


# ------------------------------------------------------------------------------ float64 reference
def _llama31_scaled(freq, factor, low, high, old):
    """One frequency as Meta's Llama 3.1 reference code scales it (``apply_scaling``)."""
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
        return freq
    if wavelen > old / low:
        return freq / factor
    smooth = (old / wavelen - low) / (high - low)
    return (1 - smooth) * freq / factor + smooth * freq


def _ref_inv_freq(c):
    freqs = [c.rope_theta ** (-2 * i / c.head_dim) for i in range(c.head_dim // 2)]
    s = c.rope_scaling
    if s is None:
        return np.array(freqs)
    if s.rope_type == "linear":
        return np.array(freqs) / s.factor
    return np.array([_llama31_scaled(f, s.factor, s.low_freq_factor, s.high_freq_factor,
                                     s.original_max_position_embeddings) for f in freqs])


def _f64(w):
    return w.dequantize(np.float64) if hasattr(w, "dequantize") else np.asarray(w, np.float64)


def _ref_stack(c, layers, x, start=0, past=None):
    """The decoder stack in float64: x (B, S, H) at positions start.. ; past: None or per layer
    (keys, values) (B, n_kv, start, d) of positions 0..start-1 (keys rotated). Returns the hidden
    states (B, S, H) and each layer's (keys, values) through the new positions."""
    B, S, _ = x.shape
    nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    pos = start + np.arange(S)
    angles = pos[:, None] * _ref_inv_freq(c)[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]          # (S, 1, d/2)

    def rope(t):                         # (B, S, heads, d): element i pairs with i + d/2
        t1, t2 = t[..., :d // 2], t[..., d // 2:]
        return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], axis=-1)

    def norm(t, w):
        return t / np.sqrt((t * t).mean(-1, keepdims=True) + c.rms_norm_eps) * np.asarray(w, np.float64)

    def proj(w, name, t):
        if name in w.perms:
            t = t[..., np.asarray(w.perms[name])]
        y = t @ _f64(getattr(w, name)).T
        return y + np.asarray(w.biases[name], np.float64) if name in w.biases else y

    x = np.asarray(x, np.float64)
    caches = []
    for i, w in enumerate(layers):
        n = norm(x, w.input_layernorm)
        q = rope(proj(w, "q_proj", n).reshape(B, S, nh, d))
        k = rope(proj(w, "k_proj", n).reshape(B, S, nkv, d)).transpose(0, 2, 1, 3)
        v = proj(w, "v_proj", n).reshape(B, S, nkv, d).transpose(0, 2, 1, 3)
        if past is not None:
            k = np.concatenate([np.asarray(past[i][0], np.float64), k], axis=2)
            v = np.concatenate([np.asarray(past[i][1], np.float64), v], axis=2)
        caches.append((k, v))
        T = k.shape[2]
        kk, vv = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        s = np.einsum("bshd,bhtd->bhst", q, kk) / math.sqrt(d)
        j = np.arange(T)[None, :]
        visible = j <= pos[:, None]
        if c.sliding_window is not None:
            visible &= j > pos[:, None] - c.sliding_window
        s = np.where(visible, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + proj(w, "o_proj", np.einsum("bhst,bhtd->bshd", p, vv).reshape(B, S, nh * d))
        n = norm(x, w.post_attention_layernorm)
        g = proj(w, "gate_proj", n)
        x = x + proj(w, "down_proj", g / (1 + np.exp(-g)) * proj(w, "up_proj", n))
    return x, caches


def _ref_logits(c, layers, head, ids, start=0, past=None):
    x = np.asarray(head.embed_tokens, np.float64)[np.asarray(ids)]
    h, caches = _ref_stack(c, layers, x, start, past)
    h = h / np.sqrt((h * h).mean(-1, keepdims=True) + c.rms_norm_eps) * np.asarray(head.norm, np.float64)
    lm = head.embed_tokens if head.lm_head is None else head.lm_head
    return h @ _f64(lm).T, caches


# ------------------------------------------------------------------------------------ rope scaling
def test_llama31_rope_tables_match_the_published_formula():
    """Llama 3.1 8B's rope (theta 500000, head_dim 128, factor 8, low 1, high 4, original 8192)
    against Meta's per-frequency formula, at positions up to 131071."""
    c = LlamaConfig.from_dict(LLAMA31_8B)
    positions = np.array([0, 1, 4095, 8191, 8192, 8193, 12345, 65536, 131071])
    cos, sin = rope_tables(c, positions)
    freqs = [500000.0 ** (-2 * i / 128) for i in range(64)]
    scaled = np.array([_llama31_scaled(f, 8.0, 1.0, 4.0, 8192) for f in freqs])
    angles = positions[:, None].astype(np.float64) * scaled[None, :]
    np.testing.assert_allclose(cos, np.cos(angles), atol=2e-7)
    np.testing.assert_allclose(sin, np.sin(angles), atol=2e-7)
    # The formula's three bands: wavelengths under 8192/4 kept, over 8192 slowed 8x, a blend between.
    wavelen = 2 * np.pi / np.array(freqs)
    assert (scaled[wavelen < 2048] == np.array(freqs)[wavelen < 2048]).all()
    np.testing.assert_allclose(scaled[wavelen > 8192], np.array(freqs)[wavelen > 8192] / 8, rtol=1e-15)
    middle = (wavelen >= 2048) & (wavelen <= 8192)
    assert middle.any() and (scaled[middle] < np.array(freqs)[middle]).all()
    assert np.abs(cos - rope_tables(c.replace(rope_scaling=None), positions)[0]).max() > 0.5


def test_linear_rope_scaling_is_positions_divided_by_factor():
    c = LlamaConfig(**TINY, rope_scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = rope_tables(c, np.arange(0, 4000, 4))
    plain = rope_tables(c.replace(rope_scaling=None), np.arange(1000))
    np.testing.assert_allclose(cos, plain[0], atol=1e-6)
    np.testing.assert_allclose(sin, plain[1], atol=1e-6)


# ------------------------------------------------------------------------------------ sliding window
@pytest.mark.parametrize("start,S,T", [(0, 9, 9), (0, 1, 1), (4, 3, 12), (10, 1, 16), (3, 5, 8)])
@pytest.mark.parametrize("window", [None, 1, 2, 4, 100])
def test_causal_bias_with_a_window(start, S, T, window):
    bias = causal_bias(np, start, S, T, window)
    expected = np.array([[0.0 if j <= start + i and (window is None or j > start + i - window) else -np.inf
                          for j in range(T)] for i in range(S)], np.float32)
    if bias is None:
        assert (expected == 0).all()
    else:
        np.testing.assert_array_equal(bias, expected)


# ------------------------------------------------------------------------------- whole model, NumPy
def _family(name, rng, config=None):
    """(config, float layers, head) of a family's tiny model; qwen2's with q/k/v biases, tied."""
    c = config or FAMILY_CONFIGS[name]
    return c, random_layers(c, seed=_seed(rng)), random_head(c, VOCAB, _seed(rng))


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_family_model_equals_float64_reference(rng, name):
    """Logits of one pass over 14 tokens, and of a chunked prefill then decode steps through the
    KV cache (the window then spans cached positions), against the float64 reference."""
    c, layers, head = _family(name, rng)
    model = LlamaModel(c, layers, "numpy", head=head)
    ids = rng.integers(0, VOCAB, (2, 14))
    ref, _ = _ref_logits(c, layers, head, ids)
    assert rel_error(model.logits(ids), ref) < 1e-5
    cache = model.new_cache(2, 16)
    steps = [model.logits(ids[:, :4], cache), model.logits(ids[:, 4:9], cache)]
    steps += [model.logits(ids[:, t:t + 1], cache) for t in range(9, 14)]
    assert rel_error(np.concatenate(steps, axis=1), ref) < 1e-5


@pytest.mark.parametrize("name,off", [
    ("mistral", dict(sliding_window=None)),
    ("qwen2", dict(model_type="llama", attention_bias=False)),
])
def test_family_feature_changes_the_logits(rng, name, off):
    """The feature matters on these weights: without it the reference moves by far more than the
    GPU tests' tolerances (so those tests would see a feature applied wrongly)."""
    c, layers, head = _family(name, rng)
    ids = rng.integers(0, VOCAB, (2, 14))
    ref, _ = _ref_logits(c, layers, head, ids)
    plain = [dataclasses.replace(w, biases={}) for w in layers] if "attention_bias" in off else layers
    assert rel_error(_ref_logits(c.replace(**off), plain, head, ids)[0], ref) > 0.2


def test_llama31_rope_beyond_8192_through_the_cache(rng):
    """3 tokens and 2 decode steps placed at positions 9000.. after a cache of random keys and
    values (rotated keys are any vectors): the queries' rotations at those positions meet keys
    at every distance up to 9004, against the float64 reference; without the llama3 scaling the
    reference moves far more than the model's error."""
    c, layers, head = _family("llama", rng)
    P, B = 9000, 1
    nkv, d = c.num_key_value_heads, c.head_dim
    past = [(rng.standard_normal((B, nkv, P, d)), rng.standard_normal((B, nkv, P, d))) for _ in layers]
    ids = rng.integers(0, VOCAB, (B, 5))
    model = LlamaModel(c, layers, "numpy", head=head)
    cache = model.new_cache(B, P + 8)
    for i, (k, v) in enumerate(past):
        cache.keys[i][..., :P] = k.transpose(0, 1, 3, 2)
        cache.values[i][:, :, :P] = v
    cache.length = P
    got = np.concatenate([model.logits(ids[:, :3], cache)] + [model.logits(ids[:, t:t + 1], cache) for t in (3, 4)],
                         axis=1)
    ref, _ = _ref_logits(c, layers, head, ids, P, past)
    assert rel_error(got, ref) < 1e-5
    unscaled, _ = _ref_logits(c.replace(rope_scaling=None), layers, head, ids, P, past)
    assert rel_error(unscaled, ref) > 100 * rel_error(got, ref)


# --------------------------------------------------------------------------- biases and act-order
def _perm_layers(rng, c):
    """Float layers with act-order perms that q and k/v do not share (q|k|v cannot fuse), shared by
    gate and up (they fuse), one on down; biases on q alone (k, v get zeros in a fusion) and down."""
    layers = random_layers(c, seed=_seed(rng))
    H, I = c.hidden_size, c.intermediate_size
    out = []
    for w in layers:
        kv_perm, gate_up = rng.permutation(H), rng.permutation(H)
        perms = {"q_proj": rng.permutation(H), "k_proj": kv_perm, "v_proj": kv_perm.copy(), "gate_proj": gate_up,
                 "up_proj": gate_up.copy(), "down_proj": rng.permutation(I)}
        biases = {"q_proj": rng.standard_normal(w.q_proj.shape[0]).astype(np.float32) * 0.3,
                  "down_proj": rng.standard_normal(H).astype(np.float32) * 0.3}
        out.append(dataclasses.replace(w, perms=perms, biases=biases))
    return out


def test_mixed_perms_and_partial_biases_equal_float64_reference(rng):
    c = LlamaConfig(**TINY)
    layers = _perm_layers(rng, c)
    model = LlamaModel(c, layers, "numpy")
    block = model.blocks[0]
    # q | k|v: two GEMMs (k and v share their perm and fuse); gate|up one.
    assert isinstance(block.qkv_proj, ConcatLinear)
    assert [lin.out_features for lin in block.qkv_proj.linears] == [c.hidden_size, 2 * c.hidden_size // 2]
    assert isinstance(block.gate_up_proj, NumpyLinear) and block.gate_up_proj.perm is not None
    x = rng.standard_normal((2, 7, c.hidden_size)).astype(np.float32)
    ref, _ = _ref_stack(c, layers, x)
    assert rel_error(model(x), ref) < 1e-5
    # Quantized projections (the NumPy backend dequantizes them) keep their perms and biases.
    quantized = [w.quantized(64) for w in layers]
    assert rel_error(LlamaModel(c, quantized, "numpy")(x), _ref_stack(c, quantized, x)[0]) < 1e-5


def test_same_perm_fuses_and_none_is_the_identity(rng):
    c = LlamaConfig(**TINY)
    w = random_layers(c, seed=_seed(rng))[0]
    p = rng.permutation(c.hidden_size)
    shared = dataclasses.replace(w, perms={name: p.copy() for name in ("q_proj", "k_proj", "v_proj")},
                                 biases={"k_proj": np.ones(w.k_proj.shape[0], np.float32)})
    block = LlamaModel(c.replace(num_hidden_layers=1), [shared], "numpy").blocks[0]
    assert isinstance(block.qkv_proj, NumpyLinear)
    nq, nk = w.q_proj.shape[0], w.k_proj.shape[0]
    np.testing.assert_array_equal(block.qkv_proj.bias, np.r_[np.zeros(nq), np.ones(nk), np.zeros(nk)])
    # A perm on some members only: the identity differs from a perm, so they do not fuse.
    partial = dataclasses.replace(w, perms={"q_proj": p})
    assert isinstance(LlamaModel(c.replace(num_hidden_layers=1), [partial], "numpy").blocks[0].qkv_proj, ConcatLinear)


def test_fuse_biases():
    assert fuse_biases([None, None], [2, 3]) is None
    np.testing.assert_array_equal(fuse_biases([None, np.array([1.0, 2.0])], [3, 2]), [0, 0, 0, 1, 2])


@pytest.mark.parametrize("kwargs,match", [
    (dict(bias=np.zeros(7)), r"bias must be a float \(out_features,\) = \(8,\) array, got float64 \(7,\)"),
    (dict(bias=np.arange(8)), "bias must be a float"),
    (dict(bias=np.full(8, np.nan)), "bias has NaN or inf values"),
    (dict(perm=np.arange(15)), r"perm must be a permutation of range\(in_features=16\)"),
    (dict(perm=np.zeros(16, np.int64)), "perm must be a permutation"),
    (dict(perm=np.arange(16.0)), "perm must be a permutation"),
])
def test_make_linear_checks_bias_and_perm(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_linear("numpy", np.zeros((8, 16), np.float32), **kwargs)


@pytest.mark.parametrize("bias_dtype", ["float32", "float16", "bfloat16"])
def test_numpy_linear_applies_bias_and_perm(rng, bias_dtype):
    from quickcupy.dtypes import np_dtype
    w = rng.standard_normal((8, 16)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    if bias_dtype != "float32":          # checkpoints hold 16-bit ones
        bias = bias.astype(np_dtype(bias_dtype))
    perm = rng.permutation(16)
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    y = make_linear("numpy", w, bias=bias, perm=perm)(x)
    expected = x.astype(np.float64)[..., perm] @ w.T.astype(np.float64) + bias.astype(np.float64)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_qwen2_layers_need_their_biases(rng):
    c = FAMILY_CONFIGS["qwen2"]
    layer = random_layers(c, seed=_seed(rng))[0]
    assert set(layer.biases) == {"q_proj", "k_proj", "v_proj"}
    with pytest.raises(ValueError, match="layer 0 has no bias for k_proj, v_proj, which model_type='qwen2'"):
        LlamaModel(c.replace(num_hidden_layers=1), [dataclasses.replace(layer, biases={"q_proj": layer.biases["q_proj"]})])


def test_tied_embeddings_agree_with_the_config(rng):
    c = FAMILY_CONFIGS["qwen2"]
    layers, head = random_layers(c, seed=_seed(rng)), random_head(c, VOCAB, _seed(rng))
    assert head.lm_head is None
    with pytest.raises(ValueError, match="lm_head is given but the config's tie_word_embeddings is True"):
        LlamaModel(c, layers, head=HeadWeights(head.embed_tokens, head.norm, head.embed_tokens))
    with pytest.raises(ValueError, match=r"lm_head is None \(tied to embed_tokens\) but the config's "
                                         "tie_word_embeddings is False"):
        LlamaModel(c.replace(tie_word_embeddings=False), layers, head=head)


@pytest.mark.parametrize("config", [
    LlamaConfig(**TINY, model_type="mistral", sliding_window=7),
    LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE),
    LlamaConfig(**TINY, model_type="qwen2"),
], ids=["mistral", "llama3.1", "qwen2"])
def test_checkpoint_config_json_names_the_family(rng, tmp_path, config):
    pytest.importorskip("safetensors")
    save_awq_checkpoint(tmp_path, config, random_layers(config, seed=_seed(rng)), group_size=64)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == config.model_type
    assert written["architectures"] == [FAMILIES[config.model_type].architecture]
    assert LlamaConfig.from_dict(written) == config
    if config.model_type != "qwen2":       # qwen2's biases are not in the checkpoint written here
        assert load_checkpoint(tmp_path).config == config


def test_decode_attention_window_is_checked():
    q = np.zeros((1, 4, 64), np.float16)
    keys, values = np.zeros((1, 2, 64, 8), np.float16), np.zeros((1, 2, 8, 64), np.float16)
    for window in (-1, 2.0, True):
        with pytest.raises(ValueError, match="window must be None or an int >= 0"):
            decode_attention(q, keys, values, 3, window=window)


# ---------------------------------------------------------------------------------------------- GPU
DTYPES = ["float16", "bfloat16"]
EPS = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def _np_dtype(dtype):
    from quickcupy.dtypes import np_dtype
    return np_dtype(dtype)


def _f32(a):
    """A CuPy float16 / bfloat16 array as NumPy float32 (exact)."""
    return a.get().astype(np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,nh,nkv", [(64, 8, 2), (128, 4, 4), (96, 4, 1), (256, 2, 2)])
@pytest.mark.parametrize("max_len", [264, 301])      # 16-byte cp.async rows, and element-by-element copies
def test_gpu_windowed_decode_attention(rng, dtype, d, nh, nkv, max_len):
    """The sliding-window kernel against float64 at lengths around 8-position chunks and 128-position
    tiles, windows from 1 (the new token alone) to beyond the length: positions before the window
    and past the length are NaN in the caches (never used), the output's memory is NaN before
    the call (every element written)."""
    import cupy
    from quickcupy.attention import decode_attention_rope
    from quickcupy.llama import ops
    nd = _np_dtype(dtype)
    B = 3
    for length in (1, 2, 7, 9, 128, 129, 200, 257, 264):
        if length > max_len:
            continue
        for window in (1, 3, 8, 9, 16, 100, 127, 128, 129, length - 1, length, length + 5, 2**31 - 1):
            if window < 1:
                continue
            lo = max(0, length - window)
            q = rng.standard_normal((B, nh, d)).astype(nd)
            keys = rng.standard_normal((B, nkv, d, max_len)).astype(nd)
            values = rng.standard_normal((B, nkv, max_len, d)).astype(nd)
            keys[..., :lo] = keys[..., length:] = np.nan
            values[:, :, :lo] = values[:, :, length:] = np.nan
            ref = attention_f64(q.astype(np.float32), keys.astype(np.float32), values.astype(np.float32),
                                length, window)
            dq, dk, dv = cupy.asarray(q), cupy.asarray(keys), cupy.asarray(values)
            # The kernel's output comes from CuPy's pool, which hands out the best-fitting free
            # block: this NaN-filled one of the same size, just freed.
            poison = cupy.full((B, 1, nh * d), np.nan, np.float32).astype(nd)
            del poison
            out = _f32(decode_attention(dq, dk, dv, length, window=window))
            where = f"length={length} window={window}"
            assert not np.isnan(out).any(), where
            assert rel_error(out, ref) < 2 * EPS[dtype], where
            if window >= length:      # the kernel's unwindowed path
                np.testing.assert_array_equal(out, _f32(decode_attention(dq, dk, dv, length)), where)
    # The fused decode step (rope + cache write + windowed attention) equals rope_cache, then the
    # windowed decode attention, bit for bit.
    config = LlamaConfig(hidden_size=nh * d, intermediate_size=8, num_attention_heads=nh, num_key_value_heads=nkv,
                         num_hidden_layers=1)
    cos, sin = (cupy.asarray(t) for t in rope_tables(config, np.arange(max_len)))
    for length, window in ((200, 16), (129, 128), (9, 3), (5, 1), (257, 300)):
        qkv = cupy.asarray(rng.standard_normal((B, 1, nh + 2 * nkv, d)).astype(nd))
        keys = cupy.asarray(rng.standard_normal((B, nkv, d, max_len)).astype(nd))
        values = cupy.asarray(rng.standard_normal((B, nkv, max_len, d)).astype(nd))
        keys2, values2 = keys.copy(), values.copy()
        fused = decode_attention_rope(qkv, keys, values, cos, sin, nh, length, window=window)
        qk = ops.rope_cache(qkv, cos, sin, cupy.asarray([length - 1], np.int32), nh, nkv, keys2, values2)
        split = decode_attention(qk[:, 0, :nh], keys2, values2, length, window=window)
        for a, b in ((fused, split), (keys, keys2), (values, values2)):
            np.testing.assert_array_equal(_f32(a), _f32(b))


# The GPU families: Llama 3.1's rope scaling, Mistral's window 16 over 40 positions (prompt and
# decode), Qwen2's q/k/v biases with tied embeddings.
GPU_FAMILIES = {"llama": FAMILY_CONFIGS["llama"], "mistral": FAMILY_CONFIGS["mistral"].replace(sliding_window=16),
                "qwen2": FAMILY_CONFIGS["qwen2"]}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(GPU_FAMILIES))
def test_gpu_family_matches_transformers(rng, name, dtype):
    """backend "auto" on 4-bit weights against transformers' model of the family on the same
    (dequantized) weights: logits of one pass over 40 tokens and of a 24-token prefill then 16
    cached decode steps; then 32 greedy tokens against transformers' generate."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import cupy
    from hf_models import hf_greedy, hf_logits, hf_model
    c = GPU_FAMILIES[name]
    layers, head = random_layers(c, seed=_seed(rng)), random_head(c, VOCAB, _seed(rng))
    quantized = [w.quantized(64) for w in layers]
    hf = hf_model(c, [w.dequantized() for w in quantized], head, torch)
    ids = rng.integers(0, VOCAB, (2, 40))
    ref = hf_logits(hf, ids, torch)
    model = LlamaModel(c, quantized, "auto", 64, head=head, dtype=dtype)
    got = model.logits(ids)
    assert got.dtype == _np_dtype(dtype)
    assert rel_error(got, ref) < LOGIT_TOLERANCE[dtype], "one pass"
    cache = model.new_cache(2, 40)
    steps = [model.logits(ids[:, :24], cache)] + [model.logits(ids[:, t:t + 1], cache) for t in range(24, 40)]
    assert rel_error(cupy.concatenate(steps, axis=1), ref) < LOGIT_TOLERANCE[dtype], "prefill + decode"
    del hf

    layers, head = greedy_design(c, VOCAB, rng)
    quantized = [w.quantized(64) for w in layers]
    hf = hf_model(c, [w.dequantized() for w in quantized], head, torch)
    prompt = rng.integers(0, VOCAB - 40, (2, 12))
    hf_tokens, hf_step_logits = hf_greedy(hf, prompt, 32, torch)
    assert_no_near_tie(hf_step_logits, LOGIT_TOLERANCE[dtype])
    tokens = LlamaModel(c, quantized, "auto", 64, head=head, dtype=dtype).generate(prompt, 32)
    np.testing.assert_array_equal(tokens, hf_tokens)


@pytest.mark.gpu
def test_gpu_llama31_rope_beyond_8192_matches_transformers(rng):
    """Llama 3.1's rope against transformers' rotary embedding (inverse frequencies; cos/sin at
    positions past 8192), and the model over an 8200-token prompt plus 4 decode steps against
    transformers' (keys at every distance up to 8203 from the last queries)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import cupy
    from hf_models import hf_logits, hf_model
    c = FAMILY_CONFIGS["llama"]
    layers, head = random_layers(c, seed=_seed(rng)), random_head(c, VOCAB, _seed(rng))
    # q and k 3x the init scale: sharper attention, so that the rope's scaling moves these logits
    # by ~0.18 of their norm (measured with NumPy), far beyond the tolerance (checked below).
    layers = [dataclasses.replace(w, q_proj=3 * w.q_proj, k_proj=3 * w.k_proj) for w in layers]
    quantized = [w.quantized(64) for w in layers]
    dequantized = [w.dequantized() for w in quantized]
    hf = hf_model(c, dequantized, head, torch)

    rotary = hf.model.rotary_emb
    assert getattr(rotary, "attention_scaling", 1.0) == 1.0
    inv_freq = c.rope_scaling.apply(1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim))
    np.testing.assert_allclose(rotary.inv_freq.double().cpu().numpy(), inv_freq, rtol=1e-6)
    positions = np.array([8190, 8192, 8193, 9000, 16384, 20000])
    cos, sin = rotary(torch.zeros(1, 1, device="cuda"), torch.from_numpy(positions)[None].to("cuda"))
    # transformers rounds each angle (position * inv_freq) to float32: ~1e-3 radians at 20000.
    for theirs, ours in zip((cos, sin), rope_tables(c, positions)):
        np.testing.assert_allclose(theirs[0, :, :c.head_dim // 2].double().cpu().numpy(), ours, atol=3e-3)

    ids = rng.integers(0, VOCAB, (1, 8204))
    ref = hf_logits(hf, ids, torch)[:, -12:]
    del hf
    unscaled = hf_logits(hf_model(c.replace(rope_scaling=None), dequantized, head, torch), ids, torch)[:, -12:]
    assert rel_error(unscaled, ref) > 10 * LOGIT_TOLERANCE["float16"]
    model = LlamaModel(c, quantized, "auto", 64, head=head, dtype="float16")
    cache = model.new_cache(1, 8204)
    steps = [model.logits(ids[:, :8200], cache)[:, -8:]]
    steps += [model.logits(ids[:, t:t + 1], cache) for t in range(8200, 8204)]
    assert rel_error(cupy.concatenate(steps, axis=1), ref) < LOGIT_TOLERANCE["float16"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_gpu_graph_decode_equals_eager_for_the_family(rng, name):
    """Decode steps crossing the window (mistral) or with biases (qwen2): the captured graph's
    logits equal eager decode's bit for bit, and both match the NumPy model."""
    import cupy
    c = GPU_FAMILIES[name]
    layers, head = [w.quantized(64) for w in random_layers(c, seed=_seed(rng))], random_head(c, VOCAB, _seed(rng))
    model = LlamaModel(c, layers, "auto", 64, head=head)
    ids = cupy.asarray(rng.integers(0, VOCAB, (2, 7)))
    toks = cupy.asarray(rng.integers(0, VOCAB, (30, 2)))
    runs = {}
    for graph in (False, True):
        cache = model.new_cache(2, 40)
        logits = [model.prefill(ids, cache, graph)] + [model.decode_step(toks[t], cache, graph) for t in range(30)]
        runs[graph] = cupy.stack(logits, axis=1).get().astype(np.float32)
    np.testing.assert_array_equal(runs[True], runs[False])
    all_ids = np.concatenate([ids.get(), toks.get().T], axis=1)
    reference = LlamaModel(c, layers, "numpy", 64, head=head).logits(all_ids)[:, 6:]
    assert rel_error(runs[False], reference) < 3e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dense", "auto", "awq"])
def test_gpu_mixed_perms_and_biases_match_numpy(rng, backend):
    """Act-order perms that split q|k|v into separate GEMMs, a fused gate|up with a shared perm,
    biases on some projections: the GPU block (prefill and cached decode) against the NumPy one."""
    import cupy
    c = LlamaConfig(**TINY)
    layers = [w.quantized(64) for w in _perm_layers(rng, c)]
    model = LlamaModel(c, layers, backend, 64)
    x = rng.standard_normal((2, 9, c.hidden_size)).astype(np.float32)
    ref = LlamaModel(c, layers, "numpy", 64)(x)
    assert rel_error(model(x), ref) < 3e-3
    cache = model.new_cache(2, 16)
    xs = cupy.asarray(x).astype(np.float16)
    steps = [model(xs[:, :5], cache)] + [model(xs[:, t:t + 1], cache) for t in range(5, 9)]
    assert rel_error(cupy.concatenate(steps, axis=1), ref) < 3e-3

"""The family x format matrix: a tiny checkpoint of each model family (quickcupy.llama.families:
Llama 3.1's rope scaling, Mistral's sliding window, Qwen2's q/k/v biases; tied embeddings) in each
4-bit format, quantized here from random float weights and written by the independent packers of
tests/writers.py (sharded safetensors, config.json from ``LlamaConfig.to_dict()``), then read by
``load_checkpoint`` or ``quickcupy.torch.load_causal_lm``.

CPU: the NumPy model's logits over 40 tokens (one pass; a 24-token prefill then cached decode
steps) and its greedy tokens against the float64 reference of the written weights. GPU: the
runner (backend "auto") and transformers through ``load_causal_lm``, float16 and bfloat16, against
transformers' own float32 model of the dequantized weights: logits and greedy tokens. README's
"Checkpoints that run" table names these tests.
"""
import dataclasses
import importlib
import json
import types
import zlib

import numpy as np
import pytest

from conftest import rel_error
from hf_models import LOGIT_TOLERANCE, assert_no_near_tie, greedy_design
from quickcupy.dtypes import np_dtype
from quickcupy.llama import (NORMS, PROJECTIONS, HeadWeights, LayerWeights, LlamaConfig, LlamaModel, load_checkpoint,
                             random_head, random_layers)
from quickcupy.llama.checkpoint import EMBED, FINAL_NORM
from quickcupy.quantize import quantize
from test_llama_families import TINY, _ref_logits
from writers import dequantize, quantization_config, write_layer, write_sharded

pytest.importorskip("safetensors")

VOCAB = 512
MAX_POSITIONS = 4096             # config.json's max_position_embeddings (no computation here reads it)
LENGTH, PREFILL = 40, 24         # the logits' sequence, and its prefill before cached decode steps
PROMPT, NEW_TOKENS = 12, 20      # greedy: 32 positions, past Mistral's window of 16
DTYPES = ("float16", "bfloat16")

# Llama 3.1's rope scaling with an original context of 16 positions: at the tests' positions
# most frequencies are slowed 8x (wavelengths over 16) or blended, none is left alone.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILY_CONFIGS = {
    "llama": LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "mistral": LlamaConfig(**TINY, rope_theta=1e6, model_type="mistral", sliding_window=16),
    "qwen2": LlamaConfig(**TINY, rope_theta=1e6, rms_norm_eps=1e-6, model_type="qwen2", tie_word_embeddings=True),
}
# How each format is written (tests/writers.py's write_layer and quantization_config): GPTQ in the
# classic format (zeros stored minus one), act-order with q/k/v and gate/up sharing a column order
# as GPTQ's shared Hessian gives them; compressed-tensors with zero points and bfloat16 scales, and
# symmetric. With zero points, rows 0-7 of q/k/v/o's first group have zero 0 (in GPTQ's classic
# format a whole qzeros word that borrows from the nibble above).
FORMATS = {
    "awq": dict(method="awq", G=128),
    "gptq": dict(method="gptq", variant="gptq", G=128),
    "gptq-act-order": dict(method="gptq", variant="gptq", G=64, act_order=True),
    "compressed-tensors": dict(method="compressed-tensors", G=64, scales="bfloat16"),
    "compressed-tensors-sym": dict(method="compressed-tensors", G=128, symmetric=True),
}
CELLS = [(family, fmt) for family in FAMILY_CONFIGS for fmt in FORMATS]
cells = pytest.mark.parametrize("family,fmt", CELLS, ids=[f"{family}-{fmt}" for family, fmt in CELLS])
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def cell_config(family: str, fmt: str) -> LlamaConfig:
    """The family's configuration; Llama ties its embeddings (as Llama 3.2 1B/3B do) in the
    compressed-tensors cells."""
    c = FAMILY_CONFIGS[family]
    if family == "llama" and FORMATS[fmt]["method"] == "compressed-tensors":
        c = c.replace(tie_word_embeddings=True)
    return c


def _seed(rng):
    return int(rng.integers(2**31))


def quantize_columns(w, spec, order, zero_of_0: bool):
    """(codes (N, K) uint8, zeros (N, K/G) uint8, scales (N, K/G) in the format's scale dtype,
    g_idx (K,)) of float w (N, K): groups of G consecutive columns of ``w[:, order]`` (act-order
    quantizes in that order; ``order`` is arange(K) otherwise) by AutoAWQ's rule, or symmetric
    (zero 8, scale absmax / 7); codes and g_idx in w's column order. zero_of_0: rows 0-7 of the
    first group are made non-negative first, so that their zero is 0."""
    N, K = w.shape
    G = spec["G"]
    wp = np.array(np.asarray(w)[:, order], np.float32)
    if zero_of_0:
        wp[:8, :G] = np.abs(wp[:8, :G])
    if spec.get("symmetric"):
        groups = wp.reshape(N, K // G, G)
        scales = (np.maximum(np.abs(groups).max(-1), 1e-4) / 7).astype(np.float16)
        q = np.clip(np.round(groups / scales[..., None].astype(np.float32)), -8, 7)
        codes_p, zeros = (q + 8).astype(np.uint8).reshape(N, K), np.full((N, K // G), 8, np.uint8)
    else:
        qw = quantize(wp, G)
        codes_p, zeros, scales = qw.codes, qw.zeros.copy(), qw.scales
    if zero_of_0:
        assert (zeros[:8, 0] == 0).all()
    codes = np.empty_like(codes_p)
    codes[:, order] = codes_p
    g_idx = np.empty(K, np.int64)
    g_idx[order] = np.arange(K) // G
    return codes, zeros, scales.astype(np_dtype(spec.get("scales", "float16"))), g_idx


def _column_orders(c, rng) -> dict:
    """Act-order's column order of each projection: one for q/k/v, one for gate/up (the same input
    and so, in GPTQ, the same Hessian), o's and down's own."""
    H, I = c.hidden_size, c.intermediate_size
    attn, mlp = rng.permutation(H), rng.permutation(H)
    return {"q_proj": attn, "k_proj": attn, "v_proj": attn, "o_proj": rng.permutation(H),
            "gate_proj": mlp, "up_proj": mlp, "down_proj": rng.permutation(I)}


def write_checkpoint(path, family: str, fmt: str, rng, design: str = "random"):
    """A tiny checkpoint of ``family`` in format ``fmt`` in directory ``path``: config.json (the
    family's keys from ``LlamaConfig.to_dict()``, vocab_size, quantization_config) and two
    safetensors shards with an index. Weights: design "random" (random_layers / random_head, std
    0.02, q and k 0.06) or "greedy" (:func:`hf_models.greedy_design`: clear greedy argmaxes), quantized here.

    Returns (config, layers, head) as written: LayerWeights of float32 projections (the
    dequantized codes, input features in order, no perms), float16 norms, float32 biases of
    float16 values; HeadWeights of float16 tensors (lm_head None when tied)."""
    c, spec = cell_config(family, fmt), FORMATS[fmt]
    if design == "greedy":
        layers, head = greedy_design(c, VOCAB, rng)
    else:        # q and k 3x: sharper attention, so that the rope's scaling moves the logits (see below)
        layers, head = random_layers(c, seed=_seed(rng)), random_head(c, VOCAB, _seed(rng))
        layers = [dataclasses.replace(w, q_proj=3 * w.q_proj, k_proj=3 * w.k_proj) for w in layers]
    tensors, written = {}, []
    for i, w in enumerate(layers):
        orders = _column_orders(c, rng) if spec.get("act_order") else {}
        weights, biases = {}, {}
        for name, sub in PROJECTIONS.items():
            prefix = f"model.layers.{i}.{sub}.{name}"
            float_w = getattr(w, name)
            order = orders.get(name, np.arange(float_w.shape[1]))
            codes, zeros, scales, g_idx = quantize_columns(float_w, spec, order,
                                                           not spec.get("symmetric") and name in ATTENTION)
            tensors.update({f"{prefix}.{k}": v for k, v in write_layer(spec, codes, zeros, scales, g_idx).items()})
            weights[name] = dequantize(codes, zeros, scales, g_idx).astype(np.float32)   # exact
            if name in w.biases:
                tensors[f"{prefix}.bias"] = np.asarray(w.biases[name], np.float16)
                biases[name] = tensors[f"{prefix}.bias"].astype(np.float32)
        for name in NORMS:
            weights[name] = tensors[f"model.layers.{i}.{name}.weight"] = np.asarray(getattr(w, name), np.float16)
        written.append(LayerWeights(**weights, biases=biases))
    embed, norm = np.asarray(head.embed_tokens, np.float16), np.asarray(head.norm, np.float16)
    tensors[EMBED], tensors[FINAL_NORM] = embed, norm
    lm_head = None
    if head.lm_head is not None:
        lm_head = tensors["lm_head.weight"] = np.asarray(head.lm_head, np.float16)
    write_sharded(path, tensors, shards=2)
    config = {"architectures": [c.family.architecture], **c.to_dict(), "vocab_size": VOCAB,
              "max_position_embeddings": MAX_POSITIONS, "torch_dtype": "float16",
              "quantization_config": quantization_config(spec)}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return c, written, HeadWeights(embed, norm, lm_head)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, fmt, design) -> (directory, (config, layers, head) as written), each checkpoint
    written once per module from a generator seeded by its name (the CPU and GPU tests of a cell
    read the same one)."""
    made = {}

    def get(family, fmt, design="random"):
        key = f"{family}-{fmt}-{design}"
        if key not in made:
            path = tmp_path_factory.mktemp(key)
            made[key] = path, write_checkpoint(path, family, fmt, np.random.default_rng(zlib.crc32(key.encode())),
                                               design)
        return made[key]
    return get


def _ref_greedy(c, layers, head, prompt, n: int):
    """n greedy tokens after prompt (B, S) by the float64 reference (decoding through its caches):
    (tokens (B, n), each step's logits (B, n, vocab))."""
    logits, past = _ref_logits(c, layers, head, prompt)
    tokens, steps = [], []
    for i in range(n):
        steps.append(logits[:, -1])
        tokens.append(steps[-1].argmax(-1))
        if i + 1 < n:
            logits, past = _ref_logits(c, layers, head, tokens[-1][:, None], prompt.shape[1] + i, past)
    return np.stack(tokens, axis=1), np.stack(steps, axis=1)


# ------------------------------------------------------------------------------------------- CPU
@cells
def test_numpy_logits(family, fmt, checkpoints, rng):
    """The checkpoint reads back as written (config, act-order perms shared as written, zeros of
    0), and the NumPy model's logits over 40 tokens, in one pass and as a 24-token prefill then
    16 cached decode steps, match the float64 reference of the written weights."""
    path, (c, layers, head) = checkpoints(family, fmt)
    ckpt = load_checkpoint(path)
    spec = FORMATS[fmt]
    assert ckpt.config == c
    assert (ckpt.quantization.method, ckpt.quantization.group_size) == (spec["method"], spec["G"])
    for layer in ckpt.layers:
        assert set(layer.perms) == (set(PROJECTIONS) if spec.get("act_order") else set())
        if spec.get("act_order"):
            for a, b in (("q_proj", "k_proj"), ("q_proj", "v_proj"), ("gate_proj", "up_proj")):
                np.testing.assert_array_equal(layer.perms[a], layer.perms[b])
        assert set(layer.biases) == set(c.bias_projections)
        assert (layer.q_proj.zeros[:8, 0] == (8 if spec.get("symmetric") else 0)).all()
    assert (ckpt.head.lm_head is None) == c.tie_word_embeddings
    model = LlamaModel(ckpt.config, ckpt.layers, "numpy", head=ckpt.head)
    ids = rng.integers(0, VOCAB, (2, LENGTH))
    ref, _ = _ref_logits(c, layers, head, ids)
    assert rel_error(model.logits(ids), ref) < 1e-5, "one pass"
    cache = model.new_cache(2, LENGTH)
    steps = [model.logits(ids[:, :PREFILL], cache)]
    steps += [model.logits(ids[:, t:t + 1], cache) for t in range(PREFILL, LENGTH)]
    assert rel_error(np.concatenate(steps, axis=1), ref) < 1e-5, "prefill + decode"


@cells
def test_numpy_greedy(family, fmt, checkpoints, rng):
    """Greedy tokens of the NumPy model on the "greedy" checkpoint equal the float64 reference's,
    whose top-2 gaps clear the bfloat16 margin check (the GPU tests' data hold no near-tie)."""
    path, (c, layers, head) = checkpoints(family, fmt, "greedy")
    ckpt = load_checkpoint(path)
    prompt = rng.integers(0, VOCAB - 40, (2, PROMPT))
    tokens, step_logits = _ref_greedy(c, layers, head, prompt, NEW_TOKENS)
    assert_no_near_tie(step_logits, max(LOGIT_TOLERANCE.values()))
    np.testing.assert_array_equal(LlamaModel(ckpt.config, ckpt.layers, "numpy", head=ckpt.head)
                                  .generate(prompt, NEW_TOKENS), tokens)


@pytest.mark.parametrize("family,off", [("llama", dict(rope_scaling=None)), ("mistral", dict(sliding_window=None)),
                                        ("qwen2", dict(model_type="llama", attention_bias=False))])
def test_family_feature_changes_the_logits(family, off, checkpoints, rng):
    """Each family's feature moves the reference's logits on the cells' weights by far more than
    the GPU tests' tolerances, so a feature applied wrongly fails them."""
    _, (c, layers, head) = checkpoints(family, "awq")
    ids = rng.integers(0, VOCAB, (2, LENGTH))
    ref, _ = _ref_logits(c, layers, head, ids)
    plain = [dataclasses.replace(w, biases={}) for w in layers] if "attention_bias" in off else layers
    assert rel_error(_ref_logits(c.replace(**off), plain, head, ids)[0], ref) > 5 * max(LOGIT_TOLERANCE.values())


# ------------------------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def hf_reference(checkpoints):
    """(family, fmt) -> transformers' float32 model of each checkpoint's written weights (tests/
    hf_models.py): its logits of random ids (2, 40) on the "random" checkpoint, its greedy tokens
    and step logits after a prompt on the "greedy" one; computed once for the cell's two tests."""
    made = {}

    def get(family, fmt):
        if (family, fmt) not in made:
            torch = pytest.importorskip("torch")
            pytest.importorskip("transformers")
            from hf_models import hf_greedy, hf_logits, hf_model
            rng = np.random.default_rng(zlib.crc32(f"{family}-{fmt}-ids".encode()))
            path, (c, layers, head) = checkpoints(family, fmt)
            hf = hf_model(c, layers, head, torch, max_position_embeddings=MAX_POSITIONS)
            ids = rng.integers(0, VOCAB, (2, LENGTH))
            logits = hf_logits(hf, ids, torch)
            del hf
            greedy_path, (c, layers, head) = checkpoints(family, fmt, "greedy")
            hf = hf_model(c, layers, head, torch, max_position_embeddings=MAX_POSITIONS)
            prompt = rng.integers(0, VOCAB - 40, (2, PROMPT))
            tokens, step_logits = hf_greedy(hf, prompt, NEW_TOKENS, torch)
            del hf
            made[family, fmt] = types.SimpleNamespace(path=path, greedy_path=greedy_path, ids=ids, logits=logits,
                                                      prompt=prompt, tokens=tokens, step_logits=step_logits)
        return made[family, fmt]
    return get


@pytest.mark.gpu
@cells
def test_runner(family, fmt, hf_reference):
    """LlamaModel (backend "auto") on the loaded checkpoint, float16 and bfloat16, against
    transformers: logits of one pass over 40 tokens and of a 24-token prefill then 16 cached
    decode steps; greedy tokens of ``generate`` (CUDA-graph decode) against transformers'."""
    import cupy
    ref = hf_reference(family, fmt)
    ckpt, greedy = load_checkpoint(ref.path), load_checkpoint(ref.greedy_path)
    for dtype in DTYPES:
        tol = LOGIT_TOLERANCE[dtype]
        model = LlamaModel(ckpt.config, ckpt.layers, "auto", head=ckpt.head, dtype=dtype)
        got = model.logits(ref.ids)
        assert got.dtype == np_dtype(dtype)
        assert rel_error(got, ref.logits) < tol, f"{dtype}: one pass"
        cache = model.new_cache(2, LENGTH)
        steps = [model.logits(ref.ids[:, :PREFILL], cache)]
        steps += [model.logits(ref.ids[:, t:t + 1], cache) for t in range(PREFILL, LENGTH)]
        assert rel_error(cupy.concatenate(steps, axis=1), ref.logits) < tol, f"{dtype}: prefill + decode"
        assert_no_near_tie(ref.step_logits, tol)
        tokens = LlamaModel(greedy.config, greedy.layers, "auto", head=greedy.head, dtype=dtype).generate(
            ref.prompt, NEW_TOKENS)
        np.testing.assert_array_equal(tokens, ref.tokens, err_msg=f"{dtype}: greedy tokens")


@pytest.mark.gpu
@cells
def test_transformers(family, fmt, hf_reference):
    """transformers' own model through ``quickcupy.torch.load_causal_lm`` (every projection a
    QuickLinear, with its perm and bias), float16 and bfloat16, against transformers' float32 model
    of the dequantized weights: logits of one pass over 40 tokens, greedy tokens of ``generate``."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    qt = importlib.import_module("quickcupy.torch")
    from hf_models import hf_greedy, hf_logits
    ref = hf_reference(family, fmt)
    c, spec = cell_config(family, fmt), FORMATS[fmt]
    for dtype in DTYPES:
        tol = LOGIT_TOLERANCE[dtype]
        model = qt.load_causal_lm(ref.path, dtype=getattr(torch, dtype))
        assert type(model).__name__ == c.family.architecture
        quick = {n: m for n, m in model.named_modules() if isinstance(m, qt.QuickLinear)}
        assert len(quick) == len(PROJECTIONS) * c.num_hidden_layers
        q_proj = quick["model.layers.0.self_attn.q_proj"]
        assert (q_proj.layer.perm is not None) == bool(spec.get("act_order"))
        assert (q_proj.layer.bias is not None) == ("q_proj" in c.bias_projections)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == c.tie_word_embeddings
        assert model.lm_head.weight.dtype == getattr(torch, dtype)
        assert rel_error(hf_logits(model, ref.ids, torch), ref.logits) < tol, f"{dtype}: one pass"
        del model
        assert_no_near_tie(ref.step_logits, tol)
        tokens, _ = hf_greedy(qt.load_causal_lm(ref.greedy_path, dtype=getattr(torch, dtype)), ref.prompt,
                              NEW_TOKENS, torch)
        np.testing.assert_array_equal(tokens, ref.tokens, err_msg=f"{dtype}: greedy tokens")

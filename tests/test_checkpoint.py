"""quickcupy.llama.checkpoint.load_checkpoint: tiny Llama checkpoints in every 4-bit format, written
here by independent packers (tests/writers.py) as sharded safetensors with an index, read back
exactly and run against a float64 NumPy model of the dequantized weights; bad checkpoints refused
before any weight is read."""
import functools
import json

import numpy as np
import pytest

from conftest import rel_error
from quickcupy.llama import (PROJECTIONS, LayerWeights, LlamaConfig, LlamaModel, TensorStore, load_checkpoint,
                             projection_shapes, random_layers, save_awq_checkpoint)
from writers import dequantize, quantization_config, write_layer, write_sharded

pytest.importorskip("safetensors")

TINY = LlamaConfig.preset("tiny")   # hidden 256, intermediate 512, 4 heads / 2 KV heads, 2 layers
VOCAB = 320                          # a multiple of 8: a 4-bit LM head packs 8 output columns per int32

# name -> how the checkpoint is written: method, variant (GPTQ checkpoint_format), group size,
# act-order, symmetric, scale dtype, lm_head ("float", "quantized", "tied"), q/k/v biases
CASES = {
    "awq": dict(method="awq", G=64, lm_head="quantized"),
    "awq-bf16-scales-per-row": dict(method="awq", G=-1, scales="bfloat16", lm_head="tied"),
    "gptq-v1-zeros-of-0": dict(method="gptq", variant="gptq", G=64, lm_head="float"),
    "gptq-v2": dict(method="gptq", variant="gptq_v2", G=128, lm_head="quantized"),
    "gptq-act-order": dict(method="gptq", variant="gptq", G=64, act_order=True, lm_head="float"),
    "gptq-bf16-scales-qkv-bias": dict(method="gptq", variant="gptq_v2", G=64, scales="bfloat16", bias=True,
                                      lm_head="tied"),
    "ct-group-symmetric": dict(method="compressed-tensors", G=64, symmetric=True, lm_head="float"),
    "ct-group-zero-points-bf16": dict(method="compressed-tensors", G=64, scales="bfloat16", lm_head="quantized"),
    "ct-channel-symmetric": dict(method="compressed-tensors", G=-1, symmetric=True, lm_head="tied"),
    "ct-channel-zero-points": dict(method="compressed-tensors", G=-1, lm_head="float"),
    "ct-act-order": dict(method="compressed-tensors", G=64, symmetric=True, act_order=True, lm_head="float"),
}


def _quantized_layer(rng, N, K, case):
    """Random codes, zeros, scales (in the case's scale dtype) and g_idx in the checkpoint's own column
    order, and W (N, K) float64 = (code - zero[g_idx]) * scale[g_idx]."""
    G = K if case["G"] == -1 else case["G"]
    codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
    zeros = (np.full((N, K // G), 8, np.uint8) if case.get("symmetric")
             else rng.integers(0, 16, (N, K // G), dtype=np.uint8))
    if not case.get("symmetric"):
        zeros[:8, 0] = 0                    # whole qzeros words of 0: GPTQ v1 borrows across nibbles
    scales = rng.uniform(2e-3, 1e-2, (N, K // G)).astype(case.get("scales", "float16"))
    g_idx = np.arange(K) // G
    if case.get("act_order"):               # desc_act: the i-th quantized column is in group i // G
        g_idx = np.empty(K, np.int64)
        g_idx[rng.permutation(K)] = np.arange(K) // G
    return codes, zeros, scales, g_idx, dequantize(codes, zeros, scales, g_idx)


def write_checkpoint(path, case, rng, edit=None):
    """A tiny Llama checkpoint of ``case`` in ``path`` (config.json, 2 shards + index; ``edit``
    changes the name -> array dict before it is written). Returns the reference: per layer
    {projection: (W float64, bias or None), norm: float64}, and the head (float64)."""
    ref_layers, tensors = [], {}
    for i in range(TINY.num_hidden_layers):
        ref = {}
        for name, (N, K) in projection_shapes(TINY).items():
            prefix = f"model.layers.{i}.{PROJECTIONS[name]}.{name}"
            codes, zeros, scales, g_idx, w = _quantized_layer(rng, N, K, case)
            tensors.update({f"{prefix}.{k}": v for k, v in write_layer(case, codes, zeros, scales, g_idx).items()})
            bias = None
            if case.get("bias") and name in ("q_proj", "k_proj", "v_proj"):
                bias = (0.1 * rng.standard_normal(N)).astype(case.get("scales", "float16"))
                tensors[f"{prefix}.bias"] = bias
            ref[name] = (w, None if bias is None else bias.astype(np.float64))
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = (1 + 0.05 * rng.standard_normal(TINY.hidden_size)).astype(np.float16)
            tensors[f"model.layers.{i}.{name}.weight"] = norm
            ref[name] = norm.astype(np.float64)
        ref_layers.append(ref)
    embed = (0.5 * rng.standard_normal((VOCAB, TINY.hidden_size))).astype(np.float16)
    norm = (1 + 0.05 * rng.standard_normal(TINY.hidden_size)).astype(np.float16)
    tensors["model.embed_tokens.weight"], tensors["model.norm.weight"] = embed, norm
    if case["lm_head"] == "float":
        lm_head = (0.05 * rng.standard_normal((VOCAB, TINY.hidden_size))).astype(np.float16)
        tensors["lm_head.weight"] = lm_head
        lm_head = lm_head.astype(np.float64)
    elif case["lm_head"] == "quantized":
        codes, zeros, scales, g_idx, lm_head = _quantized_layer(rng, VOCAB, TINY.hidden_size, case)
        tensors.update({f"lm_head.{k}": v for k, v in write_layer(case, codes, zeros, scales, g_idx).items()})
    else:
        lm_head = embed.astype(np.float64)
    if edit is not None:
        edit(tensors)
    write_sharded(path, tensors, shards=2)
    c = TINY
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden_size,
              "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": c.num_hidden_layers,
              "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "vocab_size": VOCAB,
              "tie_word_embeddings": case["lm_head"] == "tied", "torch_dtype": "float16",
              "quantization_config": quantization_config(case)}
    (path / "config.json").write_text(json.dumps(config))
    return ref_layers, (embed.astype(np.float64), norm.astype(np.float64), lm_head)


def reference_logits(config, ref_layers, head, ids):
    """The Llama forward pass in float64 (Hugging Face's: RMSNorm, rotate-half rotary embeddings,
    causal grouped-query attention, SwiGLU), from the checkpoint's dequantized weights in their own
    input order."""
    embed, final_norm, lm_head = head
    eps, d = config.rms_norm_eps, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    B, S = ids.shape
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, d, 2) / d)
    angles = np.arange(S)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def linear(x, wb):
        w, b = wb
        return x @ w.T + (0 if b is None else b)

    def rope(t):                                     # (B, S, heads, d)
        t1, t2 = t[..., :d // 2], t[..., d // 2:]
        return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    x = embed[ids]
    mask = np.triu(np.full((S, S), -np.inf), 1)
    for L in ref_layers:
        h = norm(x, L["input_layernorm"])
        q = rope(linear(h, L["q_proj"]).reshape(B, S, nh, d))
        k = rope(linear(h, L["k_proj"]).reshape(B, S, nkv, d))
        v = linear(h, L["v_proj"]).reshape(B, S, nkv, d)
        k, v = np.repeat(k, nh // nkv, axis=2), np.repeat(v, nh // nkv, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + mask
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + linear(np.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, S, nh * d), L["o_proj"])
        h = norm(x, L["post_attention_layernorm"])
        gate, up = linear(h, L["gate_proj"]), linear(h, L["up_proj"])
        x = x + linear(gate / (1 + np.exp(-gate)) * up, L["down_proj"])
    return norm(x, final_norm) @ lm_head.T


@functools.lru_cache(maxsize=None)
def model_applies(field: str) -> bool:
    """Whether LlamaModel's NumPy blocks apply ``LayerWeights.<field>`` ("biases" or "perms"): the
    output of one random layer changes when the layer gets one on q_proj."""
    config = TINY.replace(num_hidden_layers=1)
    layer = random_layers(config, seed=1)[0]
    x = np.random.default_rng(2).standard_normal((1, 3, config.hidden_size)).astype(np.float32)
    changed = LayerWeights(**{**vars(layer), field: {
        "biases": {"q_proj": np.ones(config.hidden_size, np.float32)},
        "perms": {"q_proj": np.arange(config.hidden_size)[::-1].copy()}}[field]})
    return not np.array_equal(LlamaModel(config, [layer])(x), LlamaModel(config, [changed])(x))


# ------------------------------------------------------------------------------------ every format
@pytest.mark.parametrize("case", list(CASES))
def test_layers_read_exactly(case, rng, tmp_path):
    """Each projection dequantizes to the written weight, input features in perm's order; biases,
    norms and the head arrive as written."""
    ref_layers, (embed, final_norm, lm_head) = write_checkpoint(tmp_path, CASES[case], rng)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.config == TINY.replace(tie_word_embeddings=CASES[case]["lm_head"] == "tied")
    assert len(ckpt.layers) == TINY.num_hidden_layers
    assert ckpt.quantization.method == CASES[case]["method"]
    assert ckpt.quantization.group_size == CASES[case]["G"]
    for layer, ref in zip(ckpt.layers, ref_layers):
        assert set(layer.perms) == (set(PROJECTIONS) if CASES[case].get("act_order") else set())
        assert set(layer.biases) == {name for name in PROJECTIONS if ref[name][1] is not None}
        for name in PROJECTIONS:
            w, bias = ref[name]
            perm = layer.perms.get(name, np.arange(w.shape[1]))
            np.testing.assert_array_equal(getattr(layer, name).dequantize(np.float64), w[:, perm])
            if bias is not None:
                assert layer.biases[name].dtype == np.float32
                np.testing.assert_array_equal(layer.biases[name], bias)
        for name in ("input_layernorm", "post_attention_layernorm"):
            np.testing.assert_array_equal(getattr(layer, name), ref[name])
    np.testing.assert_array_equal(ckpt.head.embed_tokens, embed)
    np.testing.assert_array_equal(ckpt.head.norm, final_norm)
    if CASES[case]["lm_head"] == "tied":
        assert ckpt.head.lm_head is None
    elif CASES[case]["lm_head"] == "quantized":
        np.testing.assert_array_equal(ckpt.head.lm_head.dequantize(np.float64), lm_head)
    else:
        np.testing.assert_array_equal(ckpt.head.lm_head, lm_head)


@pytest.mark.parametrize("case", list(CASES))
def test_model_logits_match_float64(case, rng, tmp_path):
    """LlamaModel (NumPy backend) on the loaded checkpoint against the float64 forward pass of the
    written weights. Act-order and bias cases need the blocks to apply LayerWeights.perms / .biases."""
    for field, needed in (("perms", CASES[case].get("act_order")), ("biases", CASES[case].get("bias"))):
        if needed and not model_applies(field):
            pytest.skip(f"LlamaModel's blocks do not apply LayerWeights.{field} yet")
    ref_layers, head = write_checkpoint(tmp_path, CASES[case], rng)
    ckpt = load_checkpoint(tmp_path)
    ids = rng.integers(0, VOCAB, (2, 6))
    logits = LlamaModel(ckpt.config, ckpt.layers, backend="numpy", head=ckpt.head).logits(ids)
    assert rel_error(logits, reference_logits(TINY, ref_layers, head, ids)) < 1e-5


def test_act_order_layer_computes_the_written_weight(rng, tmp_path):
    """Independently of the model: x[..., perm] @ W_read.T is x @ W.T for every act-order projection."""
    ref_layers, _ = write_checkpoint(tmp_path, CASES["gptq-act-order"], rng)
    layer = load_checkpoint(tmp_path, num_layers=1).layers[0]
    for name in PROJECTIONS:
        w = ref_layers[0][name][0]
        x = rng.standard_normal((3, w.shape[1]))
        got = x[:, layer.perms[name]] @ getattr(layer, name).dequantize(np.float64).T
        np.testing.assert_allclose(got, x @ w.T, rtol=1e-12, atol=1e-12)


def test_num_layers_reads_and_checks_only_those(rng, tmp_path):
    """num_layers=1 needs layer 0 only: a checkpoint whose layer 1 lacks a tensor still loads it."""
    write_checkpoint(tmp_path, CASES["gptq-v2"], rng)
    index = tmp_path / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    del d["weight_map"]["model.layers.1.mlp.up_proj.qzeros"]
    index.write_text(json.dumps(d))
    assert load_checkpoint(tmp_path, num_layers=1).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.qzeros"):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------------------------ the AWQ writer
def test_save_awq_checkpoint_writes_biases_and_refuses_perms(rng, tmp_path):
    layers = [w.quantized(64) for w in random_layers(TINY, seed=int(rng.integers(2**31)))]
    for w in layers:
        w.biases = {name: rng.standard_normal(w.projections()[name].out_features).astype(np.float16)
                    for name in ("q_proj", "k_proj", "v_proj")}
    save_awq_checkpoint(tmp_path, TINY, layers, shards=2)
    assert TensorStore(tmp_path).headers["model.layers.1.self_attn.k_proj.bias"] == ("F16", (128,))
    ckpt = load_checkpoint(tmp_path)
    for a, b in zip(layers, ckpt.layers):
        assert set(b.biases) == {"q_proj", "k_proj", "v_proj"} and not b.perms
        for name, bias in a.biases.items():
            np.testing.assert_array_equal(b.biases[name], bias.astype(np.float32))
    layers[1].perms = {"down_proj": np.arange(TINY.intermediate_size)[::-1].copy()}
    with pytest.raises(ValueError, match=r"layer 1 has act-order perms \(down_proj\): an AWQ checkpoint stores none"):
        save_awq_checkpoint(tmp_path / "perm", TINY, layers)


# ------------------------------------------------------------------------------------- refusals
@pytest.fixture
def no_tensor_read(monkeypatch):
    """Any tensor read fails the test: refusals must come from config.json and the headers alone."""
    def read(self, name):
        raise AssertionError(f"{name} was read before the checkpoint was refused")
    monkeypatch.setattr(TensorStore, "__getitem__", read)


def _edit_quantization_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    d["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("case,changes,match", [
    ("gptq-v2", dict(bits=8), "quantization_config.bits=8 is not supported; only 4-bit"),
    ("awq", dict(group_size=48), "quantization_config.group_size=48: group_size=48 is not supported"),
    ("gptq-v2", dict(group_size=96), "quantization_config.group_size=96: in_features=256 is not a multiple of "
                                     "group_size=96"),
    ("awq", dict(quant_method="hqq"), r"quant_method='hqq' is not supported; one of \('awq', 'gptq', "
                                      r"'compressed-tensors'\)"),
    ("gptq-v2", dict(checkpoint_format="marlin"), "quantization_config.checkpoint_format='marlin' is not supported"),
    ("awq", dict(version="gemv"), "quantization_config.version='gemv' is not supported"),
    ("ct-group-symmetric", dict(format="naive-quantized"), "quantization_config.format='naive-quantized' is not "
                                                            "supported; only 'pack-quantized'"),
])
def test_bad_quantization_config_refused_before_the_weights(case, changes, match, rng, tmp_path):
    write_checkpoint(tmp_path, CASES[case], rng)
    _edit_quantization_config(tmp_path, **changes)
    for f in tmp_path.glob("*.safetensors*"):     # the weights are not even looked at
        f.unlink()
    with pytest.raises(ValueError, match=match):
        load_checkpoint(tmp_path)


def _damage(kind):
    def edit(tensors):
        if kind == "missing":
            del tensors["model.layers.1.self_attn.v_proj.weight_zero_point"]
        elif kind == "shape":
            tensors["model.layers.1.mlp.down_proj.weight_scale"] = tensors["model.layers.1.mlp.down_proj.weight_scale"][:, :4]
        elif kind == "dtype":
            tensors["model.layers.1.mlp.gate_proj.weight_packed"] = np.zeros((512, 32), np.float32)
        elif kind == "bias shape":
            tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(5, np.float16)
        else:
            tensors["model.layers.1.input_layernorm.weight"] = np.zeros(TINY.hidden_size, np.int32)
    return edit


@pytest.mark.parametrize("damage,match", [
    ("missing", r"lacks 1 tensor\(s\) the model needs, first: model.layers.1.self_attn.v_proj.weight_zero_point"),
    ("shape", r"model.layers.1.mlp.down_proj.weight_scale has shape \(256, 4\), expected \(N, K/G\) = \(256, 8\)"),
    ("dtype", "model.layers.1.mlp.gate_proj.weight_packed has dtype F32, expected I32 or U32"),
    ("bias shape", r"model.layers.0.self_attn.q_proj.bias has shape \(5,\), expected \(out_features,\) = \(256,\)"),
    ("norm dtype", "model.layers.1.input_layernorm.weight has dtype I32, expected F16 or BF16 or F32"),
])
def test_bad_tensor_refused_before_the_weights(damage, match, rng, tmp_path, no_tensor_read):
    """A bad tensor, in the last layer too, is named from the safetensors headers before any tensor is read."""
    write_checkpoint(tmp_path, CASES["ct-group-zero-points-bf16"], rng, edit=_damage(damage))
    with pytest.raises(ValueError, match=match):
        load_checkpoint(tmp_path)


def test_zero_biases_are_left_out(rng, tmp_path):
    """AutoGPTQ writes a bias of zeros for every linear layer: read as no bias."""
    def zero_biases(tensors):
        for name in [k for k in tensors if k.endswith(".qweight") and k.startswith("model.")]:
            tensors[name.replace(".qweight", ".bias")] = np.zeros(tensors[name].shape[1], np.float16)
    write_checkpoint(tmp_path, CASES["gptq-v1-zeros-of-0"], rng, edit=zero_biases)
    assert TensorStore(tmp_path).headers["model.layers.0.mlp.down_proj.bias"] == ("F16", (256,))
    assert all(not layer.biases for layer in load_checkpoint(tmp_path).layers)

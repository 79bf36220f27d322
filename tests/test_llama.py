"""quickcupy.llama: the decoder block against itself (cache vs full pass, GQA vs MHA), checkpoints,
the command line; on a GPU, the fp16/AWQ/QUICK blocks against the float32 NumPy block."""
import importlib.util
import json
import re

import numpy as np
import pytest

from conftest import attention_f64, rel_error
from quickcupy import pack_awq, quantize
from quickcupy.device import no_gpu_reason
from quickcupy.attention import decode_attention, decode_attention_rope
from quickcupy.llama import (NORMS, PROJECTIONS, LayerWeights, LlamaConfig, LlamaModel, apply_rope, attention,
                             load_checkpoint, make_linear, random_layers, rms_norm, rope_tables,
                             save_awq_checkpoint, silu_mul)
from quickcupy.llama import model as llama_model
from quickcupy.llama.model import fuse
from quickcupy.tools.llama_bench import estimate_gpu_bytes

TINY = LlamaConfig.preset("tiny")
# Several 32/64-column tiles per projection, MHA, 2 layers: still quick on the host.
MEDIUM = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8,
                     num_hidden_layers=2)


def _hidden(rng, batch, seq, config=TINY):
    return rng.standard_normal((batch, seq, config.hidden_size), dtype=np.float32)


def _seed(rng):
    return int(rng.integers(2**31))


# ------------------------------------------------------------------------------------------- config
def test_presets():
    c = LlamaConfig.preset("7b")
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.num_hidden_layers, c.rms_norm_eps, c.rope_theta, c.head_dim) == (4096, 11008, 32, 32, 32, 1e-5,
                                                                                10000.0, 128)
    assert TINY.num_key_value_heads < TINY.num_attention_heads          # the CPU tests exercise GQA
    with pytest.raises(ValueError, match="unknown preset '8b'"):
        LlamaConfig.preset("8b")


@pytest.mark.parametrize("change,match", [
    ({"hidden_size": 0}, "hidden_size must be a positive int, got 0"),
    ({"intermediate_size": -512}, "intermediate_size must be a positive int"),
    ({"num_attention_heads": 4.0}, "num_attention_heads must be a positive int, got 4.0"),
    ({"num_key_value_heads": True}, "num_key_value_heads must be a positive int, got True"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive int"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps must be a positive finite number"),
    ({"rope_theta": float("inf")}, "rope_theta must be a positive finite number"),
    ({"num_attention_heads": 3}, "hidden_size=256 is not a multiple of num_attention_heads=3"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"hidden_size": 36, "num_attention_heads": 4, "num_key_value_heads": 4}, "head_dim .* = 9 must be even"),
])
def test_bad_config_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**change)


def test_config_from_hf_dict():
    d = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
         "num_hidden_layers": 2, "torch_dtype": "float16"}
    c = LlamaConfig.from_dict(d)
    assert c.num_key_value_heads == 4 and c.rms_norm_eps == 1e-6 and c.rope_theta == 10000.0  # HF defaults
    with pytest.raises(ValueError, match="config.json lacks intermediate_size"):
        LlamaConfig.from_dict({k: v for k, v in d.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="model_type='gemma' is not supported; supported: 'llama', "):
        LlamaConfig.from_dict({**d, "model_type": "gemma"})
    with pytest.raises(ValueError, match="head_dim=128 differs"):
        LlamaConfig.from_dict({**d, "head_dim": 128})


# ----------------------------------------------------------------------------------- block pieces
def test_rms_norm(rng):
    x = rng.standard_normal((3, 5, 64), dtype=np.float32) * 7
    w = np.ones(64, np.float32)
    y = rms_norm(x, w, 1e-6)
    np.testing.assert_allclose(np.sqrt((y ** 2).mean(-1)), 1, rtol=1e-5)
    np.testing.assert_allclose(rms_norm(x * 0.01, w, 1e-9), y, rtol=1e-4, atol=1e-6)   # scale invariant
    w2 = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    np.testing.assert_allclose(rms_norm(x, w2, 1e-6), y * w2, rtol=1e-6)


def test_rope(rng):
    d = TINY.head_dim
    cos, sin = rope_tables(TINY, np.arange(40))
    x = rng.standard_normal((2, 40, 3, d), dtype=np.float32)
    y = apply_rope(x, cos, sin)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])                    # position 0: no rotation
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # q.k after rotation depends on positions only through their difference.
    q, k = rng.standard_normal((2, d), dtype=np.float32)
    def rotated(v, pos):
        return apply_rope(np.broadcast_to(v, (1, 40, 1, d)).copy(), cos, sin)[0, pos, 0]
    for m, n in ((5, 2), (30, 27), (13, 10)):
        np.testing.assert_allclose(rotated(q, m) @ rotated(k, n), rotated(q, 3) @ rotated(k, 0), rtol=1e-4)
    assert not np.isclose(rotated(q, 5) @ rotated(k, 2), rotated(q, 5) @ rotated(k, 4))


# -------------------------------------------------------------------------------------- the stack
def test_decode_with_cache_equals_full_forward(rng):
    model = LlamaModel(TINY, random_layers(TINY, seed=_seed(rng)))
    x = _hidden(rng, 3, 14)
    full = model(x)
    assert rel_error(full, x) > 0.02                       # the blocks do change the input
    cache = model.new_cache(3, 16)
    steps = [model(x[:, :6], cache)]                        # prefill
    steps += [model(x[:, t:t + 1], cache) for t in range(6, 14)]   # one token at a time
    assert cache.length == 14
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)

    cache.reset()                                           # chunked prefill: a chunk at start > 0
    chunks = [model(x[:, :4], cache), model(x[:, 4:11], cache), model(x[:, 11:], cache)]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=1e-5, atol=1e-5)


def test_attention_is_causal(rng):
    model = LlamaModel(TINY, random_layers(TINY, seed=_seed(rng)))
    x = _hidden(rng, 2, 10)
    x2 = x.copy()
    x2[:, 6:] = rng.standard_normal(x2[:, 6:].shape)
    y, y2 = model(x), model(x2)
    np.testing.assert_array_equal(y[:, :6], y2[:, :6])
    assert not np.allclose(y[:, 6:], y2[:, 6:])


def test_gqa_equals_mha_with_repeated_kv_heads(rng):
    gqa = TINY.replace(num_attention_heads=8, num_key_value_heads=2)
    mha = gqa.replace(num_key_value_heads=8)
    layers = random_layers(gqa, seed=_seed(rng))
    d, group = gqa.head_dim, 4

    def repeat_heads(w):   # (n_kv * d, H) -> (n_kv * group * d, H): query head h reads kv head h // group
        return np.repeat(w.reshape(gqa.num_key_value_heads, d, -1), group, axis=0).reshape(-1, w.shape[1])
    mha_layers = [LayerWeights(**{**w.__dict__, "k_proj": repeat_heads(w.k_proj), "v_proj": repeat_heads(w.v_proj)})
                  for w in layers]
    x = _hidden(rng, 2, 9, gqa)
    y_gqa = LlamaModel(gqa, layers)(x)
    np.testing.assert_allclose(y_gqa, LlamaModel(mha, mha_layers)(x), rtol=1e-5, atol=1e-5)
    cache = LlamaModel(gqa, layers).new_cache(2, 9)
    model = LlamaModel(gqa, layers)
    steps = [model(x[:, :5], cache)] + [model(x[:, t:t + 1], cache) for t in range(5, 9)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), y_gqa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shapes,length,match", [
    (((2, 4, 80), (2, 2, 80, 16), (2, 2, 16, 80)), 3, "head_dim=80 is not a multiple of 32 between 64 and 256"),
    (((2, 4, 320), (2, 2, 320, 16), (2, 2, 16, 320)), 3, "head_dim=320 is not a multiple of 32"),
    (((2, 4, 64), (2, 2, 64, 16), (2, 2, 16, 64)), 0, r"length=0 must lie in 1..max_len=16"),
    (((2, 4, 64), (2, 2, 64, 16), (2, 2, 16, 64)), 17, r"length=17 must lie in 1..max_len=16"),
    (((2, 6, 64), (2, 4, 64, 16), (2, 4, 16, 64)), 3, "n_heads=6 is not a multiple of n_kv=4"),
    (((2, 4, 64), (2, 2, 64, 16), (2, 2, 64, 16)), 3, r"must be \(B, n_kv, d, max_len\)"),
    (((2, 1, 4, 64), (2, 2, 64, 16), (2, 2, 16, 64)), 3, "must be 3-D, 4-D, 4-D"),
])
def test_decode_attention_checks_its_inputs(shapes, length, match):
    q, keys, values = (np.zeros(shape, np.float16) for shape in shapes)
    with pytest.raises(ValueError, match=match):
        decode_attention(q, keys, values, length)
    with pytest.raises(ValueError, match="keys must be float16, got float32"):
        decode_attention(np.zeros((2, 4, 64), np.float16), np.zeros((2, 2, 64, 16), np.float32),
                         np.zeros((2, 2, 16, 64), np.float16), 3)


def test_fused_quantized_equals_quantized_fusion(rng):
    a = rng.standard_normal((64, 256), dtype=np.float32)
    b = rng.standard_normal((128, 256), dtype=np.float32) * 3
    fused = fuse([quantize(a, 64), quantize(b, 64)])
    whole = quantize(np.concatenate([a, b]), 64)
    for name in ("codes", "zeros", "scales"):
        np.testing.assert_array_equal(getattr(fused, name), getattr(whole, name))
    np.testing.assert_array_equal(fuse([a, b]), np.concatenate([a, b]))
    with pytest.raises(ValueError, match="share in_features and group_size"):
        fuse([quantize(a, 64), quantize(b, 128)])


def test_linear_factory(rng):
    w = rng.standard_normal((96, 64), dtype=np.float32)
    x = rng.standard_normal((2, 3, 64), dtype=np.float32)
    np.testing.assert_allclose(make_linear("numpy", w)(x), x @ w.T, rtol=1e-5, atol=1e-5)
    q = quantize(w, 32)
    np.testing.assert_allclose(make_linear("numpy", q)(x), x @ q.dequantize().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend='int8' is not one of"):
        make_linear("int8", w)
    # silu_mul=True: x is [gate | up] and silu(gate) * up the product's input (down_proj of a step)
    gate_up = rng.standard_normal((2, 3, 128), dtype=np.float32)
    np.testing.assert_array_equal(make_linear("numpy", w)(gate_up, silu_mul=True),
                                  make_linear("numpy", w)(silu_mul(gate_up[..., :64], gate_up[..., 64:])))


@pytest.mark.parametrize("backend,dtype,match", [
    ("fp16", "bfloat16", "backend='fp16' runs float16 only, got dtype=bfloat16; use backend='dense'"),
    ("dense", "float32", "dtype='float32' is not an activation dtype; use one of bf16, bfloat16, f16"),
    ("numpy", "int8", "dtype='int8' is not an activation dtype"),
    ("bf16", "bfloat16", "backend='bf16' is not one of"),
])
def test_dtype_is_checked_before_anything_runs(rng, backend, dtype, match):
    with pytest.raises(ValueError, match=match):
        LlamaModel(TINY, random_layers(TINY, seed=_seed(rng)), backend, dtype=dtype)


@pytest.mark.parametrize("dtype,name", [("float16", "float16"), ("bfloat16", "bfloat16"), (np.float16, "float16")])
def test_dtype_names(dtype, name):
    assert llama_model.check_dtype("dense", dtype) == llama_model.check_dtype("numpy", dtype) == name


def test_numpy_backend_is_float32_whatever_the_dtype(rng):
    """The reference stays float32: dtype only chooses the GPU activations."""
    layers = random_layers(TINY, seed=_seed(rng))
    x = _hidden(rng, 1, 3)
    y = LlamaModel(TINY, layers, "numpy", dtype="bfloat16")(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, LlamaModel(TINY, layers, "numpy")(x))


def test_cli_dtype_reaches_the_report(tmp_path, capsys, monkeypatch):
    """--dtype bf16 is parsed, checked and reported (without a GPU the NumPy path runs)."""
    from quickcupy.__main__ import main
    from quickcupy.tools import llama_bench
    seen = []
    real = llama_bench.LlamaModel

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return real(*args, **kwargs)
    monkeypatch.setattr(llama_bench, "LlamaModel", spy)
    monkeypatch.setattr("quickcupy.device.no_gpu_reason", lambda: "no GPU in this test")
    out_json = tmp_path / "llama.json"
    assert main(["llama", "--preset", "tiny", "--layers", "1", "--batch", "1", "--prompt", "4", "--gen", "1",
                 "--dtype", "bf16", "--json", str(out_json)]) == 0
    assert "bf16 activations" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["dtype"] == "bfloat16"
    assert seen[-1] == "bfloat16"      # the timed model (the references before it are float32 NumPy)


@pytest.mark.parametrize("shapes,n_heads,match", [
    (((2, 7, 64), (2, 2, 64, 16), (2, 2, 16, 64)), 4, r"qkv has 7 heads, n_heads \+ 2 n_kv = 8"),
    (((2, 1, 8, 64), (2, 2, 64, 16), (2, 2, 16, 64)), 4, r"cos, sin must be \(positions, 32\) float32"),
    (((2, 8), (2, 2, 64, 16), (2, 2, 16, 64)), 4, r"must be 3-D \(or \(B, 1, heads, d\)\), 4-D, 4-D"),
    (((2, 8, 80), (2, 2, 80, 16), (2, 2, 16, 80)), 4, "head_dim=80 is not a multiple of 32"),
])
def test_decode_attention_rope_checks_its_inputs(shapes, n_heads, match):
    qkv, keys, values = (np.zeros(shape, np.float16) for shape in shapes)
    cos = np.zeros((16, 16), np.float32)       # wrong width for d = 64 unless the shapes fail first
    with pytest.raises(ValueError, match=match):
        decode_attention_rope(qkv, keys, values, cos, cos, n_heads, 3)


def test_numpy_kv_cache_keeps_max_len():
    assert llama_model.KVCache(TINY, 1, 13).max_len == 13          # the GPU's rounds up to a multiple of 8


def test_quantized_numpy_stack_within_quantization_error(rng):
    layers = random_layers(TINY, seed=_seed(rng))
    x = _hidden(rng, 2, 8)
    ref = LlamaModel(TINY, layers)(x)
    err = rel_error(LlamaModel(TINY, [w.quantized(64) for w in layers])(x), ref)
    assert 1e-4 < err < 5e-2


def test_model_checks_its_inputs(rng):
    layers = random_layers(TINY, seed=_seed(rng))
    model = LlamaModel(TINY, layers)
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, 256\)"):
        model(np.ones((1, 2, 128), np.float32))
    cache = model.new_cache(2, 4)
    with pytest.raises(ValueError, match="batch=2 sequences, x has batch=1"):
        model(_hidden(rng, 1, 2), cache)
    model(_hidden(rng, 2, 3), cache)
    with pytest.raises(ValueError, match="exceed the cache's max_len=4"):
        model(_hidden(rng, 2, 2), cache)
    with pytest.raises(ValueError, match="got 1 layers of weights but num_hidden_layers=2"):
        LlamaModel(TINY, layers[:1])
    with pytest.raises(ValueError, match=r"layer 0 k_proj has shape \(128, 256\), the config needs .* = \(256, 256\)"):
        LlamaModel(TINY.replace(num_key_value_heads=4), layers)


def test_estimate_gpu_bytes():
    c = LlamaConfig.preset("7b").replace(num_hidden_layers=4)
    params = 4 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    e16 = estimate_gpu_bytes(c, "fp16", 16, 128, 128)
    assert e16["weights"] == 2 * params
    assert e16["kv_cache"] == 2 * 4 * 16 * 4096 * 256 * 2
    assert 0.25 < estimate_gpu_bytes(c, "quick", 16, 128, 128)["weights"] / e16["weights"] < 0.3


# ------------------------------------------------------------------------------------- checkpoints
def _assert_same_layers(a, b):
    for wa, wb in zip(a, b, strict=True):
        for name in PROJECTIONS:
            qa, qb = getattr(wa, name), getattr(wb, name)
            assert qa.group_size == qb.group_size
            np.testing.assert_array_equal(qa.codes, qb.codes)
            np.testing.assert_array_equal(qa.zeros, qb.zeros)
            np.testing.assert_array_equal(qa.scales.view(np.uint16), qb.scales.view(np.uint16))
        for name in NORMS:
            assert getattr(wb, name).dtype == np.float16
            np.testing.assert_array_equal(getattr(wa, name).view(np.uint16), getattr(wb, name).view(np.uint16))


def test_checkpoint_round_trip(rng, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file
    config = TINY.replace(num_hidden_layers=3)
    layers = [w.quantized(64) for w in random_layers(config, seed=_seed(rng))]
    save_awq_checkpoint(tmp_path, config, layers, shards=2)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
    tensors = {}
    for f in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    packed = pack_awq(layers[2].k_proj)             # the file holds exactly AutoAWQ's tensors
    assert tensors["model.layers.2.self_attn.k_proj.qweight"].dtype == np.int32
    np.testing.assert_array_equal(tensors["model.layers.2.self_attn.k_proj.qweight"], packed.qweight)
    np.testing.assert_array_equal(tensors["model.layers.2.self_attn.k_proj.qzeros"], packed.qzeros)
    assert tensors["model.layers.2.input_layernorm.weight"].dtype == np.float16

    ckpt = load_checkpoint(tmp_path)
    assert ckpt.config == config and ckpt.quantization.group_size == 64 and ckpt.quantization.method == "awq"
    _assert_same_layers(layers, ckpt.layers)
    first = load_checkpoint(tmp_path, num_layers=1)
    assert first.config.num_hidden_layers == 1
    _assert_same_layers(layers[:1], first.layers)
    x = _hidden(rng, 1, 5)
    np.testing.assert_array_equal(LlamaModel(config, ckpt.layers)(x), LlamaModel(config, layers)(x))


def test_checkpoint_one_group_per_row(rng, tmp_path):
    pytest.importorskip("safetensors")
    layers = random_layers(TINY, seed=_seed(rng))
    save_awq_checkpoint(tmp_path, TINY, layers, group_size=-1)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.quantization.group_size == -1 and ckpt.layers[0].down_proj.group_size == TINY.intermediate_size
    _assert_same_layers([w.quantized(-1) for w in layers], ckpt.layers)


def _edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    d["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("damage,error,match", [
    ("missing tensor", ValueError, "lacks 1 tensor.*model.layers.1.mlp.up_proj.qzeros"),
    ("bitsandbytes", ValueError, "quant_method='bitsandbytes' is not supported"),
    ("8 bits", ValueError, "bits=8 is not supported"),
    ("gemv", ValueError, "version='gemv' is not supported"),
    ("no quantization_config", ValueError, "no quantization_config"),
    ("no config.json", FileNotFoundError, "has no config.json"),
    ("no safetensors", FileNotFoundError, r"has no \*.safetensors files"),
    ("wrong dims", ValueError, r"model.layers.0.self_attn.k_proj.qweight has shape \(256, 16\), "
                               r"expected \(K, N/8\) = \(256, 32\)"),
    ("too many layers", ValueError, "num_layers=3 must lie in 1..2"),
    ("config is a list", ValueError, r"config.json holds a JSON list, not an object"),
    ("config not json", ValueError, r"config.json is not valid JSON"),
    ("index without weight_map", ValueError, r"model.safetensors.index.json has no \"weight_map\""),
    ("group size 48", ValueError, "quantization_config.group_size=48: group_size=48 is not supported"),
    ("NaN scale", ValueError, r"model.layers.0.self_attn.q_proj: scales must be finite and positive"),
    ("negative scale", ValueError, r"model.layers.1.mlp.down_proj: scales must be finite and positive"),
    ("NaN norm", ValueError, r"model.layers.0.input_layernorm.weight has NaN or inf"),
])
def test_bad_checkpoint_rejected(rng, tmp_path, damage, error, match):
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file, save_file
    save_awq_checkpoint(tmp_path, TINY, random_layers(TINY, seed=_seed(rng)))
    num_layers = None
    if damage == "missing tensor":
        f = str(tmp_path / "model.safetensors")
        tensors = load_file(f)
        del tensors["model.layers.1.mlp.up_proj.qzeros"]
        save_file(tensors, f)
    elif damage == "bitsandbytes":
        _edit_config(tmp_path, quant_method="bitsandbytes")
    elif damage == "8 bits":
        _edit_config(tmp_path, bits=8)
    elif damage == "gemv":
        _edit_config(tmp_path, version="gemv")
    elif damage == "no quantization_config":
        d = json.loads((tmp_path / "config.json").read_text())
        del d["quantization_config"]
        (tmp_path / "config.json").write_text(json.dumps(d))
    elif damage == "no config.json":
        (tmp_path / "config.json").unlink()
    elif damage == "no safetensors":
        (tmp_path / "model.safetensors").unlink()
    elif damage == "wrong dims":
        d = json.loads((tmp_path / "config.json").read_text())
        d["num_attention_heads"] = d["num_key_value_heads"] = 8
        (tmp_path / "config.json").write_text(json.dumps(d))
    elif damage == "too many layers":
        num_layers = 3
    elif damage == "config is a list":
        (tmp_path / "config.json").write_text("[1, 2]")
    elif damage == "config not json":
        (tmp_path / "config.json").write_text("{hidden_size: 5")
    elif damage == "index without weight_map":
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    elif damage == "group size 48":
        _edit_config(tmp_path, group_size=48)
    else:                                   # a corrupted value in one tensor
        f = str(tmp_path / "model.safetensors")
        tensors = load_file(f)
        name, value = {"NaN scale": ("model.layers.0.self_attn.q_proj.scales", np.nan),
                       "negative scale": ("model.layers.1.mlp.down_proj.scales", -1.0),
                       "NaN norm": ("model.layers.0.input_layernorm.weight", np.nan)}[damage]
        tensors[name][0, ...] = value
        save_file(tensors, f)
    with pytest.raises(error, match=match):
        load_checkpoint(tmp_path, num_layers=num_layers)


def test_bf16_scales_are_read(rng, tmp_path):
    """NumPy has no bfloat16: the loader reads BF16 tensors itself and converts them to float16."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file
    save_awq_checkpoint(tmp_path, TINY, random_layers(TINY, seed=_seed(rng)))
    before = load_checkpoint(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    # Rewrite the file by hand with every scales tensor as BF16 (the top 16 bits of float32).
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        if name.endswith(".scales"):
            data = (t.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
            dtype = "BF16"
        else:
            data, dtype = t.tobytes(), {"int32": "I32", "float16": "F16"}[t.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    f.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    after = load_checkpoint(tmp_path)
    s0 = before.layers[0].q_proj.scales.astype(np.float32)
    s1 = after.layers[0].q_proj.scales.astype(np.float32)
    assert np.allclose(s0, s1, rtol=2 ** -7)        # bf16 keeps 8 bits of mantissa
    np.testing.assert_array_equal(before.layers[1].down_proj.codes, after.layers[1].down_proj.codes)


def test_cli_checkpoint_defaults_to_its_layer_count(rng, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from quickcupy.__main__ import main
    save_awq_checkpoint(tmp_path, TINY, random_layers(TINY, seed=_seed(rng)))
    assert main(["llama", "--checkpoint", str(tmp_path), "--batch", "1", "--prompt", "4", "--gen", "1"]) == 0
    assert "2 Llama blocks" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ command line
def test_cli_runs(tmp_path, capsys):
    from quickcupy.__main__ import main
    out_json = tmp_path / "llama.json"
    rc = main(["llama", "--preset", "tiny", "--layers", "2", "--batch", "1,3", "--prompt", "8", "--gen", "4",
               "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0
    if no_gpu_reason() is not None:
        assert out.splitlines()[0].startswith(no_gpu_reason())
    assert "tokens/s" in out and "relative error" in out
    report = json.loads(out_json.read_text())
    assert {r["batch"] for r in report["throughput"]} == {1, 3}
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in report["throughput"])
    assert all(a["vs_fp32"] < 5e-2 for a in report["accuracy"])
    if no_gpu_reason() is None:
        assert {r["backend"] for r in report["throughput"]} == {"dense", "awq", "quick"}
        assert {a["backend"] for a in report["accuracy"]} == {"numpy", "dense", "awq", "quick"}


def test_cli_runs_a_checkpoint(rng, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from quickcupy.__main__ import main
    save_awq_checkpoint(tmp_path, TINY, random_layers(TINY, seed=_seed(rng)), group_size=64)
    rc = main(["llama", "--checkpoint", str(tmp_path), "--layers", "1", "--batch", "2", "--prompt", "4",
               "--gen", "2"])
    assert rc == 0
    assert "awq (gemm) checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--batch", "1,0"], "--batch=0 must be >= 1"),
    (["--batch", "x"], "--batch: 'x' is not an integer"),
    (["--prompt", "0"], "--prompt=0 must be >= 1"),
    (["--preset", "8b"], "--preset '8b' is not one of"),
    (["--backends", "fp16,int8"], "--backends: unknown 'int8'"),
    (["--group-size", "100"], "--group-size: group_size=100 is not supported"),
    (["--group-size", "48"], "--group-size: group_size=48 is not supported"),
    (["--json", "/nonexistent/dir/out.json"], "--json .* does not exist"),
    pytest.param(["--checkpoint", "/nonexistent/dir"], "--checkpoint: .* has no config.json",
                 marks=pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                          reason="needs safetensors (pip install 'quickcupy[llama]')")),
    (["--dtype", "fp8"], "--dtype 'fp8' is not one of float16, fp16, half, f16, bfloat16, bf16"),
    (["--dtype", "bf16", "--backends", "fp16,awq"], "--backends fp16 is float16 cuBLAS; with --dtype bf16 use dense"),
])
def test_cli_bad_argument(argv, match, capsys):
    from quickcupy.__main__ import main
    assert main(["llama", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(match, err), err


# ---------------------------------------------------------------------------------------------- GPU
needs_gpu = pytest.mark.skipif(no_gpu_reason() is not None, reason=f"needs a CUDA GPU: {no_gpu_reason()}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("config", [TINY, MEDIUM], ids=["tiny", "medium"])
@pytest.mark.parametrize("backend", ["awq", "quick"])
def test_gpu_quantized_stack_matches_numpy(rng, backend, config):
    layers = random_layers(config, seed=_seed(rng))
    quantized = [w.quantized(128) for w in layers]
    x = _hidden(rng, 2, 16, config)
    y = LlamaModel(config, quantized, backend)(x)
    assert y.dtype == np.float16 and y.shape == x.shape
    same_weights = LlamaModel(config, quantized, "numpy")(x)           # float32, dequantized weights
    float_weights = LlamaModel(config, layers, "numpy")(x)
    assert rel_error(y, same_weights) < 3e-3
    # Within the 4-bit weights' own error. On random Gaussian weights that error grows with the width
    # (the blocks' share of the output grows): about 1.5% for tiny, 7% for medium.
    quantization_error = rel_error(same_weights, float_weights)
    assert rel_error(y, float_weights) < quantization_error + 3e-3
    if config is TINY:
        assert rel_error(y, float_weights) < 5e-2


@pytest.mark.gpu
@needs_gpu
def test_gpu_fp16_stack_matches_numpy(rng):
    layers = random_layers(MEDIUM, seed=_seed(rng))
    x = _hidden(rng, 2, 16, MEDIUM)
    assert rel_error(LlamaModel(MEDIUM, layers, "fp16")(x), LlamaModel(MEDIUM, layers, "numpy")(x)) < 3e-3


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend,config", [("fp16", TINY), ("awq", TINY), ("quick", TINY), ("fp16", MEDIUM)],
                         ids=["fp16", "awq", "quick", "fp16-medium"])   # tiny: GQA, d 64; medium: MHA, d 128
def test_gpu_decode_with_cache_equals_full_forward(rng, backend, config, monkeypatch):
    import cupy
    fused_calls = []

    def counted(*args, start=None, **kwargs):    # every decode step of every layer runs the fused kernel
        fused_calls.append(args[6] + (0 if start is None else int(start.get()[0])))   # the length it attends
        return decode_attention_rope(*args, start=start, **kwargs)
    monkeypatch.setattr(llama_model, "decode_attention_rope", counted)
    model = LlamaModel(config, [w.quantized(64) for w in random_layers(config, seed=_seed(rng))], backend)
    x = cupy.asarray(_hidden(rng, 3, 12, config)).astype(np.float16)
    full = model(x)
    cache = model.new_cache(3, 16)
    steps = [model(x[:, :5], cache)] + [model(x[:, t:t + 1], cache) for t in range(5, 12)]
    assert rel_error(cupy.concatenate(steps, axis=1), full.get()) < 3e-3
    assert fused_calls == [t + 1 for t in range(5, 12) for _ in range(config.num_hidden_layers)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("nh,nkv", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa8"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("batch", [1, 5])
def test_gpu_fused_decode_attention_equals_matmul_path(rng, nh, nkv, d, batch):
    """One decode step on a random cache, fused kernel vs batched matmuls, at lengths around the
    128-position tiles; max_len odd, so rows of K^T start at odd addresses."""
    import cupy
    max_len = 301
    for length in (1, 2, 31, 127, 128, 129, 256, 257, max_len):
        start = length - 1
        qk = cupy.asarray(rng.standard_normal((batch, 1, nh + nkv, d), dtype=np.float32)).astype(np.float16)
        q, k = qk[:, :, :nh], qk[:, :, nh:]          # views, as LlamaBlock passes them
        v = cupy.asarray(rng.standard_normal((batch, 1, nkv, d), dtype=np.float32)).astype(np.float16)
        keys = cupy.asarray(rng.standard_normal((batch, nkv, d, max_len), dtype=np.float32)).astype(np.float16)
        values = cupy.asarray(rng.standard_normal((batch, nkv, max_len, d), dtype=np.float32)).astype(np.float16)
        keys2, values2 = keys.copy(), values.copy()

        fused = attention(q, k, v, start, (keys, values))
        matmul = attention(q, k, v, start, (keys2, values2), fused=False)
        assert fused.shape == matmul.shape == (batch, 1, nh * d) and fused.dtype == np.float16
        cupy.testing.assert_array_equal(keys, keys2)             # both wrote k, v into the cache
        cupy.testing.assert_array_equal(values, values2)
        where = f"length={length}"
        assert rel_error(fused, matmul.get()) < 2e-3, where
        ref = attention_f64(q.reshape(batch, nh, d).get(), keys.get(), values.get(), length)
        assert rel_error(fused, ref) < 1e-3, where

        # Positions >= length are not read: NaN there changes nothing.
        keys[..., length:] = np.nan
        values[:, :, length:] = np.nan
        again = decode_attention(q.reshape(batch, nh, d), keys, values, length)
        cupy.testing.assert_array_equal(again, fused)


def test_gpu_memory_estimate_uses_the_real_group_size():
    """-1 means one group per row (G = in_features), not 128: fewer scales than G = 128."""
    cfg = LlamaConfig.preset("7b").replace(num_hidden_layers=1)
    per_row = estimate_gpu_bytes(cfg, "quick", 1, 8, 8, -1)["weights"]
    g128 = estimate_gpu_bytes(cfg, "quick", 1, 8, 8, 128)["weights"]
    params = sum(n * k for n, k in llama_model.projection_shapes(cfg).values())
    rows = sum(n for n, _ in llama_model.projection_shapes(cfg).values())
    assert per_row == params // 2 + rows * 5 // 2 and g128 > per_row

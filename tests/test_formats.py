"""quickcupy.formats: GPTQ and compressed-tensors checkpoints read bit for bit, act-order included;
quantization_config checked before any weight is read.

The writers (tests/writers.py) are independent statements of each format, written from its
documentation, not inverses of the readers.
"""
import numpy as np
import pytest

from conftest import rel_error
from quickcupy import pack_quick, reference_gemm, unpack_quick
from quickcupy.formats import perm_from_g_idx, unpack_compressed_tensors, unpack_gptq
from writers import ct_config, dequantize, pack_words, write_awq, write_compressed_tensors, write_gptq

TOL = 1e-2


def _layer(rng, N, K, G, act_order, zero_range=(0, 16), symmetric=False):
    """Random codes, zeros, scales in the checkpoint's own column order and its g_idx."""
    G = K if G == -1 else G
    codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
    zeros = (np.full((N, K // G), 8, np.uint8) if symmetric
             else rng.integers(*zero_range, (N, K // G), dtype=np.uint8))
    scales = rng.uniform(1e-3, 0.1, (N, K // G)).astype(np.float16)
    g_idx = np.arange(K) // G
    if act_order:                                 # GPTQ's desc_act: the i-th quantized column is in group i // G
        order = rng.permutation(K)
        g_idx = np.empty(K, np.int64)
        g_idx[order] = np.arange(K) // G
    return codes, zeros, scales, g_idx


def _check_read(q, perm, codes, zeros, scales, g_idx, rng):
    G = codes.shape[1] // zeros.shape[1]
    assert (perm is None) == np.array_equal(g_idx, np.arange(codes.shape[1]) // G)   # one group: no-op
    order = np.arange(codes.shape[1]) if perm is None else perm
    np.testing.assert_array_equal(q.codes, codes[:, order])
    np.testing.assert_array_equal(q.zeros, zeros)
    np.testing.assert_array_equal(q.scales.view(np.uint16), scales.astype(np.float16).view(np.uint16))
    w = dequantize(codes, zeros, scales, g_idx)
    np.testing.assert_array_equal(q.dequantize(np.float64), w[:, order])
    x = rng.standard_normal((5, codes.shape[1]))
    np.testing.assert_allclose(reference_gemm(x[:, order], q), x @ w.T, rtol=1e-12, atol=1e-12)
    if codes.shape[0] % 32 == 0 and codes.shape[1] % 32 == 0:   # repacked into the quick layout and back, exactly
        back = unpack_quick(*pack_quick(q))
        np.testing.assert_array_equal(back.codes, q.codes)
        np.testing.assert_array_equal(back.zeros, q.zeros)


# ------------------------------------------------------------------------------------------ GPTQ
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("G", [32, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_round_trip_exact(checkpoint_format, G, act_order, symmetric, rng):
    N, K = 96, 256
    codes, zeros, scales, g_idx = _layer(rng, N, K, G, act_order, symmetric=symmetric)
    if not symmetric:                             # whole qzeros words of 0 and of 15, and 0 beside 15
        zeros[:8, 0], zeros[8:16, 0], zeros[16:24, 0] = 0, 15, [0, 15, 0, 0, 1, 15, 14, 0]
    t = write_gptq(codes, zeros, scales, g_idx, checkpoint_format)
    q, perm = unpack_gptq(**t, checkpoint_format=checkpoint_format)
    assert q.group_size == (K if G == -1 else G)
    _check_read(q, perm, codes, zeros, scales, g_idx, rng)


def test_gptq_worked_example():
    """Rows k = 0..7 of column 0 with codes 1..8 -> 0x87654321 (k = 8i + j at nibble j); symmetric
    zero 8 is stored as 7 in the classic format."""
    codes = np.zeros((8, 32), np.uint8)
    codes[0, :8] = np.arange(1, 9)
    t = write_gptq(codes, np.full((8, 1), 8, np.uint8), np.ones((8, 1), np.float16), np.zeros(32, int))
    assert t["qweight"][0, 0].view(np.uint32) == 0x87654321
    assert t["qzeros"][0, 0].view(np.uint32) == 0x77777777
    q, perm = unpack_gptq(**t)
    assert perm is None and (q.zeros == 8).all()
    np.testing.assert_array_equal(q.codes, codes)


def test_gptq_v1_zero_of_0_borrows_and_reads_back():
    """Zeros 0, 5, 3, 8, 8, 8, 8, 8 of columns 0..7: 0x88888350 - 0x11111111 = 0x7777723F, whose
    nibble 1 (3, not 4) lent to nibble 0; a zero of 0 in the top nibble borrows out of the word."""
    zeros = np.array([[0], [5], [3], [8], [8], [8], [8], [8],
                      [8], [8], [8], [8], [8], [8], [8], [0]], np.uint8)
    codes = np.zeros((16, 32), np.uint8)
    t = write_gptq(codes, zeros, np.ones((16, 1), np.float16), np.zeros(32, int))
    np.testing.assert_array_equal(t["qzeros"].view(np.uint32), [[0x7777723F, 0xF7777777]])
    q, _ = unpack_gptq(**t)
    np.testing.assert_array_equal(q.zeros, zeros)
    q, _ = unpack_gptq(**t, checkpoint_format="gptq_v2")     # v2 reads the stored nibbles as they are
    np.testing.assert_array_equal(q.zeros[:8, 0], [15, 3, 2, 7, 7, 7, 7, 7])


def test_gptq_v1_every_word_reads_and_writes_back(rng):
    """Word-wise reading is a bijection on 32-bit words: any qzeros word is 8 zeros in 0..15 that
    the writer turns back into the same word."""
    words = rng.integers(0, 2**32, (4, 16), dtype=np.uint64).astype(np.uint32)
    words[0, :4] = [0, 0xFFFFFFFF, 0xEEEEEEEF, 0x80000000]
    t = dict(qweight=np.zeros((32, 128), np.int32), qzeros=words.view(np.int32),
             scales=np.ones((4, 128), np.float16))
    q, _ = unpack_gptq(**t)
    assert q.zeros.dtype == np.uint8 and q.zeros.max() <= 15
    np.testing.assert_array_equal(write_gptq(q.codes, q.zeros, q.scales, np.zeros(256, int))["qzeros"],
                                  words.view(np.int32))


def test_gptq_bad_inputs(rng):
    codes, zeros, scales, g_idx = _layer(rng, 64, 128, 32, True)
    t = write_gptq(codes, zeros, scales, g_idx)
    with pytest.raises(TypeError, match="qweight must be int32, got float32"):
        unpack_gptq(**{**t, "qweight": t["qweight"].astype(np.float32)})
    with pytest.raises(ValueError, match="qzeros has 4 packed columns"):
        unpack_gptq(**{**t, "qzeros": t["qzeros"][:, :4]})
    with pytest.raises(ValueError, match="scales has shape"):
        unpack_gptq(**{**t, "scales": t["scales"][:, :32]})
    with pytest.raises(TypeError, match="scales must be a float16"):
        unpack_gptq(**{**t, "scales": t["scales"].astype(np.float32)})
    with pytest.raises(ValueError, match="checkpoint_format='exl2' must be one of"):
        unpack_gptq(**t, checkpoint_format="exl2")
    with pytest.raises(ValueError, match=r"g_idx must have shape \(in_features,\) = \(128,\)"):
        unpack_gptq(**{**t, "g_idx": t["g_idx"][:64]})
    with pytest.raises(TypeError, match="g_idx must be an integer array"):
        unpack_gptq(**{**t, "g_idx": t["g_idx"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"g_idx values must lie in 0\.\.3"):
        unpack_gptq(**{**t, "g_idx": np.where(t["g_idx"] == 3, 4, t["g_idx"]).astype(np.int32)})
    uneven = t["g_idx"].copy()
    uneven[np.argmax(uneven == 1)] = 0            # group 0 gets 33 features, group 1 gets 31
    with pytest.raises(ValueError, match="not a per-group permutation: every group must hold group_size=32"):
        unpack_gptq(**{**t, "g_idx": uneven})


def test_perm_from_g_idx_sorts_groups(rng):
    K, G = 256, 64
    g_idx = rng.permutation(np.arange(K) // G)
    perm = perm_from_g_idx(g_idx, K, K // G)
    np.testing.assert_array_equal(g_idx[perm], np.arange(K) // G)
    np.testing.assert_array_equal(np.sort(perm), np.arange(K))
    assert perm_from_g_idx(np.arange(K) // G, K, K // G) is None
    assert perm_from_g_idx(None, K, K // G) is None


# ----------------------------------------------------------------------------- compressed-tensors
@pytest.mark.parametrize("G", [32, 128, -1])                    # -1: the channel strategy, scale (N, 1)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_compressed_tensors_round_trip_exact(G, symmetric, act_order, rng):
    N, K = 72, 256                                              # N not a multiple of 32: packing only
    codes, zeros, scales, g_idx = _layer(rng, N, K, G, act_order, symmetric=symmetric)
    t = write_compressed_tensors(codes, zeros, scales, symmetric, g_idx if act_order else None)
    q, perm = unpack_compressed_tensors(**t)
    assert q.group_size == (K if G == -1 else G)
    _check_read(q, perm, codes, zeros, scales, g_idx, rng)


def test_compressed_tensors_padding_and_float32_scales(rng):
    """K = 100 packs into 13 words (the last one padded); exact float32 scales become float16."""
    N, K = 16, 100
    codes, zeros, scales, g_idx = _layer(rng, N, K, -1, False)
    t = write_compressed_tensors(codes, zeros, scales, False)
    assert t["weight_packed"].shape == (N, 13) and t["weight_zero_point"].shape == (2, 1)
    q, perm = unpack_compressed_tensors(**{**t, "weight_scale": scales.astype(np.float32)})
    _check_read(q, perm, codes, zeros, scales, g_idx, rng)


def test_compressed_tensors_worked_example():
    """Signed values -8..-1 in columns 0..7 of row 0 are stored as nibbles 0..7 -> 0x76543210."""
    codes = np.full((8, 32), 8, np.uint8)
    codes[0, :8] = np.arange(8)                   # signed -8..-1
    t = write_compressed_tensors(codes, None, np.ones((8, 1), np.float16), symmetric=True)
    assert t["weight_packed"][0, 0].view(np.uint32) == 0x76543210
    q, _ = unpack_compressed_tensors(**t)
    np.testing.assert_array_equal(q.dequantize(np.float64)[0, :8], np.arange(-8, 0))


def test_compressed_tensors_bad_inputs(rng):
    codes, zeros, scales, _ = _layer(rng, 64, 128, 32, False)
    t = write_compressed_tensors(codes, zeros, scales, False)
    with pytest.raises(ValueError, match=r"weight_shape=\[64, 256\] does not match weight_packed"):
        unpack_compressed_tensors(**{**t, "weight_shape": np.array([64, 256])})
    with pytest.raises(ValueError, match="weight_zero_point must be packed along out_features"):
        unpack_compressed_tensors(**{**t, "weight_zero_point": pack_words(zeros.astype(np.int64), 1)})
    with pytest.raises(TypeError, match="weight_scale must be float16, bfloat16 or float32, got int32"):
        unpack_compressed_tensors(**{**t, "weight_scale": scales.astype(np.int32)})
    with pytest.raises(ValueError, match="weight_scale must be"):
        unpack_compressed_tensors(**{**t, "weight_scale": np.float16(1.0).reshape(1)})
    inexact = scales.astype(np.float32)
    inexact[3, 2] += 1e-7
    with pytest.raises(ValueError, match=r"weight_scale\[3, 2\] .* not exactly representable in float16"):
        unpack_compressed_tensors(**{**t, "weight_scale": inexact})
    with pytest.raises(ValueError, match="not a multiple of the 3 groups of weight_scale"):
        unpack_compressed_tensors(**{**t, "weight_scale": scales[:, :3],
                                     "weight_zero_point": t["weight_zero_point"][:, :3]})


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("layout,kernel", [("quick", None), ("quick", "quick"), ("quick", "quick_decode"),
                                           ("quick", "dequant"), ("awq", "awq")])
@pytest.mark.parametrize("M", [1, 16, 100])
def test_gptq_act_order_gemm_matches_reference(layout, kernel, M, rng):
    import cupy
    from quickcupy import QuantLinear, gemm
    if kernel == "quick_decode" and M > 16:
        pytest.skip("quick_decode serves M <= 16")
    N, K = 192, 1024
    codes, zeros, scales, g_idx = _layer(rng, N, K, 128, True)
    layer = QuantLinear.from_gptq(**write_gptq(codes, zeros, scales, g_idx), layout=layout)
    assert layer.perm is not None
    x = rng.standard_normal((M, K)).astype(np.float16)
    out = cupy.full((M, N), np.nan, np.float16)
    y = gemm(cupy.asarray(x), layer, kernel, out)
    assert y is out
    ref = x.astype(np.float64) @ dequantize(codes, zeros, scales, g_idx).T
    assert rel_error(y, ref) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("G,symmetric", [(128, True), (64, False), (-1, True)])
def test_compressed_tensors_gemm_matches_reference(G, symmetric, rng):
    import cupy
    from quickcupy import QuantLinear
    N, K = 256, 512                                          # x (3, 11, K): M = 33 rows
    codes, zeros, scales, g_idx = _layer(rng, N, K, G, False, symmetric=symmetric)
    bias = rng.standard_normal(N).astype(np.float16)
    layer = QuantLinear.from_compressed_tensors(**write_compressed_tensors(codes, zeros, scales, symmetric),
                                                bias=bias)
    assert layer.perm is None
    x = rng.standard_normal((3, 11, K)).astype(np.float16)
    out = cupy.full((3, 11, N), np.nan, np.float16)
    layer(cupy.asarray(x), out=out)
    ref = x.astype(np.float64) @ dequantize(codes, zeros, scales, g_idx).T + bias
    assert rel_error(out, ref) < TOL


@pytest.mark.gpu
def test_quant_linear_rejects_a_bad_perm(rng):
    from quickcupy import QuantLinear, quantize
    q = quantize(rng.standard_normal((64, 128)).astype(np.float32), 32)
    with pytest.raises(ValueError, match=r"perm must be a permutation of range\(in_features=128\)"):
        QuantLinear.from_quantized(q, perm=np.zeros(128, np.int64))


# ------------------------------------------------------------------------- quantization_config
def test_awq_worked_example():
    """Codes 1..8 in columns 0..7 of row k = 0 -> nibbles 1, 3, 5, 7, 2, 4, 6, 8 -> 0x86427531
    (docs: AutoAWQ's GEMM format), read back through read_layer."""
    from quickcupy.formats import read_layer
    codes = np.zeros((8, 32), np.uint8)
    codes[:, 0] = np.arange(1, 9)
    t = write_awq(codes, np.full((8, 1), 8, np.uint8), np.ones((8, 1), np.float16))
    assert t["qweight"][0, 0].view(np.uint32) == 0x86427531
    q, perm = read_layer({"quant_method": "awq", "bits": 4, "group_size": -1}, {f"p.{k}": v for k, v in t.items()}, "p")
    assert perm is None
    np.testing.assert_array_equal(q.codes, codes)


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method", ["awq", "gptq", "gptq_v2", "compressed-tensors"])
def test_read_layer_follows_quantization_config(method, scale_dtype, rng):
    import ml_dtypes
    from quickcupy.formats import read_layer
    prefix = "model.layers.3.mlp.down_proj"
    codes, zeros, scales, g_idx = _layer(rng, 64, 256, 64, method != "awq")
    if scale_dtype == "bfloat16":     # bfloat16 values (8 significant bits) that float16 holds exactly
        scales = scales.astype(ml_dtypes.bfloat16).astype(np.float16)
    if method == "awq":
        t, qc = write_awq(codes, zeros, scales), {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}
    elif method.startswith("gptq"):
        t = write_gptq(codes, zeros, scales, g_idx, method)
        qc = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "checkpoint_format": method}
    else:
        t, qc = write_compressed_tensors(codes, zeros, scales, False, g_idx), ct_config(64, False)
    tensors = {f"{prefix}.{k}": v for k, v in t.items()}
    scale_name = next(k for k in tensors if k.endswith(("scales", "weight_scale")))
    tensors[scale_name] = tensors[scale_name].astype(scale_dtype)
    tensors["model.layers.3.mlp.up_proj.weight_packed"] = np.zeros((1, 1), np.int32)   # other layers: ignored
    q, perm = read_layer(qc, tensors, prefix)
    _check_read(q, perm, codes, zeros, scales, g_idx, rng)


def test_read_layer_refuses_what_it_cannot_read(rng):
    from quickcupy.formats import read_layer
    codes, zeros, scales, g_idx = _layer(rng, 32, 128, 32, False)
    gptq = {f"p.{k}": v for k, v in write_gptq(codes, zeros, scales, g_idx).items()}
    ct = {f"p.{k}": v for k, v in write_compressed_tensors(codes, zeros, scales, True).items()}
    cases = [({"quant_method": "bitsandbytes"}, gptq, "quant_method='bitsandbytes' is not supported"),
             ({"quant_method": "gptq", "bits": 8, "group_size": 32}, gptq, "bits=8 is not supported"),
             ({"quant_method": "gptq", "bits": 4, "group_size": 64}, gptq,
              "the tensors have group_size=32, quantization_config says 64"),
             ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, gptq,
              "checkpoint_format='marlin' is not supported"),
             ({"quant_method": "gptq", "bits": 4}, {k: v for k, v in gptq.items() if k != "p.qzeros"},
              "p.qzeros is missing from the checkpoint"),
             ({"quant_method": "gptq", "bits": 4, "group_size": 32}, {**gptq, "p.qweight": gptq["p.qweight"][:, :8]},
              r"p: qzeros has 4 packed columns \(32 outputs\) but qweight has N=8"),
             ({"quant_method": "gptq", "bits": 4, "group_size": 32},
              {**gptq, "p.scales": gptq["p.scales"].astype(np.float32) * np.float32(1 + 2**-20)},
              r"p: scales\[0, 0\] = .* is not exactly representable in float16"),
             ({**ct_config(32, True), "format": "float-quantized"}, ct, "format='float-quantized' is not supported"),
             (ct_config(32, True, num_bits=8), ct, "num_bits=8 type='int': only 4-bit int weights"),
             (ct_config(32, True, strategy="tensor"), ct, "strategy='tensor': only 'group' and 'channel'"),
             (ct_config(-1, True), ct, "the tensors have group_size=32, quantization_config says -1")]
    for qc, tensors, msg in cases:
        with pytest.raises(ValueError, match=msg):
            read_layer(qc, tensors, "p")
    q, _ = read_layer(ct_config(32, True), ct, "p")
    assert (q.zeros == 8).all()


@pytest.mark.parametrize("qc,match", [
    (None, "quantization_config must be config.json's object"),
    ({"quant_method": "bitsandbytes", "bits": 4}, r"quant_method='bitsandbytes' is not supported; one of \('awq'"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, r"quantization_config.bits=8 is not supported"),
    ({"quant_method": "awq", "w_bit": 3, "q_group_size": 128}, r"quantization_config.bits=3 is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
     "quantization_config.version='gemv' is not supported; only the 'gemm' packing"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False},
     "quantization_config.zero_point=False is not supported"),
    ({"quant_method": "awq", "bits": 4, "q_group_size": 48},
     "quantization_config.q_group_size=48: group_size=48 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "quantization_config.group_size=128: in_features=352 "
     "is not a multiple of group_size=128"),
    ({"quant_method": "gptq", "bits": 4, "group_size": "128"}, r"quantization_config.group_size='128' must be an int"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v3"},
     r"quantization_config.checkpoint_format='gptq_v3' is not supported; one of \('gptq', 'gptq_v2'\)"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "is_marlin_format": True},
     "is_marlin_format=true is not supported"),
    ({**ct_config(32, True), "format": "int-quantized"}, "quantization_config.format='int-quantized' is not supported"),
    ({**ct_config(32, True), "quantization_status": "frozen"}, "quantization_status='frozen' is not supported"),
    ({**ct_config(32, True), "kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme is set"),
    (ct_config(48, True), "config_groups.group_0.weights.group_size=48: group_size=48 is not supported"),
    (ct_config(None, True), r"config_groups.group_0.weights.group_size=None must be an int"),
])
def test_check_quantization_config_names_the_setting(qc, match):
    from quickcupy.formats import check_quantization_config
    with pytest.raises(ValueError, match=match):
        check_quantization_config(qc, in_features=(256, 352))


def test_check_quantization_config_returns_the_scheme():
    from quickcupy.formats import check_quantization_config
    s = check_quantization_config({"quant_method": "GPTQ", "bits": 4, "group_size": 32}, (256, 352))
    assert (s.method, s.variant, s.group_size, s.zero_points) == ("gptq", "gptq", 32, True)
    s = check_quantization_config({"quant_method": "awq", "w_bit": 4}, (256,))     # AutoAWQ's default 128
    assert (s.method, s.variant, s.group_size) == ("awq", "gemm", 128)
    s = check_quantization_config(ct_config(-1, False), (256, 352))
    assert (s.method, s.variant, s.group_size, s.zero_points) == ("compressed-tensors", "pack-quantized", -1, True)
    assert not check_quantization_config(ct_config(32, True)).zero_points


@pytest.mark.parametrize("method", ["awq", "gptq", "compressed-tensors"])
def test_layer_tensors_match_the_writers_and_name_a_bad_header(method, rng):
    """The shapes layer_tensors expects are those the independent writers produce; a missing, wrongly
    typed or wrongly shaped tensor is named from the headers alone."""
    from quickcupy.formats import check_quantization_config, check_tensors, layer_tensors
    N, K, G = 96, 256, 64
    codes, zeros, scales, g_idx = _layer(rng, N, K, G, method == "gptq")
    qc, t = {"awq": ({"quant_method": "awq", "bits": 4, "group_size": G}, write_awq(codes, zeros, scales)),
             "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": G}, write_gptq(codes, zeros, scales, g_idx)),
             "compressed-tensors": (ct_config(G, False), write_compressed_tensors(codes, zeros, scales, False, g_idx))
             }[method]
    names = {"float16": "F16", "int32": "I32", "int64": "I64"}
    headers = {f"p.{k}": (names[v.dtype.name], v.shape) for k, v in t.items()}
    specs = layer_tensors(check_quantization_config(qc, (K,)), "p", N, K)
    assert set(headers) == set(specs)
    check_tensors(headers, specs)
    first = next(iter(headers))
    with pytest.raises(ValueError, match=f"the checkpoint lacks 1 tensor.*first: {first}"):
        check_tensors({k: v for k, v in headers.items() if k != first}, specs)
    with pytest.raises(ValueError, match=f"{first} has dtype F32, expected I32 or U32"):
        check_tensors({**headers, first: ("F32", headers[first][1])}, specs)
    with pytest.raises(ValueError, match=rf"{first} has shape \(1, 2\), expected \("):
        check_tensors({**headers, first: ("I32", (1, 2))}, specs)

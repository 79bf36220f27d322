"""quickcupy.quantize: AutoAWQ's rule, error bound, and the checks."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from quickcupy import QuantizedWeight, quantize


def _awq_rule_in_dtype(weight, G):
    """AutoAWQ's rule written naively with NumPy ufuncs in the weight's own dtype."""
    N, K = weight.shape
    w = weight.reshape(N, K // G, G)
    dt = weight.dtype.type
    w_max, w_min = w.max(2), w.min(2)
    scales = np.maximum(w_max - w_min, dt(1e-5)) / dt(15)
    zeros = np.clip(-np.round(w_min / scales), 0, 15)
    codes = np.clip(np.round(w / scales[..., None]) + zeros[..., None], 0, 15)
    return codes.reshape(N, K).astype(np.uint8), zeros.astype(np.uint8), scales.astype(np.float16)


@pytest.mark.parametrize("dtype", (np.float16, np.float32))
@pytest.mark.parametrize("G", (32, 64, 128, -1))
@pytest.mark.parametrize("std", (1e-3, 0.02, 1.0, 30.0))
def test_matches_awq_rule_bit_for_bit(dtype, G, std, rng):
    w = (rng.standard_normal((48, 512)) * std + rng.standard_normal() * std).astype(dtype)
    q = quantize(w, G)
    codes, zeros, scales = _awq_rule_in_dtype(w, 512 if G == -1 else G)
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.zeros, zeros)
    np.testing.assert_array_equal(q.scales, scales)
    assert q.group_size == (512 if G == -1 else G)


@pytest.mark.parametrize("G", (32, 128, -1))
@pytest.mark.parametrize("std", (1e-3, 0.02, 1.0, 30.0))
def test_bfloat16_is_quantized_as_its_float32_upcast(G, std, rng):
    """bfloat16 (ml_dtypes', CuPy 14's) gives exactly the float32 result of the same values, which
    is the rule applied naively in float32."""
    w = (rng.standard_normal((48, 512)) * std + rng.standard_normal() * std).astype(ml_dtypes.bfloat16)
    w[0, :32] = 0                                  # a constant group: the 1e-5 floor
    q, q32 = quantize(w, G), quantize(w.astype(np.float32), G)
    for got, want in ((q.codes, q32.codes), (q.zeros, q32.zeros), (q.scales, q32.scales)):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    codes, zeros, scales = _awq_rule_in_dtype(w.astype(np.float32), 512 if G == -1 else G)
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.zeros, zeros)
    np.testing.assert_array_equal(q.scales, scales)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), groups=st.integers(1, 6), G=st.sampled_from([32, 64, 128]),
       dtype=st.sampled_from([np.float16, ml_dtypes.bfloat16, np.float32]), seed=st.integers(0, 2**32 - 1),
       scale=st.floats(1e-3, 1e3))
def test_error_within_half_scale(rows, groups, G, dtype, seed, scale):
    """|W - dequant(W)| <= scale / 2, plus the float16 rounding of the stored scale (and of the
    quotient for float16 weights), for every element of groups that contain 0 (zero-mean weights;
    an all-zero group included). Like AutoAWQ, a group entirely above or below 0 clips instead."""
    r = np.random.default_rng(seed)
    w = (r.standard_normal((rows, groups * G)) * scale).astype(dtype)
    w[-1, :G] = 0
    q = quantize(w, G)
    deq = q.dequantize(np.float64)
    s16 = np.repeat(q.scales.astype(np.float64), G, axis=1)
    err = np.abs(deq - w.astype(np.float64))
    # stored scale differs from the float32 one by <= 2^-11 relative: 15 steps of it at most
    bound = s16 * (0.5 + 2.0**-8) + 15 * s16 * 2.0**-11 + 1e-12
    assert (err <= bound).all(), float((err / s16).max())
    assert q.codes.max() <= 15 and q.zeros.max() <= 15


def test_dequantize_shape_and_immutability(rng):
    q = quantize(rng.standard_normal((64, 256)).astype(np.float32), 64)
    assert q.dequantize().shape == (64, 256) and q.dequantize().dtype == np.float32
    assert (q.out_features, q.in_features, q.n_groups) == (64, 256, 4)
    with pytest.raises(ValueError):
        q.codes[0, 0] = 1


@pytest.mark.parametrize("weight,G,exc,msg", [
    (np.ones((8, 100), np.float32), 32, ValueError, "in_features=100 is not a multiple of group_size=32"),
    (np.ones((8, 128), np.float32), 48, ValueError, "group_size=48 is not supported"),
    (np.ones((8, 128), np.float32), 32.0, TypeError, "group_size must be an int"),
    (np.ones((8, 128), np.float64), 32, TypeError, "weight must be float16, bfloat16 or float32, got float64"),
    (np.ones((8, 128), np.int32), 32, TypeError, "weight must be float16, bfloat16 or float32, got int32"),
    (np.ones((8, 128), np.int8), 32, TypeError, "weight must be float16, bfloat16 or float32, got int8"),
    (np.ones((8, 128), np.complex64), 32, TypeError, "weight must be float16, bfloat16 or float32, got complex64"),
    (np.ones((8, 128), bool), 32, TypeError, "weight must be float16, bfloat16 or float32, got bool"),
    (np.ones((2, 8, 128), np.float32), 32, ValueError, "weight must be 2-D"),
    (np.ones((0, 128), np.float32), 32, ValueError, "must not be empty"),
    ([[1.0] * 32], 32, TypeError, "weight must be a numpy.ndarray"),
])
def test_bad_input(weight, G, exc, msg):
    with pytest.raises(exc, match=msg):
        quantize(weight, G)


@pytest.mark.parametrize("dtype", (np.float16, ml_dtypes.bfloat16, np.float32))
@pytest.mark.parametrize("bad", (np.nan, np.inf, -np.inf))
def test_non_finite_weights_rejected(bad, dtype):
    w = np.ones((4, 64), dtype)
    w[2, 17] = bad
    with pytest.raises(ValueError, match=r"NaN or inf values \(first at row 2, column 17\)"):
        quantize(w, 32)


def test_container_checks():
    codes = np.zeros((8, 64), np.uint8)
    ok = dict(codes=codes, zeros=np.zeros((8, 2), np.uint8), scales=np.ones((8, 2), np.float16), group_size=32)
    QuantizedWeight(**ok)
    with pytest.raises(ValueError, match="zeros .* and scales .* must both be"):
        QuantizedWeight(**{**ok, "zeros": np.zeros((8, 3), np.uint8)})
    with pytest.raises(ValueError, match="codes must lie in 0..15"):
        QuantizedWeight(**{**ok, "codes": codes + 16})
    with pytest.raises(TypeError, match="scales must be a 2-D float16 array"):
        QuantizedWeight(**{**ok, "scales": np.ones((8, 2), np.float32)})


def test_reference_refuses_a_wrong_bias_shape(rng):
    from quickcupy import reference_gemm
    q = quantize(rng.standard_normal((64, 128)).astype(np.float32), 32)
    x = rng.standard_normal((3, 128))
    assert reference_gemm(x, q, np.ones(64)).shape == (3, 64)
    with pytest.raises(ValueError, match=r"bias must have shape \(out_features,\) = \(64,\), got \(64, 1\)"):
        reference_gemm(x, q, np.ones((64, 1)))


@pytest.mark.parametrize("G", (32, 128, -1))
def test_shards_reassemble_the_layer(G, rng):
    """Column shards stack back to the weight; row shards' partial products sum to the full one."""
    from quickcupy import reference_gemm
    q = quantize(rng.standard_normal((256, 1024)).astype(np.float32), G)
    w = q.dequantize(np.float64)
    cols = [q.shard(0, r, 4) for r in range(4)]
    np.testing.assert_array_equal(np.concatenate([c.dequantize(np.float64) for c in cols]), w)
    rows = [q.shard(1, r, 2) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([r.dequantize(np.float64) for r in rows], axis=1), w)
    x = rng.standard_normal((3, 1024))
    parts = sum(reference_gemm(x[:, r * 512:(r + 1) * 512], rows[r]) for r in range(2))
    np.testing.assert_allclose(parts, reference_gemm(x, q), rtol=1e-12, atol=1e-9)
    assert rows[0].group_size == (512 if G == -1 else G)
    from quickcupy import pack_quick, unpack_quick
    for shard in (cols[1], rows[1]):                        # each shard packs like any layer
        assert unpack_quick(*pack_quick(shard)).codes.tobytes() == shard.codes.tobytes()


def test_shard_rules(rng):
    q = quantize(rng.standard_normal((96, 384)).astype(np.float32), 128)
    with pytest.raises(ValueError, match="out_features=96 does not split into 2 shards that are multiples of 32"):
        q.shard(0, 0, 2)
    with pytest.raises(ValueError, match="192 columns, not a whole number of groups of group_size=128"):
        q.shard(1, 1, 2)
    with pytest.raises(ValueError, match="rank=2 must lie in 0..world-1"):
        q.shard(0, 2, 2)
    with pytest.raises(ValueError, match="dim=2 must be 0"):
        q.shard(2, 0, 1)
    with pytest.raises(TypeError, match="world must be an int"):
        q.shard(0, 0, 2.0)

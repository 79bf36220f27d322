"""quickcupy.layouts: exact round trips, the AWQ worked example, the QUICK fragment map, checks."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from quickcupy import QuantizedWeight, pack_awq, pack_quick, unpack_awq, unpack_quick, quantize
from quickcupy.layouts import AWQ_ORDER


def _random_q(r, N, K, G):
    g = K if G == -1 else G
    return QuantizedWeight(codes=r.integers(0, 16, (N, K), dtype=np.uint8),
                           zeros=r.integers(0, 16, (N, K // g), dtype=np.uint8),
                           scales=r.uniform(1e-4, 1.0, (N, K // g)).astype(np.float16), group_size=g)


def _same(a, b):
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.zeros, b.zeros)
    np.testing.assert_array_equal(a.scales.view(np.uint16), b.scales.view(np.uint16))
    assert a.group_size == b.group_size


@settings(max_examples=80, deadline=None)
@given(n32=st.integers(1, 6), k32=st.integers(1, 12), G=st.sampled_from([32, 64, 128, -1]),
       seed=st.integers(0, 2**32 - 1))
def test_round_trips_exact(n32, k32, G, seed):
    N, K = 32 * n32, 32 * k32 * (4 if G == 128 else 2 if G == 64 else 1)
    q = _random_q(np.random.default_rng(seed), N, K, G)
    _same(unpack_awq(*pack_awq(q)), q)
    _same(unpack_quick(*pack_quick(q)), q)


def test_awq_worked_example():
    """awq_format.md: codes [1..8] of one row -> 0x86427531."""
    codes = np.zeros((8, 32), np.uint8)          # (N = 8 columns, K = 32 rows)
    codes[:, 0] = [1, 2, 3, 4, 5, 6, 7, 8]       # row k = 0, columns 0..7
    q = QuantizedWeight(codes=codes, zeros=np.zeros((8, 1), np.uint8),
                        scales=np.ones((8, 1), np.float16), group_size=32)
    p = pack_awq(q)
    assert p.qweight.shape == (32, 1) and p.qweight.dtype == np.int32
    assert int(p.qweight[0, 0].view(np.uint32)) == 0x86427531
    assert [0, 4, 1, 5, 2, 6, 3, 7] == [int(np.where(AWQ_ORDER == c)[0][0]) for c in range(8)]


def test_awq_shapes_and_dtypes(rng):
    q = quantize(rng.standard_normal((192, 256)).astype(np.float16), 64)
    p = pack_awq(q)
    assert (p.qweight.shape, p.qzeros.shape, p.scales.shape) == ((256, 24), (4, 24), (4, 192))
    assert p.qweight.dtype == p.qzeros.dtype == np.int32 and p.scales.dtype == np.float16
    # column n of row k sits in word n // 8 at nibble [0, 4, 1, 5, 2, 6, 3, 7][n % 8]
    k, n = 77, 13
    nib = [0, 4, 1, 5, 2, 6, 3, 7][n % 8]
    assert (int(p.qweight[k, n // 8].view(np.uint32)) >> 4 * nib) & 0xF == q.codes[n, k]


# The PTX ISA's statement of the mma.m16n8k16 B fragment for .f16 ("Matrix Fragments for
# mma.m16n8k16", figure "MMA .m16n8k16 fragment layout for matrix B"): each lane holds two .f16x2
# registers b0, b1 = elements b0..b3 (b0, b1 in register 0, low half first), with
#     groupID = laneid >> 2, threadID_in_group = laneid % 4
#     row = threadID_in_group * 2 + (i & 0x1)        for b_i, i < 2
#         = threadID_in_group * 2 + (i & 0x1) + 8    for b_i, i >= 2
#     col = groupID
PTX_B_ROW = lambda lane, i: (lane % 4) * 2 + (i & 1) + (8 if i >= 2 else 0)  # noqa: E731
PTX_B_COL = lambda lane, i: lane >> 2                                        # noqa: E731


def _dequant_pairs(word: int):
    """What cuda/quant_common.cuh's int4x8_biased makes of a word: half2 h = (nibble h, nibble h+4)
    for h = 0..3 (low half, high half)."""
    nib = [(word >> 4 * i) & 0xF for i in range(8)]
    return [(nib[h], nib[h + 4]) for h in range(4)]


def test_quick_fragment_map(rng):
    """After one 16-byte load and the int4 conversion, lane L's half2 h = 2s + r of word j must be
    register b_r of k-step s of n8 sub-tile j, element for element as the PTX ISA states the B
    fragment (an independent statement, not the packer's formula)."""
    q = _random_q(rng, 64, 128, 32)
    p = pack_quick(q)
    assert p.qweight.shape == (2, 4, 32, 4)
    for tn in range(2):
        for tk in range(4):
            for lane in range(32):
                for j in range(4):
                    pairs = _dequant_pairs(int(p.qweight[tn, tk, lane, j].view(np.uint32)))
                    for s in range(2):             # k16 step of the 32-deep tile
                        for r in range(2):         # B register of the step
                            low, high = pairs[2 * s + r]
                            for e, value in ((2 * r, low), (2 * r + 1, high)):   # element b_e
                                k = 32 * tk + 16 * s + PTX_B_ROW(lane, e)
                                n = 32 * tn + 8 * j + PTX_B_COL(lane, e)
                                assert value == q.codes[n, k], (tn, tk, lane, j, s, r, e)
    # scales: [tile_n, group, g, j] = scale of column 32 tile_n + 8 j + g; zeros: nibble j of halfword g
    halfwords = p.qzeros.view(np.uint16)
    for tn, grp, g, j in rng.integers(0, [2, 4, 8, 4], size=(100, 4)):
        n = 32 * tn + 8 * j + g
        assert p.scales[tn, grp, g, j] == q.scales[n, grp]
        assert (int(halfwords[tn, grp, g]) >> 4 * j) & 0xF == q.zeros[n, grp]


def test_pack_checks(rng):
    with pytest.raises(ValueError, match="out_features=40 is not a multiple of 32"):
        pack_quick(_random_q(rng, 40, 64, 32))
    with pytest.raises(ValueError, match="out_features=36 is not a multiple of 8"):
        pack_awq(_random_q(rng, 36, 64, 32))


def test_unpack_checks(rng):
    p = pack_awq(_random_q(rng, 64, 256, 64))
    with pytest.raises(ValueError, match="qzeros has 4 packed columns but qweight has 8"):
        unpack_awq(p.qweight, p.qzeros[:, :4], p.scales)
    with pytest.raises(ValueError, match=r"scales has shape \(4, 32\), expected \(4, 64\)"):
        unpack_awq(p.qweight, p.qzeros, p.scales[:, :32])
    with pytest.raises(TypeError, match="qweight must be int32, got float32"):
        unpack_awq(p.qweight.astype(np.float32), p.qzeros, p.scales)
    with pytest.raises(TypeError, match="scales must be a float16"):
        unpack_awq(p.qweight, p.qzeros, p.scales.astype(np.float32))
    with pytest.raises(ValueError, match="in_features=256 is not a multiple of the 3 groups"):
        unpack_awq(p.qweight, p.qzeros[:3], p.scales[:3])
    with pytest.raises(ValueError, match="group_size=128 disagrees"):
        unpack_awq(*p, group_size=128)
    pq = pack_quick(_random_q(rng, 64, 256, 64))
    with pytest.raises(ValueError, match=r"qweight must have shape \(N/32, K/32, 32, 4\)"):
        unpack_quick(pq.qweight[:, :, :16], pq.qzeros, pq.scales)
    with pytest.raises(ValueError, match="qzeros has shape"):
        unpack_quick(pq.qweight, pq.qzeros[:1], pq.scales)


def test_pack_needs_a_quantized_weight():
    for pack in (pack_awq, pack_quick):
        with pytest.raises(TypeError, match="q must be a QuantizedWeight.*got ndarray"):
            pack(np.zeros((64, 64), np.uint8))

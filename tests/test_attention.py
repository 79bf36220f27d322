"""quickcupy.attention: the split-KV count and the checks of the splits argument on the CPU; on the
GPU, the split-KV decode attention (cuda/decode_attention.cu) at forced split counts in both modes
against float64, against the single pass (the cache write bit for bit) and against itself (two runs
bit for bit), and a CUDA graph replayed at growing lengths (the position in device memory) against
eager calls."""
import numpy as np
import pytest

from conftest import attention_f64, rel_error, side_stream
from quickcupy import kernels
from quickcupy.attention import decode_attention, decode_attention_rope, decode_heads_per_block, decode_splits
from quickcupy.llama import LlamaConfig, rope_tables
from quickcupy.registry import DECODE_ATTENTION_THREADS, DECODE_MAX_SPLITS

H100_SMS = kernels.H100.sm_count


# ---------------------------------------------------------------------------------------- CPU
def test_split_count_fills_the_gpu_from_the_shapes():
    # Llama-2-7B at batch 1: 32 blocks; at least two 128-position tiles of max_len per split
    assert decode_splits(1, 32, 32, 100, H100_SMS) == 1
    assert decode_splits(1, 32, 32, 256, H100_SMS) == 1
    assert decode_splits(1, 32, 32, 512, H100_SMS) == 2
    assert decode_splits(1, 32, 32, 4096, H100_SMS) == 5          # 160 blocks: every SM has one
    # Llama-3-8B: a GQA group of 4 query heads in one block, 8 blocks a sequence
    assert decode_splits(1, 32, 8, 4096, H100_SMS) == 16         # 17 would fill the GPU: 2 tiles a split
    assert decode_splits(4, 32, 32, 4096, H100_SMS) == 2
    assert decode_splits(5, 32, 32, 4096, H100_SMS) == 1          # 160 blocks already: the single pass
    assert decode_splits(1, 1, 1, 1 << 20, H100_SMS) == DECODE_MAX_SPLITS
    for batch in (1, 2, 3, 8, 64):
        for max_len in (8, 129, 1000, 8192):
            splits = decode_splits(batch, 32, 8, max_len, H100_SMS)
            cap = max(1, min(DECODE_MAX_SPLITS, -(-max_len // DECODE_ATTENTION_THREADS) // 2))
            assert 1 <= splits <= cap
            assert splits == cap or 8 * batch * splits >= H100_SMS
            assert splits == 1 or 8 * batch * (splits - 1) < H100_SMS     # the fewest that fill it


def test_the_combining_block_holds_every_split():
    """The last split keeps m and l of every split in its probability tile (HEADS x TP floats)."""
    assert 2 * DECODE_MAX_SPLITS <= DECODE_ATTENTION_THREADS


@pytest.mark.parametrize("splits", [0, DECODE_MAX_SPLITS + 1, 2.0, True, "4"])
def test_splits_is_checked(splits):
    q = np.zeros((1, 4, 64), np.float16)
    qkv = np.zeros((1, 8, 64), np.float16)
    keys, values = np.zeros((1, 2, 64, 16), np.float16), np.zeros((1, 2, 16, 64), np.float16)
    cos = np.zeros((16, 32), np.float32)
    match = f"splits must be None or an int in 1..{DECODE_MAX_SPLITS}"
    with pytest.raises(ValueError, match=match):
        decode_attention(q, keys, values, 3, splits=splits)
    with pytest.raises(ValueError, match=match):
        decode_attention_rope(qkv, keys, values, cos, cos, 4, 3, splits=splits)


# ---------------------------------------------------------------------------------------- GPU
DTYPES = ["float16", "bfloat16"]
EPS = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
SPLITS = (1, 2, 4, 8)
LENGTHS = (1, 7, 128, 129, 300, 1000)
WINDOWS = (None, 16, 200)


def _np_dtype(dtype):
    from quickcupy.dtypes import np_dtype
    return np_dtype(dtype)


def _f64(a):
    return a.get().astype(np.float32).astype(np.float64)


def _same_bits(a, b) -> bool:
    """a and b (CuPy, 16-bit) hold the same bytes (NaNs included)."""
    import cupy
    return a.shape == b.shape and bool(cupy.array_equal(a.view(np.uint16), b.view(np.uint16)))


def _poison_pool(cupy, shape, dtype):
    """The kernel's output comes from CuPy's pool, which hands out the best-fitting free block:
    leave a NaN-filled one of its size there."""
    poison = cupy.full(shape, np.nan, np.float32).astype(dtype)
    del poison


def _tables(cupy, nh, nkv, d, max_len):
    config = LlamaConfig(hidden_size=nh * d, intermediate_size=8, num_attention_heads=nh, num_key_value_heads=nkv,
                         num_hidden_layers=1)
    return tuple(cupy.asarray(t) for t in rope_tables(config, np.arange(max_len)))


def _one_tile(length, window) -> bool:
    """The attended positions lie in one 128-position tile from the window's 8-aligned start: every
    split but the first attends nothing."""
    first = 0 if window is None else max(0, length - window)
    return length - (first & ~7) <= DECODE_ATTENTION_THREADS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,nh,nkv", [(128, 4, 4), (64, 8, 2), (64, 16, 1)], ids=["mha", "gqa4", "gqa16"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("max_len", [1000, 1003])     # 16-byte cp.async rows, and element-by-element copies
def test_gpu_split_kv_decode_attention(rng, dtype, d, nh, nkv, batch, max_len):
    """The fused decode step at 1, 2, 4 and 8 splits, lengths around the 128-position tiles, windows
    none / 16 / 200 (and, at one split, windows that exclude nothing: both instances, general and
    single pass, equal the single pass): against float64 (on rope_cache's rotation and cache write); the caches after
    it equal the single pass's bit for bit; the same split count in the non-fused mode (on
    rope_cache's output) equals it bit for bit, and so does a second run; where the attended
    positions fit one tile, every split count equals the single pass (the empty splits add exact
    zeros). The position's slot and every position past it are NaN in the caches before the call
    (written, resp. never read), positions before the window NaN too; the output's memory is NaN
    before each call (every element written). gqa16: two blocks of 8 query heads share a KV head
    and both write it. The arrival counters are 0 afterwards."""
    import cupy
    from quickcupy.llama import ops
    nd = _np_dtype(dtype)
    cos, sin = _tables(cupy, nh, nkv, d, max_len)
    for length in LENGTHS:
        p = length - 1
        qkv = cupy.asarray(rng.standard_normal((batch, 1, nh + 2 * nkv, d)).astype(nd))
        keys = rng.standard_normal((batch, nkv, d, max_len)).astype(nd)
        values = rng.standard_normal((batch, nkv, max_len, d)).astype(nd)
        keys[..., p:] = np.nan
        values[:, :, p:] = np.nan
        for window in WINDOWS:
            lo = 0 if window is None else max(0, length - window)
            kw, vw = keys.copy(), values.copy()
            kw[..., :lo] = np.nan
            vw[:, :, :lo] = np.nan
            kw, vw = cupy.asarray(kw), cupy.asarray(vw)
            k_ref, v_ref = kw.copy(), vw.copy()
            qk = ops.rope_cache(qkv, cos, sin, cupy.asarray([p], np.int32), nh, nkv, k_ref, v_ref)
            q_rot = qk[:, 0, :nh]
            ref = attention_f64(_f64(q_rot), _f64(k_ref), _f64(v_ref), length, window)
            single = None
            for splits in SPLITS:
                where = f"length={length} window={window} splits={splits}"
                runs = []
                for _ in range(2):
                    k, v = kw.copy(), vw.copy()
                    _poison_pool(cupy, (batch, 1, nh * d), nd)
                    out = decode_attention_rope(qkv, k, v, cos, sin, nh, length, window=window, splits=splits)
                    runs.append((out, k, v))
                out, k, v = runs[0]
                assert out.dtype == nd and out.shape == (batch, 1, nh * d), where
                got = out.get().astype(np.float32)
                assert not np.isnan(got).any(), where
                assert rel_error(got, ref) < 2 * EPS[dtype], where
                assert all(_same_bits(a, b) for a, b in zip(runs[0], runs[1])), f"two runs differ: {where}"
                if single is None:
                    single = runs[0]
                    assert _same_bits(k, k_ref) and _same_bits(v, v_ref), where
                assert _same_bits(k, single[1]) and _same_bits(v, single[2]), f"cache write: {where}"
                _poison_pool(cupy, (batch, 1, nh * d), nd)
                split = decode_attention(q_rot, k_ref, v_ref, length, window=window, splits=splits)
                assert _same_bits(split, out), f"non-fused mode: {where}"
                if _one_tile(length, window):
                    np.testing.assert_array_equal(got, single[0].get().astype(np.float32), where)
            if window is None:
                # A window that excludes nothing: max_len runs the single-pass instance, max_len - 1
                # the general one (where it is >= length); both equal the single pass, bit for bit.
                for wide in (w for w in (max_len, max_len - 1) if w >= length):
                    _poison_pool(cupy, (batch, 1, nh * d), nd)
                    out = decode_attention_rope(qkv, kw.copy(), vw.copy(), cos, sin, nh, length, window=wide,
                                                splits=1)
                    assert _same_bits(out, single[0]), f"length={length} window={wide}: not the single pass"
    blocks = batch * nh // decode_heads_per_block(nh, nkv)
    assert not kernels.workspace(cupy.cuda.Device().id).counters(blocks)[:blocks].any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [None, 4])
@pytest.mark.parametrize("window", [None, 200])
def test_gpu_split_kv_graph_replays_at_growing_lengths(rng, dtype, splits, window):
    """One decode attention (rope and cache write fused in) captured in a CUDA graph with the
    position in device memory, batch 1 (splits None: the launch's own choice, several on any GPU
    of at least 16 SMs), replayed at growing lengths with new qkv each time: output and caches equal
    eager calls at the host's length bit for bit, the output NaN before each replay. Captured with
    programmatic dependent launch on sm_90 (pdl_active). Its scratch is the capture's own."""
    import cupy
    nd = _np_dtype(dtype)
    nh, nkv, d, max_len = 8, 2, 64, 1000
    if splits is None:
        assert decode_splits(1, nh, nkv, max_len, kernels.device_limits(cupy.cuda.Device().id).sm_count) > 1
    cos, sin = _tables(cupy, nh, nkv, d, max_len)
    keys = cupy.asarray(rng.standard_normal((1, nkv, d, max_len)).astype(nd))
    values = cupy.asarray(rng.standard_normal((1, nkv, max_len, d)).astype(nd))
    k_eager, v_eager = keys.copy(), values.copy()
    qkv = cupy.asarray(rng.standard_normal((1, 1, nh + 2 * nkv, d)).astype(nd))
    start = cupy.zeros(1, np.int32)
    stream = side_stream()
    with stream:
        decode_attention_rope(qkv, keys.copy(), values.copy(), cos, sin, nh, 1, start=start, window=window,
                              splits=splits)     # compiles outside the capture
        stream.synchronize()
        stream.begin_capture()
        out = decode_attention_rope(qkv, keys, values, cos, sin, nh, 1, start=start, window=window, splits=splits)
        graph = stream.end_capture()
        for length in (1, 2, 9, 128, 129, 130, 300, 513, 999, 1000):
            qkv[...] = cupy.asarray(rng.standard_normal(qkv.shape).astype(nd))
            start.fill(length - 1)              # the kernel attends 1 + *start positions
            out.fill(np.nan)
            graph.launch(stream)
            eager = decode_attention_rope(qkv, k_eager, v_eager, cos, sin, nh, length, window=window,
                                          splits=splits)
            stream.synchronize()
            where = f"length={length}"
            assert not np.isnan(out.get().astype(np.float32)).any(), where
            assert _same_bits(out, eager), where
            assert _same_bits(keys, k_eager) and _same_bits(values, v_eager), where

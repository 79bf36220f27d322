"""quickcupy.gemm: both kernels against the float64 NumPy reference, and the API's checks."""
import numpy as np
import pytest

from conftest import rel_error
from quickcupy import quantize, reference_gemm
from quickcupy import registry
from quickcupy.gemm import KERNELS, check_layer_shape, kernel_layout

M_VALUES = (1, 2, 7, 16, 31, 33, 64, 100, 128, 257, 1024)
LLAMA_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288), (8192, 8192))  # (K, N)
SMALL_SHAPES = ((64, 64), (96, 192), (256, 320), (384, 128), (1024, 448))
TOL = 1e-2


# ---------------------------------------------------------------------------------------- CPU
def test_kernel_names_and_layouts():
    assert kernel_layout("awq") == "awq" and kernel_layout("quick") == "quick"
    with pytest.raises(ValueError, match="kernel='nope' is unknown"):
        kernel_layout("nope")


@pytest.mark.parametrize("layout,K,N,msg", [
    ("quick", 4096, 4100, "out_features=4100 is not a multiple of 32"),
    ("awq", 4096, 4128, "out_features=4128 is not a multiple of 64"),
    ("quick", 4112, 4096, "in_features=4112 is not a multiple of 32"),
    ("int8", 4096, 4096, "layout='int8' is unknown"),
])
def test_layer_shape_rules(layout, K, N, msg):
    with pytest.raises(ValueError, match=msg):
        check_layer_shape(layout, K, N)


# ---------------------------------------------------------------------------------------- GPU
_LAYERS = {}


def _layer(K, N, G, layout, seed=0):
    """QuantLinear + its QuantizedWeight, cached per shape (quantizing 8192^2 on the host takes ~1 s)."""
    from quickcupy import QuantLinear
    key = (K, N, G)
    if key not in _LAYERS:
        rng = np.random.default_rng([K, N, G, seed])
        w = (rng.standard_normal((N, K)) * 0.05).astype(np.float16)
        _LAYERS.clear()  # keep one shape's layers alive at a time
        _LAYERS[key] = {"q": quantize(w, G)}
    entry = _LAYERS[key]
    if layout not in entry:
        entry[layout] = QuantLinear.from_quantized(entry["q"], layout=layout)
    return entry["q"], entry[layout]


def _run(x_host, layer, kernel, **plan):
    import cupy
    from quickcupy import gemm
    x = cupy.asarray(x_host)
    out = cupy.full(x.shape[:-1] + (layer.out_features,), np.nan, np.float16)  # poison
    y = gemm(x, layer, kernel, out, **plan)
    assert y is out
    return y.get()


def _check(y, ref):
    assert not np.isnan(y).any(), "output has NaN: an element was not written"
    err = rel_error(y, ref)
    assert err < TOL, f"relative error {err:.2e}"
    return err


@pytest.mark.gpu
@pytest.mark.parametrize("G", (32, 64, 128))
@pytest.mark.parametrize("K,N", LLAMA_SHAPES + SMALL_SHAPES)
def test_kernels_match_reference(K, N, G, rng):
    """Every kernel, every M, against float64; the kernels also agree with each other."""
    if K % G:
        pytest.skip(f"K={K} is not a multiple of group size {G}")
    q, _ = _layer(K, N, G, "quick")
    W = q.dequantize(np.float64)
    for M in M_VALUES:
        x = (rng.standard_normal((M, K))).astype(np.float16)
        ref = x.astype(np.float64) @ W.T
        outs = {}
        for kernel in KERNELS:
            if M > (registry.design_of(kernel).max_m or M):
                continue
            layout = kernel_layout(kernel)
            if N % {"quick": 32, "awq": 64}[layout]:
                continue
            _, layer = _layer(K, N, G, layout)
            outs[kernel] = _run(x, layer, kernel)
            err = rel_error(outs[kernel], ref)
            assert not np.isnan(outs[kernel]).any(), f"{kernel} M={M}: NaN in output"
            assert err < TOL, f"{kernel} M={M} K={K} N={N} G={G}: relative error {err:.2e}"
        if "awq" in outs:
            assert rel_error(outs["quick"], outs["awq"].astype(np.float64)) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ("awq", "quick", "quick_sm90"))
@pytest.mark.parametrize("tile_m", (16, 32, 64, 128))
@pytest.mark.parametrize("split_k", (1, 3, 8))
def test_tile_and_split_variants(kernel, tile_m, split_k, rng):
    if tile_m not in registry.design_of(kernel).tiles:
        pytest.skip(f"{kernel} has {tuple(registry.design_of(kernel).tiles)}-row tiles")
    K, N, G = 2048, 1024, 128
    q, layer = _layer(K, N, G, kernel_layout(kernel))
    x = rng.standard_normal((77, K)).astype(np.float16)
    y = _run(x, layer, kernel, tile_m=tile_m, split_k=split_k)
    _check(y, reference_gemm(x, q))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ("awq", "quick"))
def test_group_minus_one_bias_and_batch_dims(layout, rng):
    from quickcupy import QuantLinear
    K, N = 640, 256
    w = (rng.standard_normal((N, K)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float16)
    q = quantize(w, -1)
    layer = QuantLinear.from_quantized(q, layout=layout, bias=bias)
    x = rng.standard_normal((2, 3, 5, K)).astype(np.float16)
    for split_k in (1, 4):
        y = _run(x, layer, layout, split_k=split_k)
        assert y.shape == (2, 3, 5, N)
        _check(y, reference_gemm(x, q, bias))


@pytest.mark.gpu
def test_from_awq_checkpoint_tensors_and_from_float(rng):
    from quickcupy import QuantLinear, pack_awq
    K, N = 512, 384
    w = (rng.standard_normal((N, K)) * 0.02).astype(np.float16)
    q = quantize(w, 64)
    p = pack_awq(q)
    x = rng.standard_normal((9, K)).astype(np.float16)
    ref = reference_gemm(x, q)
    for layout in ("quick", "awq"):
        _check(_run(x, QuantLinear.from_awq(*p, layout=layout), layout), ref)
        _check(_run(x, QuantLinear.from_float(w, 64, layout=layout), layout), ref)


@pytest.mark.gpu
def test_honours_current_stream(rng):
    import cupy
    from quickcupy import QuantLinear, gemm
    K, N = 1024, 512
    q = quantize((rng.standard_normal((N, K)) * 0.05).astype(np.float32), 128)
    layer = QuantLinear.from_quantized(q)
    x_host = rng.standard_normal((33, K)).astype(np.float16)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x = cupy.asarray(x_host)
        y = gemm(x, layer)
        y2 = gemm(x, layer, "quick", split_k=4)
    stream.synchronize()
    _check(y.get(), reference_gemm(x_host, q))
    _check(y2.get(), reference_gemm(x_host, q))


@pytest.mark.gpu
def test_bad_inputs_raise_before_launch(rng):
    import cupy
    from quickcupy import QuantLinear, gemm
    K, N = 256, 128
    q = quantize(rng.standard_normal((N, K)).astype(np.float32), 128)
    layer = QuantLinear.from_quantized(q, layout="quick")
    x = cupy.asarray(rng.standard_normal((4, K)).astype(np.float16))
    with pytest.raises(TypeError, match="NumPy array; move it to the GPU"):
        gemm(x.get(), layer)
    with pytest.raises(TypeError, match="x must be float16 or bfloat16, got float32"):
        gemm(x.astype(np.float32), layer)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 256\)"):
        gemm(x[:, :128].copy(), layer)
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm(cupy.asarray(rng.standard_normal((K, 4)).astype(np.float16)).T, layer)
    flat = cupy.zeros(4 * K + 8, np.float16)
    with pytest.raises(ValueError, match="16-byte aligned"):
        gemm(flat[1:1 + 4 * K].reshape(4, K), layer)
    with pytest.raises(ValueError, match="M must be at least 1"):
        gemm(x[:0], layer)
    with pytest.raises(ValueError, match="split_k=0 must be a positive int"):
        gemm(x, layer, "quick", split_k=0)
    with pytest.raises(ValueError, match="tile_m=48 is not available"):
        gemm(x, layer, "quick", tile_m=48)
    with pytest.raises(ValueError, match="name that kernel instead of 'auto'"):
        gemm(x, layer, tile_m=16)
    with pytest.raises(ValueError, match="quick_decode serves M <= 16 rows, got M=17"):
        gemm(cupy.asarray(rng.standard_normal((17, K)).astype(np.float16)), layer, "quick_decode")
    with pytest.raises(ValueError, match="runs cuBLAS"):
        gemm(x, layer, "dequant", split_k=2)
    with pytest.raises(ValueError, match="reads the awq layout"):
        gemm(x, layer, kernel="awq")
    with pytest.raises(ValueError, match=r"out must have shape \(4, 128\)"):
        gemm(x, layer, out=cupy.empty((4, 64), np.float16))
    with pytest.raises(TypeError, match="out must have x's dtype float16, got float32"):
        gemm(x, layer, out=cupy.empty((4, N), np.float32))
    buf = cupy.asarray(rng.standard_normal(8 * K).astype(np.float16))
    with pytest.raises(ValueError, match="out overlaps x"):
        gemm(buf[:4 * K].reshape(4, K), layer, out=buf[4 * K - 16:4 * K - 16 + 4 * N].reshape(4, N))
    with pytest.raises(ValueError, match="out_features=100 is not a multiple of 32"):
        QuantLinear.from_float(rng.standard_normal((100, K)).astype(np.float32), 128)
    with pytest.raises(ValueError, match="in_features=250 is not a multiple of group_size=128"):
        QuantLinear.from_float(rng.standard_normal((128, 250)).astype(np.float32), 128)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,M,split_k", [("quick_decode", 1, None), ("quick_decode", 16, None),
                                              ("quick_decode", 4, 7), ("quick", 64, 1), ("awq", 16, 1),
                                              ("quick_sm90", 200, 1)])
def test_cuda_graph_replay_is_bit_identical(kernel, M, split_k, rng):
    """A captured gemm call replays into the same buffer with the same bits as the eager call
    (kernels that reduce split-K themselves keep their workspace per stream, so it is graph safe)."""
    import cupy
    from quickcupy import QuantLinear, gemm
    K, N = 4096, 1024
    q = quantize((rng.standard_normal((N, K)) * 0.05).astype(np.float32), 128)
    layer = QuantLinear.from_quantized(q, layout=kernel_layout(kernel), bias=rng.standard_normal(N).astype(np.float16))
    stream = cupy.cuda.Stream(non_blocking=True)
    plan = {} if split_k is None else {"split_k": split_k}
    with stream:
        x = cupy.asarray(rng.standard_normal((M, K)).astype(np.float16))
        out = cupy.full((M, N), np.nan, np.float16)
        gemm(x, layer, kernel, out, **plan)                 # compiles, allocates the workspace
        eager = out.copy()
        out.fill(np.nan)
        stream.begin_capture()
        gemm(x, layer, kernel, out, **plan)
        graph = stream.end_capture()
        for _ in range(3):
            out.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            assert (out.view(np.uint16) == eager.view(np.uint16)).all()
    _check(eager.get(), reference_gemm(x.get(), q, layer.bias.get()))

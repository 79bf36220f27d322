"""quickcupy.gemm: every kernel against the float64 NumPy reference, alone and with the RMSNorm
before it and the residual add after it (fused or composed), and the API's checks."""
import importlib
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import rel_error, side_stream
from quickcupy import dispatch, kernels, quantize, reference_gemm
from quickcupy import registry
from quickcupy.gemm import KERNELS, check_layer_shape, kernel_layout

gemm_module = importlib.import_module("quickcupy.gemm")   # the module (quickcupy.gemm is also the function)

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


class _Array:
    """What gemm's checks read of an array (dtype, shape, contiguity, address, device), without a GPU."""

    def __init__(self, shape, dtype=np.float16, ptr=1 << 20, contiguous=True, device=0):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.flags = SimpleNamespace(c_contiguous=contiguous)
        self.data = SimpleNamespace(ptr=ptr)
        self.device = SimpleNamespace(id=device)


@pytest.fixture
def unwrapped(monkeypatch):
    """gemm's module, taking the fake arrays above as they are (no CuPy conversion)."""
    monkeypatch.setattr(gemm_module, "_as_cupy", lambda a, name: (a, None))
    return gemm_module


def test_norm_argument_checks(unwrapped):
    layer = SimpleNamespace(in_features=256, out_features=128, device=0)
    x, out = _Array((4, 256), ptr=1 << 20), _Array((4, 128), ptr=2 << 20)
    w = _Array((256,), ptr=3 << 20)
    assert unwrapped._check_norm((w, 1e-5), x, layer, out) == (w, 1e-5)
    assert unwrapped._check_norm([w, 0], x, layer, out) == (w, 0.0)
    for norm, error, match in [
            (w, TypeError, r"norm must be \(weight, eps\), got _Array"),
            ((w, 1e-5, 1), TypeError, r"norm must be \(weight, eps\)"),
            ((_Array((128,), ptr=3 << 20), 1e-5), ValueError, r"norm weight must be \(256,\) float16 \(in_features"),
            ((_Array((256,), np.float32, ptr=3 << 20), 1e-5), ValueError, r"norm weight must be \(256,\) float16"),
            ((_Array((256,), ptr=(3 << 20) + 2), 1e-5), ValueError, "norm weight must be C-contiguous and 16-byte"),
            ((_Array((256,), ptr=3 << 20, contiguous=False), 1e-5), ValueError, "norm weight must be C-contiguous"),
            ((_Array((256,), ptr=3 << 20, device=1), 1e-5), ValueError, "norm weight is on device 1"),
            ((w, -1e-5), ValueError, "norm eps must be a finite number >= 0, got -1e-05"),
            ((w, float("nan")), ValueError, "norm eps must be a finite number >= 0"),
            ((w, True), ValueError, "norm eps must be a finite number >= 0, got True"),
            ((w, "1e-5"), ValueError, "norm eps must be a finite number >= 0"),
            ((_Array((256,), ptr=(2 << 20) + 64), 1e-5), ValueError, "out overlaps the norm weight")]:
        with pytest.raises(error, match=match):
            unwrapped._check_norm(norm, x, layer, out)


def test_residual_argument_checks(unwrapped):
    layer = SimpleNamespace(in_features=256, out_features=128, device=0)
    out = _Array((4, 128), ptr=2 << 20)
    r = _Array((4, 128), ptr=4 << 20)
    assert unwrapped._check_residual(r, out, layer) is r
    assert unwrapped._check_residual(out, out, layer) is out                     # in place
    assert unwrapped._check_residual(_Array((4, 128), ptr=2 << 20), out, layer) is not None   # the same memory
    for residual, match in [
            (_Array((4, 64), ptr=4 << 20), r"residual must be \(4, 128\) float16 \(the output's shape"),
            (_Array((4, 128), np.float32, ptr=4 << 20), r"residual must be \(4, 128\) float16"),
            (_Array((4, 128), ptr=(4 << 20) + 8), "residual must be C-contiguous and 16-byte aligned"),
            (_Array((4, 128), ptr=4 << 20, contiguous=False), "residual must be C-contiguous"),
            (_Array((4, 128), ptr=4 << 20, device=1), "residual is on device 1"),
            (_Array((4, 128), ptr=(2 << 20) + 256), "out overlaps residual without being it")]:
        with pytest.raises(ValueError, match=match):
            unwrapped._check_residual(residual, out, layer)


def test_which_kernels_fuse(monkeypatch):
    """gemm's choice of launch (_launch_choice, what gemm.fused reports): quick_decode's register
    pipeline takes the norm (and, asked for the residual alone, the residual), its ring the
    residual; an act-order layer never fuses the norm (it gathers the normed x); the other
    kernels compose both; auto fuses as the kernel it picks."""
    monkeypatch.setattr(kernels, "device_limits", lambda device_id: kernels.H100)
    monkeypatch.setattr(kernels, "capturing", lambda: False)
    monkeypatch.setattr(kernels, "unsupported_reason", lambda kernel, device_id: None)
    picks = {}
    monkeypatch.setattr(dispatch, "kernel_for", lambda M, N, K, device_id, dtype, capturable: picks[M])
    layer = SimpleNamespace(in_features=4096, out_features=12288, device=0, group_size=128, perm=None)
    choose = gemm_module._launch_choice

    def fusion(kernel, M, norm, residual, layer=layer):
        _, p = choose(registry.variant(kernel), layer, M, "float16", None, None, norm, residual)
        return (p.prologue, p.epilogue)
    assert kernels.plan("quick_decode", 1, 12288, 4096, 128).shape.stages == 0
    assert kernels.plan("quick_decode", 4, 12288, 4096, 128).shape.stages > 0
    assert fusion("quick_decode", 1, True, False) == (True, False)
    assert fusion("quick_decode", 1, False, True) == (False, True)
    assert fusion("quick_decode", 1, True, True) == (True, False)
    silu = registry.PRO_SILU_MUL
    assert fusion("quick_decode", 1, silu, False) == (silu, False)
    assert fusion("quick_decode", 4, silu, True) == (0, True)
    assert fusion("quick_decode", 4, True, True) == fusion("quick_decode", 4, False, True) == (False, True)
    assert fusion("quick_decode", 4, True, False) == (False, False)
    act_order = SimpleNamespace(**{**vars(layer), "perm": np.arange(4096)})
    assert fusion("quick_decode", 1, True, True, act_order) == (False, True)
    assert fusion("quick_decode", 1, silu, False, act_order) == (0, False)
    for kernel in ("quick", "quick_m16", "quick_sm90"):
        assert fusion(kernel, 16, True, True) == (False, False)
    picks.update({1: registry.VARIANTS["quick_decode"], 64: registry.VARIANTS["quick_sm90"],
                  4096: registry.VARIANTS["dequant"]})
    assert fusion("auto", 1, True, False) == (True, False)
    assert fusion("auto", 64, True, True) == (False, False)
    v, p = choose(registry.VARIANTS["auto"], layer, 4096, "float16", None, None, True, True)
    assert v.name == "dequant" and p is None


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
@pytest.mark.parametrize("tile_m", (16, 32, 64, 128, 256))
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
@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("M,K,N,G", [(129, 1024, 4192, 128), (200, 2048, 384, 32), (300, 1536, 640, 96),
                                     (513, 1024, 160, -1), (1000, 8192, 256, 128), (4096, 4096, 1056, 64)])
def test_sm90_256_token_tiles(dtype, M, K, N, G, rng):
    """quick_sm90's 256-token tiles (128 features a block, one wgmma row block per warpgroup, each
    warp dequantizing half of its lanes' QUICK words): rows past M, tile columns past N (N / 32
    odd, a block's last tile columns absent), 3-chunk groups (two groups a K step), one group per row,
    split-K (the plan's and 3) and a bias (fp16, rounded to bf16 for bf16 activations: within the
    tolerance), fp16 and bf16, against float64, outputs poisoned."""
    import cupy
    from quickcupy import QuantLinear, effective_group_size, gemm
    reason = kernels.unsupported_reason("quick_sm90", cupy.cuda.Device().id)
    if reason:
        pytest.skip(reason)
    dt = cupy.dtype(dtype)
    q = quantize((rng.standard_normal((N, K)) * 0.05).astype(np.float32), G)
    bias = (rng.standard_normal(N) * 0.5).astype(np.float32)
    layer = QuantLinear.from_quantized(q, "quick", bias=bias.astype(np.float16))
    x = cupy.asarray(rng.standard_normal((M, K)).astype(np.float32)).astype(dt)
    ref = reference_gemm(x.astype(np.float32).get(), q, layer.bias.astype(np.float32).get())
    for split_k in (None, 3):
        p = kernels.plan("quick_sm90", M, N, K, effective_group_size(G, K), kernels.device_limits(0),
                         split_k=split_k, dtype=dtype)
        assert p.bm == 256 and p.bn == 128
        out = cupy.full((M, N), np.nan, dt)
        y = gemm(x, layer, "quick_sm90", out, split_k=split_k)
        _check(y.astype(np.float32).get(), ref)


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
    stream = side_stream()
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


# ------------------------------------------------------------- GPU: the RMSNorm and residual fusions
# (K, N) of Llama-2-7B's qkv, o, gate|up and down projections
FUSION_SHAPES = ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))
EPS = 1e-5
UNIT = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}        # unit roundoff of the activations
BITS = {"float16": 11, "bfloat16": 8}                        # significant bits
# A GEMM on normed inputs rounds each input twice (x * inv_rms, then * w), the weights (fp16 or bf16
# dequantization in some kernels) and the output: a few unit roundoffs of relative error at most.
FUSION_TOL = 8


def _act(rng, shape, scale, dtype):
    """Random activations of ``dtype`` (float16 or bfloat16) on the host."""
    from quickcupy.dtypes import np_dtype
    return (scale * rng.standard_normal(shape)).astype(np.float32).astype(np_dtype(dtype))


def _f64(a):
    a = a.get() if hasattr(a, "get") else a
    return np.asarray(a).astype(np.float32).astype(np.float64)


def _bits(a):
    return (a.get() if hasattr(a, "get") else a).view(np.uint16)


def _poisoned(shape, dtype):
    import cupy
    from quickcupy.dtypes import np_dtype
    return cupy.full(shape, np.nan, np.float32).astype(np_dtype(dtype))


def _rms_norm64(x, w, eps):
    """The exact RMSNorm of the rows of x times w, in float64."""
    x, w = _f64(x), _f64(w)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _within_ulps(a, b, dtype, n=2):
    """Elementwise |a - b| <= n units in the last place of ``dtype`` at |b|, or at half b's rms for
    smaller values: a last-bit change of one normed input moves every output of its row by the
    same small amount, a fraction of an ulp at the outputs' typical size but not at a near-zero one."""
    a, b = _f64(a), _f64(b)
    at = np.maximum(np.abs(b), np.sqrt((b * b).mean()) / 2)
    return np.abs(a - b) <= n * 2.0 ** (np.floor(np.log2(at)) - BITS[dtype] + 1)


def _layers_with_and_without_bias(K, N, layout, bias):
    from quickcupy import QuantLinear
    _, plain = _layer(K, N, 128, layout)
    return {False: plain, True: QuantLinear.from_packed(plain.qweight, plain.qzeros, plain.scales, layout=layout,
                                                        in_features=K, out_features=N, group_size=128, bias=bias)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("K,N", FUSION_SHAPES)
def test_norm_and_residual_with_every_kernel(K, N, dtype, rng):
    """gemm with norm=(w, eps) or silu_mul=True, and/or residual=r, for every kernel name (fused
    where the kernel has them, composed otherwise), M = 1, 3, 8, 16, with and without bias, split-K
    and not, against float64 (the exact RMSNorm of x, silu(gate) * up of gate_up; r plus the
    product): each prologue alone and with the residual (outputs poisoned), the residual into a
    separate out (poisoned) and in place (out = r). Every call twice: the same bits (a fixed order
    of every sum). x, gate_up, w and r are left as they were."""
    import cupy
    from quickcupy import gemm
    q, _ = _layer(K, N, 128, "quick")
    W = q.dequantize(np.float64)
    bias = _act(rng, N, 1.0, dtype)
    layers = {layout: _layers_with_and_without_bias(K, N, layout, bias) for layout in ("quick", "awq")}
    device = cupy.cuda.Device().id
    fused_seen = set()
    for M in (1, 3, 8, 16):
        x, r = _act(rng, (M, K), 3.0, dtype), _act(rng, (M, N), 4.0, dtype)
        gate_up = _act(rng, (M, 2 * K), 3.0, dtype)
        w = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32).astype(x.dtype)
        xd, rd, wd, gud = cupy.asarray(x), cupy.asarray(r), cupy.asarray(w), cupy.asarray(gate_up)
        plain_product, normed_product = _f64(x) @ W.T, _rms_norm64(x, w, EPS) @ W.T
        g64 = _f64(gate_up[:, :K])
        gated_product = (g64 / (1 + np.exp(-g64)) * _f64(gate_up[:, K:])) @ W.T
        for with_bias in (False, True):
            b = _f64(bias) if with_bias else 0.0
            refs = {"norm": normed_product + b, "residual": _f64(r) + plain_product + b,
                    "in_place": _f64(r) + plain_product + b, "both": _f64(r) + normed_product + b,
                    "silu_mul": gated_product + b, "silu_mul_residual": _f64(r) + gated_product + b}
            for kernel in KERNELS:
                v = registry.variant(kernel)
                if (M > (v.design.max_m or M) or dtype not in v.design.dtypes
                        or kernels.unsupported_reason(v, device) is not None):
                    continue
                layer = layers[v.layout][with_bias]
                for split_k in ((None,) if v.path != "gemm" else (None, 3)):
                    plan = {} if split_k is None else {"split_k": split_k}
                    for case, ref in refs.items():
                        where = f"{kernel} M={M} bias={with_bias} split_k={split_k} {case}"
                        asked = {"norm": (wd, EPS)} if case in ("norm", "both") else {}
                        gated = case.startswith("silu_mul")
                        if gated:
                            asked["silu_mul"] = True
                        runs = []
                        for _ in range(2):
                            out = rd.copy() if case == "in_place" else _poisoned((M, N), dtype)
                            if case not in ("norm", "silu_mul"):
                                asked["residual"] = out if case == "in_place" else rd
                            assert gemm(gud if gated else xd, layer, kernel, out, **asked, **plan) is out
                            runs.append(out.get())
                        fused_seen.add((kernel, case, gemm_module.fused(layer, M, dtype, kernel, norm="norm" in asked,
                                                                        residual="residual" in asked,
                                                                        silu_mul=gated)))
                        assert np.array_equal(_bits(runs[0]), _bits(runs[1])), f"{where}: two runs differ"
                        assert not np.isnan(_f64(runs[0])).any(), f"{where}: NaN in the output"
                        err = rel_error(_f64(runs[0]), ref)
                        assert err < FUSION_TOL * UNIT[dtype], f"{where}: relative error {err:.2e}"
        assert np.array_equal(_bits(xd), _bits(x)) and np.array_equal(_bits(wd), _bits(w))
        assert np.array_equal(_bits(rd), _bits(r)) and np.array_equal(_bits(gud), _bits(gate_up))
    # quick_decode at M = 1 (the register pipeline) ran each prologue and the residual add in its launch
    assert ("quick_decode", "norm", (True, False)) in fused_seen
    assert ("quick_decode", "silu_mul", (True, False)) in fused_seen
    assert ("quick_decode", "in_place", (False, True)) in fused_seen
    assert all(f == (False, False) for k, _, f in fused_seen if k not in ("quick_decode", "auto"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("K,N", FUSION_SHAPES)
def test_fused_equals_composed(K, N, dtype, rng):
    """quick_decode with the norm or SiLU * up in its prologue and the residual add in its epilogue
    against the same GEMM composed by hand (add_rms_norm or silu_mul, the plain GEMM, an elementwise
    add): the residual and SiLU * up bit for bit (both epilogues, split and not, in place too), the
    norm within 2 ulps (its sum of squares runs in another order, so inv_rms, and a normed input,
    may differ in the last bit)."""
    import cupy
    from quickcupy import gemm
    from quickcupy.llama import ops
    layers = _layers_with_and_without_bias(K, N, "quick", _act(rng, N, 1.0, dtype))
    for M in (1, 3, 8, 16):
        x, r = _act(rng, (M, K), 3.0, dtype), _act(rng, (M, N), 4.0, dtype)
        w = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32).astype(x.dtype)
        xd, rd, wd = cupy.asarray(x), cupy.asarray(r), cupy.asarray(w)
        for with_bias, layer in layers.items():
            for split_k in (None, 1, 4):
                plan = {} if split_k is None else {"split_k": split_k}
                where = f"M={M} bias={with_bias} split_k={split_k}"
                y = gemm(xd, layer, "quick_decode", **plan)
                composed = cupy.add(rd, y)
                fused = gemm(xd, layer, "quick_decode", _poisoned((M, N), dtype), residual=rd, **plan)
                assert np.array_equal(_bits(fused), _bits(composed)), where
                in_place = rd.copy()
                gemm(xd, layer, "quick_decode", in_place, residual=in_place, **plan)
                assert np.array_equal(_bits(in_place), _bits(composed)), where
                composed = gemm(ops.add_rms_norm(xd, wd, EPS), layer, "quick_decode", **plan)
                fused = gemm(xd, layer, "quick_decode", _poisoned((M, N), dtype), norm=(wd, EPS), **plan)
                close = _within_ulps(fused, composed, dtype)
                assert close.all(), f"{where}: {np.count_nonzero(~close)} outputs differ by more than 2 ulps"
                gud = cupy.asarray(_act(rng, (M, 2 * K), 3.0, dtype))
                composed = gemm(ops.silu_mul(gud), layer, "quick_decode", **plan)
                fused = gemm(gud, layer, "quick_decode", _poisoned((M, N), dtype), silu_mul=True, **plan)
                assert np.array_equal(_bits(fused), _bits(composed)), f"{where} silu_mul"
    assert gemm_module.fused(layers[False], 1, dtype, "quick_decode", norm=True) == (True, False)
    assert gemm_module.fused(layers[False], 1, dtype, "quick_decode", silu_mul=True) == (True, False)
    assert gemm_module.fused(layers[False], 1, dtype, "quick_decode", residual=True) == (False, True)


@pytest.mark.gpu
def test_norm_and_residual_errors_before_launch(rng):
    """Bad norm / residual / silu_mul arguments raise before anything runs: the output stays as it was."""
    import cupy
    from quickcupy import QuantLinear, gemm
    K, N = 256, 128
    layer = QuantLinear.from_quantized(quantize(rng.standard_normal((N, K)).astype(np.float32), 128))
    square = QuantLinear.from_quantized(quantize(rng.standard_normal((K, K)).astype(np.float32), 128))
    x = cupy.asarray(rng.standard_normal((4, K)).astype(np.float16))
    w, w2 = cupy.ones(K, np.float16), cupy.ones(4 * K, np.float16)
    out = cupy.full((4, N), np.nan, np.float16)
    for kernel in ("quick_decode", "quick"):
        with pytest.raises(ValueError, match=r"norm weight must be \(256,\) float16"):
            gemm(x, layer, kernel, out, norm=(w[:128], 1e-5))
        with pytest.raises(ValueError, match="norm eps must be a finite number >= 0"):
            gemm(x, layer, kernel, out, norm=(w, -1.0))
        with pytest.raises(TypeError, match=r"norm must be \(weight, eps\)"):
            gemm(x, layer, kernel, out, norm=w)
        with pytest.raises(ValueError, match=r"residual must be \(4, 128\) float16"):
            gemm(x, layer, kernel, out, residual=cupy.zeros((4, N), np.float32))
        buf = cupy.zeros(8 * N, np.float16)
        with pytest.raises(ValueError, match="out overlaps residual without being it"):
            gemm(x, layer, kernel, buf[:4 * N].reshape(4, N), residual=buf[2 * N:6 * N].reshape(4, N))
        with pytest.raises(ValueError, match="out overlaps x"):          # the residual stream may not be x
            gemm(x, square, kernel, x, residual=x)
        with pytest.raises(ValueError, match="out overlaps the norm weight"):
            gemm(x, square, kernel, w2[:4 * K].reshape(4, K), norm=(w2[:K], 1e-5))
        with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 512\) \(silu_mul: gate \| up"):
            gemm(x, layer, kernel, out, silu_mul=True)
        with pytest.raises(ValueError, match="norm and silu_mul cannot both be given"):
            gemm(cupy.concatenate([x, x], axis=1), layer, kernel, out, norm=(w, 1e-5), silu_mul=True)
        with pytest.raises(TypeError, match="silu_mul must be True or False"):
            gemm(x, layer, kernel, out, silu_mul="yes")
        assert bool(cupy.isnan(out).all()) and not buf.any() and not bool(cupy.isnan(x).any())

"""bfloat16 activations: every design against the float64 NumPy reference (outputs poisoned with
NaN, fresh random data, awkward and model shapes, group sizes, tiles, split-K, bias, a fuzz), and on
the CPU the instances, the dtype rules and the exactness of the bf16 scale split the kernels use."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

# A dependency (CuPy's bfloat16 arrays use its dtype): installed wherever quickcupy is; a machine
# running the checkout without installing it (the GPU machine) must bring it, or this shows as skipped.
ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (a quickcupy dependency) is not installed")

from conftest import rel_error  # noqa: E402
from quickcupy import dispatch, dtypes, kernels, reference_gemm, registry  # noqa: E402
from quickcupy.__main__ import main  # noqa: E402
from quickcupy.tools import accuracy  # noqa: E402
from test_fuzz import random_quantized  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
BF16_KERNELS = tuple(k for k, v in registry.VARIANTS.items() if "bfloat16" in registry.design_of(k).dtypes)
# Kernel error over the unavoidable one (the float64 result rounded to bf16): the weights' own bf16
# rounding adds about as much again (sqrt(2)); 3 leaves room and still catches any wrong weight.
FLOOR_FACTOR = 3.0
SHAPES = ((64, 64), (96, 192), (1024, 448), (4096, 4096), (4096, 11008), (11008, 4096))  # (K, N)


# ---------------------------------------------------------------------------------------- CPU
def test_scale_split_is_exact_and_rounds_once():
    """The claim of cuda/quant_common.cuh (ScaleBf2), for EVERY positive finite fp16 scale and every
    code - zero: hi + lo == s exactly, d * lo is exact in bf16, and fma(d, hi, d * lo) is the
    correctly rounded bf16 of d * s (here: computed in float64, rounded once)."""
    s = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16)         # every positive finite fp16
    hi, lo = accuracy.split_scale_bf16(s)
    assert np.array_equal(hi.astype(np.float64) + lo.astype(np.float64), s.astype(np.float64))
    for d in range(-15, 16):
        exact = d * lo.astype(np.float64)
        assert np.array_equal(exact.astype(BF16).astype(np.float64), exact)
        got = accuracy.dequant_bf16(np.full(s.shape, d), s)
        assert np.array_equal(got, (d * s.astype(np.float64)).astype(BF16))


def test_naive_scale_rounding_is_what_the_split_avoids():
    """Rounding the scale to bf16 first gives a different (doubly rounded) weight for some scales:
    the split is not a no-op."""
    s = np.arange(0x1000, 0x7800, dtype=np.uint16).view(np.float16)
    d = np.full(s.shape, 7)
    naive = (d * s.astype(BF16).astype(np.float64)).astype(BF16)
    assert (naive != accuracy.dequant_bf16(d, s)).mean() > 0.05


def test_emulated_bf16_weights_rank_as_the_kernel_comment_says(rng):
    """Against the exact float64 weights: the kernels' weights (rounded once) are the closest, and
    the naive zero-point path the farthest (its cancellation error grows with zero * scale)."""
    from quickcupy import quantize
    q = quantize((rng.standard_normal((256, 1024)) * 0.05).astype(np.float16), 128)
    exact = q.dequantize(np.float64)
    err = {name: rel_error(w, exact) for name, w in accuracy.emulated_bf16_weights(q).items()}
    once, scale_first, naive_zp = err.values()
    assert once <= 2 ** -8 and once < scale_first < naive_zp


def test_accuracy_tool_refuses_bad_options_before_any_work(capsys):
    assert main(["accuracy", "--shape", "4096"]) == 2
    assert "--shape: '4096' is not KxN" in capsys.readouterr().err
    assert main(["accuracy", "--kernels", "quick,int8"]) == 2
    assert "unknown 'int8'" in capsys.readouterr().err


def test_every_bf16_plan_is_a_compiled_instance():
    for kernel in BF16_KERNELS:
        if registry.VARIANTS[kernel].path != "gemm":
            continue
        for M in (1, 16, 100):
            if M > (registry.design_of(kernel).max_m or M):
                continue
            names = {dt: kernels.plan(kernel, M, 4096, 4096, 128, dtype=dt).name for dt in dtypes.NAMES}
            assert names["float16"] != names["bfloat16"] and "__nv_bfloat16" in names["bfloat16"]
            for dt, name in names.items():
                assert name in registry.SOURCES[registry.design_of(kernel).source].instances, (dt, name)
    for helper in ("splitk_reduce.cu", "dequant.cu"):
        assert {n[n.index("<") + 1:-1] for n in registry.SOURCES[helper].instances} == set(dtypes.CTYPES.values())


def test_dtype_rules():
    fp16_only = [d.name for d in registry.DESIGNS.values() if "bfloat16" not in d.dtypes]
    for name in fp16_only:
        with pytest.raises(ValueError, match=f"kernel {name} runs float16 activations, got bfloat16"):
            registry.DESIGNS[name].check_dtype("bfloat16")
    with pytest.raises(ValueError, match="dtype=<class 'numpy.float32'> is not an activation dtype"):
        dtypes.np_dtype(np.float32)
    assert dtypes.np_dtype("bfloat16") == BF16 and dtypes.ctype(BF16) == "__nv_bfloat16"
    assert dtypes.ctype(np.float16) == "half"
    assert dtypes.name("bf16") == dtypes.name("BFloat16") == "bfloat16" and dtypes.name("fp16") == "float16"


def test_auto_falls_back_when_the_table_kernel_lacks_the_dtype(monkeypatch):
    """A table kernel without bf16 instances (here: quick, declared fp16-only for the test) gives way
    to DEFAULT_RULES for bf16 calls and still runs fp16 ones."""
    import dataclasses
    fp16_only = dataclasses.replace(registry.DESIGNS["quick"], dtypes=("float16",))
    monkeypatch.setitem(registry.VARIANTS, "quick", dataclasses.replace(registry.VARIANTS["quick"], design=fp16_only))
    table = {"device": "test", "rules": ({"max_m": None, "kernel": "quick"},), "source": "test"}
    monkeypatch.setattr(dispatch, "_device_name", lambda device_id: "test")
    monkeypatch.setattr(kernels, "device_arch", lambda device_id: "sm_90")
    monkeypatch.setattr(dispatch, "table_for", lambda name, arch=None: table)
    monkeypatch.setattr(kernels, "unsupported_reason", lambda kernel, device_id: None)
    choose = dispatch.kernel_for.__wrapped__
    assert choose(512, 4096, 4096, 0, "float16").name == "quick"
    assert choose(512, 4096, 4096, 0, "bfloat16").name == dispatch.choose(512, dispatch.DEFAULT_RULES) != "quick"


# ---------------------------------------------------------------------------------------- GPU
def _layer(q, kernel, bias=None):
    from quickcupy import QuantLinear
    return QuantLinear.from_quantized(q, layout=registry.design_of(kernel).layout, bias=bias)


def _run(x_host, layer, kernel, **plan):
    import cupy
    from quickcupy import gemm
    x = cupy.asarray(x_host)
    out = cupy.full(x.shape[:-1] + (layer.out_features,), np.nan, x.dtype)   # poison
    y = gemm(x, layer, kernel, out, **plan)
    assert y is out and y.dtype == x.dtype
    return y.get()


def _check(y, ref):
    y = y.astype(np.float64)
    assert not np.isnan(y).any(), "output has NaN: an element was not written"
    floor = rel_error(ref.astype(BF16).astype(np.float64), ref)
    err = rel_error(y, ref)
    assert err <= FLOOR_FACTOR * floor, f"relative error {err:.2e}, bf16 rounding of the result {floor:.2e}"


def _bf16(rng, shape):
    return rng.standard_normal(shape).astype(np.float32).astype(BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("G", (32, 128))
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("kernel", BF16_KERNELS)
def test_bf16_matches_float64(kernel, K, N, G, rng):
    design = registry.design_of(kernel)
    if N % design.n_multiple or K % G:
        pytest.skip(f"{kernel} needs N % {design.n_multiple} == 0 and K % G == 0")
    q = random_quantized(rng, N, K, G)
    layer = _layer(q, kernel)
    for M in (1, 2, 7, 16, 33, 100, 257):
        if M > (design.max_m or M):
            continue
        x = _bf16(rng, (M, K))
        _check(_run(x, layer, kernel), reference_gemm(x.astype(np.float64), q))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ("awq", "quick", "quick_decode"))
@pytest.mark.parametrize("split_k", (1, 3, 8))
def test_bf16_tiles_and_split_k(kernel, split_k, rng):
    K, N, G = 2048, 1024, 128
    q = random_quantized(rng, N, K, G)
    design = registry.design_of(kernel)
    bias = rng.standard_normal(N).astype(np.float16)
    layer = _layer(q, kernel, bias)
    for tile_m in (getattr(design, "tiles", None) or (None,)):     # a DecodeDesign picks its own shape
        M = 13 if design.max_m else 77
        x = _bf16(rng, (M, K))
        plan = dict(split_k=split_k, **({"tile_m": tile_m} if tile_m else {}))
        _check(_run(x, layer, kernel, **plan), reference_gemm(x.astype(np.float64), q, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("G", (96, 256, -1))
def test_bf16_group_sizes_bias_and_batch_dims(G, rng):
    """Odd group sizes; a bf16 bias (kept bf16) and an fp16 one (converted once); batch dims."""
    K, N = 4608 if G != -1 else 640, 256
    q = random_quantized(rng, N, K, G)
    x = _bf16(rng, (2, 3, 5, K))
    for bias in (_bf16(rng, N), rng.standard_normal(N).astype(np.float16)):
        ref = reference_gemm(x.astype(np.float64), q, bias.astype(np.float64))
        for kernel in BF16_KERNELS:
            if 30 > (registry.design_of(kernel).max_m or 30):   # 2 x 3 x 5 rows
                continue
            y = _run(x, _layer(q, kernel, bias), kernel)
            assert y.shape == (2, 3, 5, N)
            _check(y, ref)


@pytest.mark.gpu
def test_bf16_dtype_errors_before_launch(rng):
    import cupy
    from quickcupy import QuantLinear, gemm
    q = random_quantized(rng, 64, 128, 32)
    layer = QuantLinear.from_quantized(q)
    x = cupy.asarray(_bf16(rng, (4, 128)))
    with pytest.raises(TypeError, match="out must have x's dtype bfloat16, got float16"):
        gemm(x, layer, "quick", out=cupy.empty((4, 64), np.float16))
    with pytest.raises(TypeError, match="x must be float16 or bfloat16, got float32"):
        gemm(x.astype(np.float32), layer)
    if "quick_sm90" in registry.DESIGNS and "bfloat16" not in registry.DESIGNS["quick_sm90"].dtypes:
        with pytest.raises(ValueError, match="runs float16 activations, got bfloat16"):
            gemm(x, layer, "quick_sm90")


@st.composite
def bf16_cases(draw):
    kernel = draw(st.sampled_from(BF16_KERNELS))
    design = registry.design_of(kernel)
    G = draw(st.sampled_from((32, 64, 96, 128, 256, -1)))
    unit = 32 if G == -1 else G
    K = unit * draw(st.integers(1, max(1, 8192 // unit)))
    N = design.n_multiple * draw(st.integers(1, 4096 // design.n_multiple))
    if K * N > (1 << 23):
        N = max(design.n_multiple, ((1 << 23) // K) // design.n_multiple * design.n_multiple)
    M = draw(st.one_of(st.integers(1, 64), st.integers(65, 1024)))
    if design.max_m is not None:
        M = 1 + M % design.max_m
    gemm_path = registry.VARIANTS[kernel].path == "gemm"
    split_k = draw(st.one_of(st.none(), st.integers(1, 12))) if gemm_path else None
    return dict(kernel=kernel, K=K, N=N, G=G, M=M, split_k=split_k, bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


@pytest.mark.gpu
@settings(max_examples=150, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=bf16_cases())
def test_fuzz_bf16_against_float64(case):
    r = np.random.default_rng(case["seed"])
    q = random_quantized(r, case["N"], case["K"], case["G"])
    bias = r.standard_normal(case["N"]).astype(np.float32).astype(BF16) if case["bias"] else None
    x = _bf16(r, (case["M"], case["K"]))
    y = _run(x, _layer(q, case["kernel"], bias), case["kernel"], split_k=case["split_k"])
    _check(y, reference_gemm(x.astype(np.float64), q, None if bias is None else bias.astype(np.float64)))

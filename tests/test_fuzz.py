"""Every group size either works or is refused; a hypothesis fuzz of gemm over shapes, group sizes,
kernels, tiles, split-K, bias and batch dimensions; the layer shapes of real models. All GPU results
are compared with a float64 NumPy reference on fresh random data, outputs poisoned with NaN."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import rel_error
from quickcupy import QuantizedWeight, pack_awq, quantize, reference_gemm, unpack_awq
from quickcupy import registry

TOL = 1e-2
SUPPORTED_G = (32, 64, 96, 128, 192, 256, 512, -1)
REFUSED_G = (8, 16, 48, 100)


def random_quantized(rng, N, K, G):
    """Random codes, zeros and positive scales (no quantization rule needed: the kernels must
    compute (code - zero) * scale for any of them)."""
    g = K if G == -1 else G
    return QuantizedWeight(codes=rng.integers(0, 16, (N, K), dtype=np.uint8),
                           zeros=rng.integers(0, 16, (N, K // g), dtype=np.uint8),
                           scales=rng.uniform(0.002, 0.02, (N, K // g)).astype(np.float16), group_size=g)


# ---------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("G", REFUSED_G)
def test_unsupported_group_sizes_are_refused_everywhere(G, rng):
    K, N = 4608, 64
    with pytest.raises(ValueError, match=f"group_size={G} is not supported"):
        quantize(rng.standard_normal((N, K)).astype(np.float32), G)
    n_groups = K // G if K % G == 0 else K // 48
    tensors = dict(codes=np.zeros((N, K), np.uint8), zeros=np.zeros((N, n_groups), np.uint8),
                   scales=np.ones((N, n_groups), np.float16))
    with pytest.raises(ValueError, match="group_size"):
        QuantizedWeight(**tensors, group_size=G)
    if K % G == 0:                    # AutoAWQ-format tensors of that group size (48, 16, 8)
        p = pack_awq(random_quantized(rng, N, K, 32))
        qzeros = np.zeros((K // G, N // 8), np.int32)
        scales = np.ones((K // G, N), np.float16)
        with pytest.raises(ValueError, match=f"group_size={G} is not supported"):
            unpack_awq(p.qweight, qzeros, scales)


@pytest.mark.parametrize("G", SUPPORTED_G)
def test_supported_group_sizes_are_accepted(G, rng):
    q = quantize(rng.standard_normal((64, 4608)).astype(np.float32), G)
    assert q.group_size == (4608 if G == -1 else G)
    assert unpack_awq(*pack_awq(q)).group_size == q.group_size


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.5, 0.0])
def test_corrupted_scales_are_refused(bad, rng):
    p = pack_awq(random_quantized(rng, 64, 256, 128))
    scales = p.scales.copy()
    scales[1, 7] = bad
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        unpack_awq(p.qweight, p.qzeros, scales)


# ---------------------------------------------------------------------------------------- GPU
def _run(x_host, q, layout, kernel, bias=None, **plan):
    import cupy
    from quickcupy import QuantLinear, gemm
    layer = QuantLinear.from_quantized(q, layout=layout, bias=bias)
    x = cupy.asarray(x_host)
    out = cupy.full(x.shape[:-1] + (q.out_features,), np.nan, np.float16)
    gemm(x, layer, kernel, out, **plan)
    return out.get()


@pytest.mark.gpu
@pytest.mark.parametrize("G", SUPPORTED_G)
@pytest.mark.parametrize("kernel", tuple(registry.VARIANTS))
def test_every_supported_group_size_matches_float64(G, kernel, rng):
    """The group sizes that once returned NaN (96) or garbage (192) at K = 4608, N = 1024, M = 8."""
    K, N = 4608, 1024
    q = random_quantized(rng, N, K, G)
    x = rng.standard_normal((8, K)).astype(np.float16)
    for split_k in (None, 1, 5) if registry.VARIANTS[kernel].path == "gemm" else (None,):
        y = _run(x, q, registry.design_of(kernel).layout, kernel, split_k=split_k)
        assert not np.isnan(y).any()
        assert rel_error(y, reference_gemm(x, q)) < TOL, (G, kernel, split_k)


@st.composite
def gemm_cases(draw):
    kernel = draw(st.sampled_from(tuple(registry.VARIANTS)))
    design = registry.design_of(kernel)
    G = draw(st.sampled_from(SUPPORTED_G))
    unit = 32 if G == -1 else G
    K = unit * draw(st.integers(1, max(1, 8192 // unit)))
    N = design.n_multiple * draw(st.integers(1, 8192 // design.n_multiple))
    if K * N > (1 << 24):                      # keep each example's host work small
        N = max(design.n_multiple, ((1 << 24) // K) // design.n_multiple * design.n_multiple)
    M = draw(st.one_of(st.integers(1, 64), st.integers(65, 2048)))
    if design.max_m is not None:
        M = 1 + M % design.max_m
    lead = draw(st.sampled_from([(), (2,), (3, 1)]))
    M = max(1, M // int(np.prod(lead))) if lead else M
    gemm_path = registry.VARIANTS[kernel].path == "gemm"
    tile_m = (draw(st.sampled_from([None, *getattr(design, "tiles", ())]))
              if gemm_path and registry.VARIANTS[kernel].tile_m is None else None)
    split_k = draw(st.one_of(st.none(), st.integers(1, 12))) if gemm_path else None
    return dict(kernel=kernel, K=K, N=N, G=G, M=M, lead=lead, tile_m=tile_m, split_k=split_k,
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@pytest.mark.gpu
@settings(max_examples=300, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=gemm_cases())
def test_fuzz_gemm_against_float64(case):
    """Shrinking prints the failing case (hypothesis' "Falsifying example")."""
    r = np.random.default_rng(case["seed"])
    K, N, G = case["K"], case["N"], case["G"]
    q = random_quantized(r, N, K, G)
    bias = r.standard_normal(N).astype(np.float16) if case["bias"] else None
    x = r.standard_normal((*case["lead"], case["M"], K)).astype(np.float16)
    y = _run(x, q, registry.design_of(case["kernel"]).layout, case["kernel"], bias=bias,
             tile_m=case["tile_m"], split_k=case["split_k"])
    assert y.shape == (*case["lead"], case["M"], N)
    assert not np.isnan(y).any(), "an output was not written (or NaN was computed)"
    assert rel_error(y, reference_gemm(x, q, bias)) < TOL


def _model_shapes():
    """(K, N) -> "model layer" for the fused GEMMs of every model in quickcupy.llama.model.MODELS."""
    from quickcupy.llama.model import MODELS, LlamaConfig, gemm_shapes
    shapes = {}
    for name, dims in MODELS.items():
        for layer, shape in gemm_shapes(LlamaConfig(**dims)).items():
            shapes.setdefault(shape, f"{name} {layer}")
    return shapes


MODEL_SHAPES = _model_shapes()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("K,N", list(MODEL_SHAPES), ids=list(MODEL_SHAPES.values()))
def test_real_model_shapes(K, N, rng):
    """Every output checked for NaN; 256 random output columns against float64 (the full float64
    reference of a 70B layer would need ~2 GB)."""
    q = random_quantized(rng, N, K, 128)
    cols = np.sort(rng.choice(N, 256, replace=False))
    w_sub = QuantizedWeight(codes=q.codes[cols], zeros=q.zeros[cols], scales=q.scales[cols], group_size=128)
    for M in (1, 16, 128):
        x = rng.standard_normal((M, K)).astype(np.float16)
        ref = reference_gemm(x, w_sub)
        for kernel in ("awq", "quick", "quick_decode", "quick_sm90", "dequant"):
            if M > (registry.design_of(kernel).max_m or M):
                continue
            y = _run(x, q, registry.design_of(kernel).layout, kernel)
            assert not np.isnan(y).any(), (kernel, M)
            assert rel_error(y[:, cols], ref) < TOL, (kernel, M)

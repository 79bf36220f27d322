"""gemm with foreign arrays (PyTorch through DLPack, __cuda_array_interface__) and the caller's stream.

CPU: the argument rules of quickcupy.gemm._as_cupy/_as_stream. GPU: torch tensors in and out without
copies, values against the float64 reference, a torch stream respected, CUDA-graph capture by torch.
"""
import numpy as np
import pytest

from conftest import rel_error
from quickcupy import quantize, reference_gemm

TOL = 1e-2


class _HostDLPack:
    """An array that offers DLPack from host memory (as a CPU torch tensor does)."""
    def __dlpack__(self, stream=None):
        raise AssertionError("must be refused before any export")

    def __dlpack_device__(self):
        return (1, 0)                                  # kDLCPU


# ------------------------------------------------------------------------------------------- CPU
def test_argument_rules_without_a_gpu():
    pytest.importorskip("cupy")
    from quickcupy.gemm import _as_cupy, _as_stream
    with pytest.raises(TypeError, match=r"x is a NumPy array; move it to the GPU first with cupy.asarray\(x\)"):
        _as_cupy(np.zeros((2, 64), np.float16), "x")
    with pytest.raises(TypeError, match="out must be a GPU array .* got list"):
        _as_cupy([1.0, 2.0], "out")
    with pytest.raises(TypeError, match=r"x is not in CUDA memory \(DLPack device type 1\)"):
        _as_cupy(_HostDLPack(), "x")
    assert _as_stream(None, 0) is None
    for bad in (True, "stream", 1.5, -1):
        with pytest.raises(TypeError, match="stream must be a cupy.cuda.Stream, a cudaStream_t"):
            _as_stream(bad, 0)


# ------------------------------------------------------------------------------------------- GPU
def _layer(rng, K=512, N=256, G=128, bias=True):
    from quickcupy import QuantLinear
    q = quantize((rng.standard_normal((N, K)) * 0.05).astype(np.float32), G)
    b = rng.standard_normal(N).astype(np.float16) if bias else None
    return q, QuantLinear.from_quantized(q, layout="quick", bias=b)


def _ref(x, q, layer):
    return reference_gemm(x, q, None if layer.bias is None else layer.bias.get())


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [None, "quick", "quick_decode", "dequant"])
def test_torch_in_torch_out_zero_copy(kernel, rng):
    torch = pytest.importorskip("torch")
    from quickcupy import gemm
    from quickcupy.gemm import _as_cupy
    q, layer = _layer(rng)
    x_host = rng.standard_normal((2, 5, 512)).astype(np.float16)
    x = torch.from_numpy(x_host).cuda()
    assert _as_cupy(x, "x")[0].data.ptr == x.data_ptr()                  # no copy in
    y = gemm(x, layer, kernel)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float16 and y.shape == (2, 5, 256)
    assert rel_error(y.cpu().numpy(), _ref(x_host, q, layer)) < TOL
    out = torch.full((2, 5, 256), float("nan"), dtype=torch.float16, device="cuda")
    y2 = layer(x, out=out, kernel=kernel)
    assert y2 is out                                                       # written in place
    assert rel_error(out.cpu().numpy(), _ref(x_host, q, layer)) < TOL


@pytest.mark.gpu
def test_torch_bfloat16_in_bfloat16_out(rng):
    torch = pytest.importorskip("torch")
    q, layer = _layer(rng)
    x = torch.randn(9, 512, dtype=torch.bfloat16, device="cuda")
    y = layer(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.shape == (9, 256)
    ref = _ref(x.float().cpu().numpy().astype(np.float64), q, layer)
    assert rel_error(y.float().cpu().numpy(), ref) < TOL


@pytest.mark.gpu
def test_cuda_array_interface_input(rng):
    import cupy
    from quickcupy import gemm
    q, layer = _layer(rng)
    x_host = rng.standard_normal((3, 512)).astype(np.float16)
    x = cupy.asarray(x_host)

    class Foreign:                                     # exposes only __cuda_array_interface__ (Numba-like)
        __cuda_array_interface__ = x.__cuda_array_interface__

    y = gemm(Foreign(), layer)
    assert isinstance(y, cupy.ndarray)
    assert rel_error(y, _ref(x_host, q, layer)) < TOL


@pytest.mark.gpu
def test_torch_bad_inputs_raise(rng):
    torch = pytest.importorskip("torch")
    from quickcupy import gemm
    _, layer = _layer(rng)
    x = torch.randn(4, 512, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"x is not in CUDA memory \(DLPack device type 1\)"):
        gemm(x, layer)
    with pytest.raises(TypeError, match="x must be float16 or bfloat16, got float32"):
        gemm(x.float().cuda(), layer)
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm(torch.randn(512, 4, dtype=torch.float16, device="cuda").t(), layer)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 256\)"):
        gemm(x.cuda(), layer, out=torch.empty(4, 128, dtype=torch.float16, device="cuda"))
    with pytest.raises(TypeError, match="out is not in CUDA memory"):
        gemm(x.cuda(), layer, out=torch.empty(4, 256, dtype=torch.float16))


class _Handle:
    """A raw stream handle in the CUDA stream protocol (what cupy.cuda.Stream.from_external takes)."""

    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["torch", "int", "cupy"])
def test_caller_stream_is_respected(how, rng):
    """x is written on a torch side stream after a long sleep; gemm launched on that stream (never
    synchronizing it) must see the new x, and only that stream is synchronized before reading."""
    torch = pytest.importorskip("torch")
    import cupy
    from quickcupy import gemm
    q, layer = _layer(rng)
    x_host = rng.standard_normal((7, 512)).astype(np.float16)
    src = torch.from_numpy(x_host).cuda()
    x = torch.full((7, 512), float("nan"), dtype=torch.float16, device="cuda")   # poisoned until the copy
    out = torch.full((7, 256), float("nan"), dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()                         # PyTorch's pool streams are non-blocking
    stream = {"torch": side, "int": side.cuda_stream,
              "cupy": cupy.cuda.Stream.from_external(_Handle(side.cuda_stream))}[how]
    gemm(src, layer, out=torch.empty_like(out), stream=stream)   # compile and allocate the stream's
    torch.cuda.synchronize()                                     # workspace first: the call below only launches
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000_000)               # ~0.5 s of GPU time before x gets its values
        x.copy_(src)
    gemm(x, layer, out=out, stream=stream)
    assert not side.query()                             # the call queued its work, it did not wait
    side.synchronize()
    assert rel_error(out.cpu().numpy(), _ref(x_host, q, layer)) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,M", [("quick_decode", 4), ("quick", 64)])
def test_torch_cuda_graph_capture(kernel, M, rng):
    """A gemm with out= captured by torch.cuda.graph replays with new inputs."""
    torch = pytest.importorskip("torch")
    q, layer = _layer(rng, K=1024, N=512)
    x = torch.empty(M, 1024, dtype=torch.float16, device="cuda")
    out = torch.empty(M, 512, dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                      # warm-up: compile, allocate the stream's workspace
        layer(x.normal_(), out=out, kernel=kernel, stream=side)
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        layer(x, out=out, kernel=kernel, stream=torch.cuda.current_stream())
    for _ in range(2):
        x_host = rng.standard_normal((M, 1024)).astype(np.float16)
        x.copy_(torch.from_numpy(x_host))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out.cpu().numpy(), _ref(x_host, q, layer)) < TOL

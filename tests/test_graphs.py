"""CUDA graphs and streams: a captured gemm call owns its scratch for as long as the graph can replay,
the per-stream workspace survives streams coming and going, and first calls from many threads agree.

Every check runs on fresh random data against the float64 reference, outputs poisoned before each
replay, and arrays allocated after the capture (the memory a freed scratch buffer would come back as)
filled with a sentinel and checked untouched after the replays.
"""
import importlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import rel_error, side_stream
from quickcupy import kernels, quantize, reference_gemm, registry

gemm_module = importlib.import_module("quickcupy.gemm")   # the module (quickcupy.gemm is also the function)
TOL = 1e-2
SENTINEL = 12345.0


# ---------------------------------------------------------------------------------------- CPU
def test_programmatic_launch_is_allowed_per_thread_and_gemms_are_recorded(monkeypatch):
    """pdl_allowed(False) turns programmatic launch off for this thread's launches inside the block
    (nested blocks restore what was), other threads keep it; recording_gemm_pdl collects what each
    GEMM reports inside it (innermost block only, nothing outside any); takes_pdl is true for the
    decode design's plans only (they launch with the attribute), false for the dequant path."""
    import threading
    monkeypatch.setattr(kernels, "_pdl_capable", lambda device_id: True)
    monkeypatch.setattr(kernels, "capturing", lambda: True)
    assert kernels.pdl_active(0)
    seen = []
    with kernels.pdl_allowed(False):
        assert not kernels.pdl_active(0)
        with kernels.pdl_allowed(True):
            assert kernels.pdl_active(0)
        assert not kernels.pdl_active(0)
        other = threading.Thread(target=lambda: seen.append(kernels.pdl_active(0)))
        other.start()
        other.join()
    assert kernels.pdl_active(0) and seen == [True]
    kernels.record_gemm_pdl(False)                  # outside any recording: dropped
    with kernels.recording_gemm_pdl() as outer:
        kernels.record_gemm_pdl(True)
        with kernels.recording_gemm_pdl() as inner:
            kernels.record_gemm_pdl(False)
        kernels.record_gemm_pdl(1)
    assert outer == [True, True] and inner == [False]
    assert kernels.takes_pdl(kernels.plan("quick_decode", 1, 4096, 4096, 128))
    assert kernels.takes_pdl(kernels.plan("quick_decode", 16, 4096, 11008, 128))
    for name, M in (("quick", 1), ("awq", 1), ("quick_sm90", 256)):
        assert not kernels.takes_pdl(kernels.plan(name, M, 4096, 4096, 128)), name
    assert not kernels.takes_pdl(None)


def test_one_gemm_call_resolves_its_kernel_name_once(monkeypatch):
    """gemm turns the kernel name into its registry record once, before any check, and passes the
    record down: the planner and the launcher never look a name up again."""
    seen = []
    for name in ("variant", "design_of"):
        real = getattr(registry, name)

        def counting(kernel, real=real):
            if isinstance(kernel, str):
                seen.append(kernel)
            return real(kernel)
        monkeypatch.setattr(registry, name, counting)
    monkeypatch.setattr(kernels, "device_limits", lambda device_id: kernels.H100)
    p = gemm_module._plan.__wrapped__(registry.VARIANTS["quick_m16"], 5, 256, 512, 128, 0, None, None, "float16")
    assert seen == [] and p.bm == 16

    class Layer:                        # what _gemm reads of a QuantLinear before its checks
        layout = "quick"
        default_kernel = registry.VARIANTS["auto"]

    def stop(*args):
        raise StopIteration
    monkeypatch.setattr(gemm_module, "_as_cupy", lambda x, name: (x, None))
    monkeypatch.setattr(gemm_module, "_check_x", stop)
    with pytest.raises(StopIteration):
        gemm_module._gemm(None, Layer(), "quick", None, None, None)
    assert seen == ["quick"]
    with pytest.raises(StopIteration):
        gemm_module._gemm(None, Layer(), None, None, None, None)     # the layer's default: a record
    assert seen == ["quick"]
    with pytest.raises(ValueError, match="kernel='awq' reads the awq layout but the layer is packed as 'quick'"):
        gemm_module._gemm(None, Layer(), "awq", None, None, None)


def test_plans_take_the_device_limits():
    """The decode rule reads shared memory per SM and per block from the device's limits: an
    A100-sized SM (164 KB) fits fewer ring blocks than an H100's."""
    a100 = kernels.DeviceLimits(sm_count=108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024)
    for M in (2, 8, 16):
        for limits in (kernels.H100, a100):
            p = kernels.plan("quick_decode", M, 8192, 8192, 128, limits)
            assert p.shared_bytes <= limits.smem_per_block
    assert kernels.plan("quick", 64, 8192, 8192, 128, 132) == kernels.plan("quick", 64, 8192, 8192, 128)


def test_attributed_launch_structures_match_cuda_h():
    """CUlaunchAttribute is 72 bytes (an id, padding, a 64-byte union) and CUlaunchConfig 56 on a
    64-bit host; kernel arguments take their C types."""
    import ctypes
    assert ctypes.sizeof(kernels._LaunchAttribute) == 72
    assert ctypes.sizeof(kernels._LaunchConfig) == 56
    assert kernels._LaunchConfig.stream.offset == 32
    assert kernels._kernel_arg(np.int32(-3)).value == -3
    assert kernels._kernel_arg(np.uint64(2**63 + 5)).value == 2**63 + 5
    assert kernels._kernel_arg(np.float32(0.5)).value == 0.5
    record = np.zeros((), kernels._TENSOR_MAP)
    record["opaque"][3] = 7
    raw = kernels._kernel_arg(record)
    assert ctypes.sizeof(raw) == 128 and bytes(raw)[24] == 7
    with pytest.raises(TypeError, match="no C form"):
        kernels._kernel_arg(3)


# ---------------------------------------------------------------------------------------- GPU
def _case(rng, kernel, M, K=4096, N=512, act_order=False):
    """(layer, x, reference) of one captured call; act_order gives the layer a random permutation."""
    import cupy
    from quickcupy import QuantLinear
    q = quantize((rng.standard_normal((N, K)) * 0.02).astype(np.float16), 128)
    perm = rng.permutation(K) if act_order else None
    layer = QuantLinear.from_quantized(q, layout=registry.variant(kernel).layout, perm=perm)
    x_host = rng.standard_normal((M, K)).astype(np.float16)
    ref = reference_gemm(x_host[:, perm] if act_order else x_host, q)
    return layer, cupy.asarray(x_host), ref


CASES = [("quick", 64, 4, False), ("quick_decode", 1, None, False), ("quick_decode", 16, None, False),
         ("quick_sm90", 64, 2, False), ("awq", 64, 4, False), ("auto", 64, None, False),
         ("quick_decode", 1, None, True), ("quick", 64, 4, True)]


def _skip_unsupported(kernel):
    import cupy
    reason = kernels.unsupported_reason(kernel, cupy.cuda.Device().id) if kernel != "auto" else None
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,M,split_k,act_order", CASES)
def test_capture_owns_its_scratch(kernel, M, split_k, act_order, rng):
    """Capture a call (no buffer of its own kept by the caller but x and out), drop every other
    reference, allocate and fill new arrays the size of its scratch, replay: the new arrays keep
    their values and the output is right."""
    import cupy
    _skip_unsupported(kernel)
    layer, x, ref = _case(rng, kernel, M, act_order=act_order)
    if kernel not in ("auto",) and registry.variant(kernel).path == "gemm":
        p = kernels.plan(kernel, M, layer.out_features, layer.in_features, 128,
                         kernels.device_limits(layer.device), split_k=split_k)
        assert (p.grid[1] if p.counters else p.split_k) > 1 or act_order, "the case must use partials"
    out = cupy.empty((M, layer.out_features), np.float16)
    stream = side_stream()
    with stream:
        gemm_module.gemm(x, layer, kernel, out, split_k=split_k)     # compile outside the capture
        stream.synchronize()
        stream.begin_capture()
        gemm_module.gemm(x, layer, kernel, out, split_k=split_k)
        graph = stream.end_capture()
    partial_words = 4 * M * out.shape[1]
    fresh = [cupy.full(n, SENTINEL, np.float32) for n in (partial_words, partial_words, M * 4096)]
    cupy.cuda.Device().synchronize()       # the fills are done before any replay (another stream)
    for _ in range(3):
        with stream:                       # ordered before the replay on the graph's stream
            out.fill(np.nan)
        graph.launch(stream)
        stream.synchronize()
        assert rel_error(out.get(), ref) < TOL
    for a in fresh:
        assert bool((a == SENTINEL).all()), "a replay wrote into memory allocated after the capture"


@pytest.mark.gpu
def test_two_graphs_captured_on_one_stream_replay_concurrently(rng):
    """Two calls captured on one stream (split-K partials and decode counters each) replay at the
    same time on two streams, many times, without sharing scratch."""
    import cupy
    cases = [_case(rng, "quick", 64), _case(rng, "quick_decode", 4, K=4096)]
    kinds = [("quick", 4), ("quick_decode", None)]
    outs = [cupy.empty((x.shape[0], layer.out_features), np.float16) for layer, x, _ in cases]
    stream = side_stream()
    graphs = []
    with stream:
        for (layer, x, _), out, (kernel, split_k) in zip(cases, outs, kinds):
            gemm_module.gemm(x, layer, kernel, out, split_k=split_k)
            stream.synchronize()
            stream.begin_capture()
            gemm_module.gemm(x, layer, kernel, out, split_k=split_k)
            graphs.append(stream.end_capture())
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in graphs]
    for _ in range(20):
        for out in outs:
            out.fill(np.nan)
        cupy.cuda.Device().synchronize()
        for _ in range(5):
            for graph, s in zip(graphs, streams):
                graph.launch(s)
        cupy.cuda.Device().synchronize()
        for (_, _, ref), out in zip(cases, outs):
            assert rel_error(out.get(), ref) < TOL


@pytest.mark.gpu
def test_a_new_stream_with_a_destroyed_streams_handle(rng):
    """CUDA may hand a destroyed stream's handle to a new stream (only once its work is done): the
    workspace keyed on the handle serves the new stream correctly."""
    import cupy
    layer, x, ref = _case(rng, "quick_decode", 4, K=4096)
    old = side_stream()
    handle = old.ptr
    with old:
        y = layer(x, kernel="quick_decode")
        old.synchronize()
    assert rel_error(y.get(), ref) < TOL
    del old, y
    kept = []
    for _ in range(64):
        s = cupy.cuda.Stream(non_blocking=True)
        if s.ptr == handle:
            break
        kept.append(s)
    else:
        pytest.skip("CUDA did not reuse the handle within 64 new streams")
    with s:
        out = cupy.full((4, layer.out_features), np.nan, np.float16)
        layer(x, out=out, kernel="quick_decode")
        s.synchronize()
    assert rel_error(out.get(), ref) < TOL


@pytest.mark.gpu
def test_first_calls_from_many_threads():
    """A fresh process whose first gemm calls come from 8 threads at once (each on its stream, the
    kernels not yet loaded): every result is right."""
    script = textwrap.dedent("""
        import threading, numpy as np, cupy
        from quickcupy import QuantLinear, quantize, reference_gemm, rel_error
        rng = np.random.default_rng(7)
        cases = []
        for i, (kernel, M) in enumerate([("quick", 64), ("quick_decode", 1), ("quick_decode", 9), ("auto", 33),
                                         ("quick_m16", 16), ("awq", 32), ("quick", 5), ("auto", 1)] ):
            q = quantize((rng.standard_normal((256, 1024)) * 0.02).astype(np.float16), 128)
            layer = QuantLinear.from_quantized(q, layout="awq" if kernel == "awq" else "quick")
            x = rng.standard_normal((M, 1024)).astype(np.float16)
            cases.append((kernel, layer, cupy.asarray(x), reference_gemm(x, q)))
        cupy.cuda.Device().synchronize()   # the threads' non-blocking streams do not wait for the uploads
        errors = [None] * len(cases)
        barrier = threading.Barrier(len(cases))
        def run(i):
            kernel, layer, x, ref = cases[i]
            with cupy.cuda.Stream(non_blocking=True) as s:
                barrier.wait()
                y = layer(x, kernel=kernel)
                s.synchronize()
            errors[i] = rel_error(y.get(), ref)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(max(errors))
        assert max(errors) < 1e-2, errors
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def _torch_layer(rng, kernel, M, act_order=False):
    torch = pytest.importorskip("torch")
    layer, x, ref = _case(rng, kernel, M, act_order=act_order)
    return torch, layer, torch.from_dlpack(x), ref


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,M,act_order", [("auto", 1, False), ("auto", 16, False), ("auto", 64, False),
                                                ("quick", 64, False), ("auto", 1, True)])
def test_torch_cuda_graph_as_pytorch_documents_it(kernel, M, act_order, rng):
    """Capture exactly as PyTorch's documentation writes it: warm-up on a side stream, then
    ``with torch.cuda.graph(g):`` on torch's capture stream, no ``stream=`` (gemm launches on
    torch's current stream). Tensors allocated after the capture keep their values through replays."""
    torch, layer, x, ref = _torch_layer(rng, kernel, M, act_order)
    out = torch.empty(M, layer.out_features, dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            layer(x, out=out, kernel=kernel)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        layer(x, out=out, kernel=kernel)
    import cupy
    after = [torch.full((4 * M * layer.out_features,), SENTINEL, device="cuda") for _ in range(2)]
    after.append(cupy.full(4 * M * layer.out_features, SENTINEL, np.float32))
    for _ in range(3):
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_error(out.cpu().numpy(), ref) < TOL
    for a in after:
        assert bool((a == SENTINEL).all()), "a replay wrote into memory allocated after the capture"


def _replays_as_eager(chain, x, expected, monkeypatch):
    """``chain(x, keep)`` (returns its result, appends its intermediates to ``keep``) captured with and
    without programmatic dependent launch: each graph's replays, x reset and the result and every
    intermediate poisoned before each, equal ``expected`` (the eager chain's result, NumPy) bit for bit."""
    import cupy
    for pdl in ("1", "0"):
        monkeypatch.setenv(kernels.PDL_ENV, pdl)
        kernels._pdl_capable.cache_clear()
        stream = side_stream()
        keep = []
        with stream:
            xs = x.copy()
            chain(xs.copy(), [])                 # compiles and fills the workspace outside the capture
            stream.synchronize()
            stream.begin_capture()
            assert kernels.pdl_active(cupy.cuda.Device().id) == (pdl == "1")
            y = chain(xs, keep)
            graph = stream.end_capture()
            for _ in range(3):
                xs[...] = x
                for a in keep + [y]:
                    if a is not xs:
                        a.fill(np.nan)
                graph.launch(stream)
                stream.synchronize()
                assert np.array_equal(y.get().view(np.uint16), expected.view(np.uint16)), (x.shape, pdl)
    kernels._pdl_capable.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_programmatic_launch_chain_in_a_graph(dtype, rng, monkeypatch):
    """A chain of dependent decode GEMMs and Llama ops captured with programmatic dependent launch
    (each kernel starts while the previous one ends, waiting in the kernel for its inputs): replays
    equal the eager chain bit for bit, with every intermediate poisoned before each replay, and
    equal a capture without the attribute."""
    import cupy
    from quickcupy import QuantLinear
    from quickcupy.llama import ops
    if cupy.cuda.Device().compute_capability < "90":
        pytest.skip("programmatic dependent launch needs sm_90")
    dt = np.dtype(dtype) if dtype == "float16" else cupy.dtype("bfloat16")
    H, I = 1024, 2048
    layers = [QuantLinear.from_quantized(quantize((rng.standard_normal(shape) * 0.03).astype(np.float32), 128))
              for shape in ((2 * I, H), (H, I), (H, H))]
    norm = cupy.asarray((1 + 0.1 * rng.standard_normal(H)).astype(np.float32)).astype(dt)

    def chain(x, keep):
        h = ops.add_rms_norm(x, norm, 1e-5)
        g = gemm_module.gemm(h, layers[0], "quick_decode")           # (M, 2I), split-K counters
        a = ops.silu_mul(g)
        d = gemm_module.gemm(a, layers[1], "quick_decode")
        y = gemm_module.gemm(ops.add_rms_norm(x, norm, 1e-5, d), layers[2], "quick_decode")
        keep.extend([h, g, a, d])
        return y

    for M in (1, 5, 16):
        x = cupy.asarray(rng.standard_normal((M, H)).astype(np.float32)).astype(dt)
        eager = chain(x.copy(), []).get()
        _replays_as_eager(chain, x, eager, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_layer_chain_in_a_graph(dtype, rng, monkeypatch):
    """A Llama layer's GEMMs with its RMSNorms and residual adds given to gemm (norm=, residual= in
    place into the residual stream x; quick_decode fuses them at M = 1, the ring the adds alone,
    the rest is composed), captured with and without programmatic dependent launch: replays equal
    the eager chain bit for bit, x reset and every intermediate poisoned before each replay."""
    import cupy
    from quickcupy import QuantLinear
    from quickcupy.llama import ops
    dt = np.dtype(dtype) if dtype == "float16" else cupy.dtype("bfloat16")
    H, I, eps = 1024, 2048, 1e-5
    layers = {name: QuantLinear.from_quantized(quantize((rng.standard_normal(shape) * 0.03).astype(np.float32), 128))
              for name, shape in (("qkv", (3 * H, H)), ("o", (H, 3 * H)), ("gate_up", (2 * I, H)), ("down", (H, I)))}
    w_in, w_post = (cupy.asarray((1 + 0.1 * rng.standard_normal(H)).astype(np.float32)).astype(dt) for _ in range(2))

    def chain(x, keep):
        qkv = gemm_module.gemm(x, layers["qkv"], "quick_decode", norm=(w_in, eps))
        gemm_module.gemm(qkv, layers["o"], "quick_decode", x, residual=x)     # qkv stands for attention's output
        g = gemm_module.gemm(x, layers["gate_up"], "quick_decode", norm=(w_post, eps))
        a = ops.silu_mul(g)
        gemm_module.gemm(a, layers["down"], "quick_decode", x, residual=x)
        keep.extend([qkv, g, a])
        return x

    for M in (1, 5, 16):
        x = cupy.asarray(rng.standard_normal((M, H)).astype(np.float32)).astype(dt)
        eager = x.copy()
        chain(eager, [])
        cupy.cuda.Device().synchronize()                  # x and eager are ready for the side stream
        assert gemm_module.fused(layers["qkv"], M, dtype, "quick_decode", norm=True)[0] == (M == 1)
        _replays_as_eager(chain, x, eager.get(), monkeypatch)

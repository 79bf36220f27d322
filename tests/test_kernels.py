"""quickcupy.kernels (CPU): every CUDA source compiles with NVRTC as at run time, without spills;
launch plans cover K exactly; the shared-memory index maps are the ones the sources use."""
import re

import pytest

from quickcupy import kernels, smem_maps


def _nvrtc_reason():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # no cupy, or no NVRTC library
        return f"NVRTC not loadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if kernels.toolkit_include_dir() is None:
        return "no CUDA toolkit headers (cuda_fp16.h) under $CUDA_PATH or /usr/local/cuda"
    return None


needs_nvrtc = pytest.mark.skipif(_nvrtc_reason() is not None, reason=str(_nvrtc_reason()))


@needs_nvrtc
@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
@pytest.mark.parametrize("source", kernels.SOURCES)
def test_sources_compile_without_spills(source, arch):
    names = [name for src, name in kernels.all_instances() if src == source]
    assert names
    for name in names:
        cubin, lowered, log = kernels.nvrtc_compile(source, arch, [name], ["--ptxas-options=-v"])
        assert len(cubin) > 1000 and lowered[name]
        usage = [line for line in log.splitlines() if "spill" in line or "stack frame" in line]
        assert usage, f"no ptxas report for {name}:\n{log}"
        for line in usage:
            nums = [int(n) for n in re.findall(r"(\d+) bytes", line)]
            assert not any(nums), f"{name} ({arch}) uses local memory: {line.strip()}"


def test_sources_use_only_generated_index_maps():
    """Every *_ROW/*_COL macro the sources call is defined by smem_maps (one source of truth)."""
    defined = set(re.findall(r"#define (\w+)\(", smem_maps.cuda_macros()))
    for source in kernels.SOURCES:
        used = set(re.findall(r"\b([A-Z][A-Z0-9_]*_(?:ROW|COL))\(", (kernels.cuda_dir() / source).read_text()))
        assert used <= defined, used - defined


@pytest.mark.parametrize("kernel", ("awq", "quick"))
@pytest.mark.parametrize("M", (1, 7, 16, 33, 64, 100, 257, 1024, 4096))
@pytest.mark.parametrize("K,N,G", [(8192, 8192, 128), (4096, 11008, 32), (11008, 4096, 64), (96, 64, 32),
                                   (640, 256, 640)])
def test_plans_cover_k_exactly(kernel, M, K, N, G):
    p = kernels.plan(kernel, M, N, K, G)
    chunks = K // 32
    assert p.grid[0] * p.tile.bm >= M and p.grid[1] * p.tile.bn >= N
    assert p.chunks_per_split % p.tile.chunks == 0          # steps never straddle a scale group
    assert (p.split_k - 1) * p.chunks_per_split < chunks <= p.split_k * p.chunks_per_split  # no empty split
    if G < K:
        assert (G // 32) % min(G // 32, p.tile.chunks) == 0


def test_plan_rejects_unknown():
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.plan("int8", 1, 64, 64, 32)
    with pytest.raises(ValueError, match="tile_m=48"):
        kernels.plan("quick", 1, 64, 64, 32, tile_m=48)


def test_require_gpu_message(monkeypatch):
    import quickcupy.device as device
    monkeypatch.setattr(device, "no_gpu_reason", lambda: "no CUDA device found")
    with pytest.raises(RuntimeError, match="quickcupy kernels need a CUDA GPU: no CUDA device found"):
        kernels.require_gpu()

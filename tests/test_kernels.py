"""quickcupy.kernels and quickcupy.registry (CPU): every CUDA source compiles with NVRTC as at run
time, without spills; launch plans cover K exactly for every group size; the generated header is
current; an edit of any header changes what NVRTC is handed (so CuPy's cache cannot serve stale code)."""
import re
import shutil
import subprocess
import sys

import nvrtc_pool
import pytest
from conftest import SELECTED

from quickcupy import kernels, registry, smem_maps


def _nvrtc_reason():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as exc:  # no cupy, or no NVRTC library
        return f"NVRTC not loadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if kernels.toolkit_include_dir() is None:
        return "no CUDA headers (cuda_fp16.h): install quickcupy with its [cuda12] or [cuda13] extra (the nvidia-cuda-runtime wheel) or a toolkit"
    return None


needs_nvrtc = pytest.mark.skipif(_nvrtc_reason() is not None, reason=str(_nvrtc_reason()))


@pytest.fixture(scope="module")
def nvrtc_builds(request):
    """The compile pool (tests/nvrtc_pool.py), handed at once every (source, arch) of this module's
    selected compile tests, so the workers start on all of them."""
    pool = nvrtc_pool.CompilePool(nvrtc_pool.workers())
    asked = [item.callspec.params for item in request.config.stash.get(SELECTED, [])
             if "nvrtc_builds" in getattr(item, "fixturenames", ()) and hasattr(item, "callspec")]
    targets = [(p["source"], nvrtc_pool.target_arch(p["source"], p["arch"])) for p in asked]
    pool.submit([(source, arch) for source, arch in targets if arch])
    yield pool
    pool.close()


@needs_nvrtc
@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
@pytest.mark.parametrize("source", registry.SOURCES)
def test_sources_compile_without_spills(source, arch, nvrtc_builds):
    """Every instance compiles as at run time, and ptxas reports each with no stack or spill bytes."""
    target = nvrtc_pool.target_arch(source, arch)     # e.g. sm_90a (wgmma): built for that target alone
    if target is None:
        pytest.skip(f"{source} builds for {registry.SOURCES[source].arch} only")
    names = registry.SOURCES[source].instances
    assert names
    chunks = nvrtc_builds.result(source, target)
    assert [name for chunk in chunks for name in chunk[0]] == list(names)
    reported, instances = {}, set()
    for chunk, cubin, lowered, log in chunks:
        assert len(cubin) > 1000 and all(lowered[n] for n in chunk)
        found = nvrtc_pool.ptxas_reports(log)
        instances |= {lowered[n] for n in chunk}
        assert {lowered[n] for n in chunk} <= set(found), f"no ptxas report for every instance:\n{log}"
        assert {report[0] for report in found.values()} == {target}
        reported.update(found)
        # Every usage line, of entry and non-inlined device functions alike.
        usage = [line for line in log.splitlines() if "spill" in line or "stack frame" in line]
        for line in usage:
            nums = [int(n) for n in re.findall(r"(\d+) bytes", line)]
            assert not any(nums), f"{source} ({target}) uses local memory: {line.strip()}"
        # wgmma: none serialized (C7513), no wait injected by ptxas where the code has none (C7517)
        assert "C7513" not in log and "C7517" not in log, f"{source} ({target}): ptxas changed the wgmma pipeline:\n{log}"
    # Non-template kernels (extern "C") are built, and reported, in every chunk: counted once.
    assert set(reported) == instances and len(reported) == len(names)


def test_generated_header_is_current():
    """cuda/smem_maps.cuh is what quickcupy/smem_maps.py generates (python -m quickcupy.smem_maps)."""
    assert smem_maps.header_path().read_text() == smem_maps.header_text()


def test_sources_use_only_generated_index_maps_and_constants():
    """Every *_ROW/*_COL macro and *_THREADS constant the sources use is defined in the generated
    header (one source of truth), and no source types a thread count by hand in __launch_bounds__."""
    header = smem_maps.header_text()
    defined = set(re.findall(r"#define (\w+)\(", header)) | set(re.findall(r"constexpr int (\w+) =", header))
    for source in registry.SOURCES:
        text = (kernels.cuda_dir() / source).read_text()
        used = set(re.findall(r"\b([A-Z][A-Z0-9_]*_(?:ROW|COL))\(", text))
        used |= set(re.findall(r"\b([A-Z][A-Z0-9_]*_THREADS)\b", text))
        assert used <= defined, used - defined
        assert not re.search(r"__launch_bounds__\(\s*\d", text), f"{source} types a thread count by hand"


def test_registry_is_the_one_list():
    """The ncu filter names every design; every design's source is a loader source; variants name
    designs; every thread constant of the header comes from the registry."""
    for d in registry.DESIGNS.values():
        assert d.function in registry.NCU_KERNEL_REGEX
        assert d.source in registry.SOURCES and (kernels.cuda_dir() / d.source).is_file()
        constant = f"{d.name.upper()}_THREADS"
        if d.thread_constants():
            assert smem_maps.constants()[constant] == d.threads
        else:                                    # decode shapes and quick_sm90's tiles: template parameters
            assert constant not in smem_maps.constants()
            assert not isinstance(d, registry.GemmDesign) or all(t.threads for t in d.tiles.values())
    for v in registry.VARIANTS.values():
        assert v.design is registry.DESIGNS[v.design.name]


@pytest.mark.parametrize("kernel", ("awq", "quick"))
@pytest.mark.parametrize("M", (1, 7, 16, 33, 64, 100, 257, 1024, 4096))
@pytest.mark.parametrize("K,N,G", [(8192, 8192, 128), (4096, 11008, 32), (11008, 4096, 64), (96, 64, 32),
                                   (640, 256, 640), (4608, 1024, 96), (4608, 1024, 192), (4096, 512, 256),
                                   (4096, 512, 512), (2304, 256, 2304)])
def test_plans_cover_k_exactly(kernel, M, K, N, G):
    p = kernels.plan(kernel, M, N, K, G)
    chunks = K // 32
    assert p.grid[0] * p.bm >= M and p.grid[1] * p.bn >= N
    assert p.chunks_per_split % p.tile.chunks == 0          # steps never straddle a split
    assert (p.split_k - 1) * p.chunks_per_split < chunks <= p.split_k * p.chunks_per_split  # no empty split
    gch = int(re.findall(r"\d+", p.name)[2]) if kernel == "quick" else 1
    # Scales are reloaded every gch chunks from a step's start: group edges must fall on reloads.
    assert p.tile.chunks % gch == 0 and (G // 32) % gch == 0
    assert p.name in registry.SOURCES[p.source].instances     # an instance CI compiles


@pytest.mark.parametrize("K,N,G,M", [(8192, 8192, 128, 4096), (4608, 1056, 96, 200), (4096, 512, 32, 64),
                                     (2336, 256, 2336, 100), (4608, 256, 192, 300), (640, 288, 640, 1),
                                     (4096, 4096, 64, 1024), (2336, 160, 2336, 129)])
def test_sm90_tensor_maps_cover_the_packed_tensors(K, N, G, M, monkeypatch):
    """gemm_tensor_maps (the driver's encode stubbed): qweight, scales and qzeros as (N / 32) rows
    spanning exactly the packed arrays' bytes, and the four boxes of a K step bringing the bytes
    quick_sm90's full barrier waits for: bm x 128 of x, bn x 32 bytes of weights, bn / 32 x 80 per
    group the instance's GCH makes it read (cuda/quick_sm90.cu: SLOT_TX, with TCOLS = bn / 32 tile
    columns: 8, or 4 with 256-token tiles; 2 groups where group_size / 32 is odd, as 96 and 2336 = 73
    chunks). Boxes short of that leave the barrier waiting forever."""
    import numpy as np

    from quickcupy.layouts import pack_quick
    from quickcupy.quantize import quantize
    calls = []
    monkeypatch.setattr(kernels, "_tensor_map_2d", lambda *a: calls.append(a) or a)
    p = kernels.plan("quick_sm90", M, N, K, G)
    packed = pack_quick(quantize(np.random.default_rng(0).standard_normal((N, K)).astype(np.float32), G))
    fake = lambda a: type("A", (), {"data": type("D", (), {"ptr": 0}), "dtype": a.dtype})  # noqa: E731
    x = np.zeros((1,), np.float16)
    kernels.gemm_tensor_maps(p, fake(x), fake(packed.qweight), fake(packed.qzeros), fake(packed.scales))
    (_, _, xk, xm, _, xbc, xbr, _, _), *packs = calls
    assert (xk, xm, xbc, xbr) == (K, M, 64, p.bm)
    gch = int(re.findall(r"\d+", p.name.split("<")[1])[4])   # quick_sm90<bm, bn, threads, stages, gch, T>
    box_bytes = 0
    for (_, dtype, cols, rows, row_bytes, bc, br, _, what), arr in zip(
            packs, (packed.qweight, packed.scales, packed.qzeros)):
        assert dtype == "uint64" and rows == N // 32 and br == p.bn // 32, what
        assert cols * 8 == row_bytes and rows * row_bytes == arr.nbytes, what
        box_bytes += bc * br * 8
    assert kernels.sm90_step_groups(p) == 2 // gch == (2 if (G // 32) % 2 else 1)
    assert box_bytes == 32 * p.bn + p.bn // 32 * 80 * (2 // gch)
    assert p.bn == (128 if p.bm == 256 else 256) and p.shared_bytes == p.tile.stages * (
        p.bm * 128 + 32 * p.bn + 2048 + 16) + 1024   # SLOT plus 2 mbarriers a stage, 1 KB alignment


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
@pytest.mark.parametrize("M", (1, 3, 8, 9, 16))
@pytest.mark.parametrize("K,N,G", [(4096, 12288, 128), (4096, 4096, 64), (4096, 22016, 32), (11008, 4096, 128),
                                   (640, 256, 640), (8192, 28672, 128)])
def test_fused_decode_plans(K, N, G, M, dtype):
    """The fused plans of quick_decode keep the plain launch (grid, split, block shape) and name an
    instance CI compiles: the RMSNorm and SiLU * up prologues on the register pipeline only (the
    latter where its up slice keeps the blocks the grid needs on the SMs: always at M = 1), the
    residual epilogue on every shape, never both (asked for both, the prologue wins); other designs
    fuse nothing."""
    plain = kernels.plan("quick_decode", M, N, K, G, dtype=dtype)
    register = plain.shape.stages == 0
    silu = registry.PRO_SILU_MUL
    for pro, epi in ((True, False), (False, True), (True, True), (silu, False), (silu, True)):
        p = kernels.plan("quick_decode", M, N, K, G, dtype=dtype, prologue=pro, epilogue=epi)
        assert (p.grid, p.chunks_per_split, p.shape, p.block) == (plain.grid, plain.chunks_per_split, plain.shape,
                                                                    plain.block)
        if pro == silu and register and not p.prologue:    # the up slice would cost blocks per SM
            assert M > 1
            per_sm = kernels._decode_per_sm(plain.shape, kernels._decode_smem(plain.shape, M, plain.chunks_per_split,
                                                                               silu), kernels.H100)
            assert per_sm < kernels._decode_per_sm(plain.shape, plain.shared_bytes, kernels.H100)
        else:
            assert p.prologue == (pro if register else 0)
        assert p.epilogue == (epi and not p.prologue)
        assert p.name in registry.SOURCES["quick_decode.cu"].instances
        assert (p.name == plain.name) == (not p.prologue and not p.epilogue)
        assert p.shared_bytes == kernels._decode_smem(p.shape, M, p.chunks_per_split, p.prologue) <= \
            kernels.H100.smem_per_block
        if p.prologue == registry.PRO_NORM:   # norm_w's slice and the warps' row sums on top of the plain launch's
            assert p.shared_bytes == plain.shared_bytes + (32 * p.chunks_per_split + 8) * 2 + 32 * p.shape.nwarps \
                or plain.shape.kw > 1
        if p.prologue == silu:                # up's slice: M more rows
            assert p.shared_bytes == plain.shared_bytes + M * (32 * p.chunks_per_split + 8) * 2 or plain.shape.kw > 1
            assert p.name.endswith(f", {silu}, 0>")
    for kernel in ("quick", "awq"):
        if M <= 16:
            p = kernels.plan(kernel, M, N, K, G, dtype=dtype, prologue=True, epilogue=True)
            assert not (p.prologue or p.epilogue) and p == kernels.plan(kernel, M, N, K, G, dtype=dtype)


def test_fused_decode_plan_falls_back_where_shared_memory_ends():
    """A prologue that would not fit the device's shared memory per block is left to the caller
    (the epilogue, which needs none, is still fused when asked for)."""
    import dataclasses
    plain = kernels.plan("quick_decode", 1, 4096, 8192, 128, split_k=1)
    assert plain.shape.stages == 0
    tight = dataclasses.replace(kernels.H100, smem_per_block=plain.shared_bytes)
    assert kernels._fuse_decode(plain, True, False, tight, "float16") is plain
    both = kernels._fuse_decode(plain, True, True, tight, "float16")
    assert (both.prologue, both.epilogue, both.shared_bytes) == (False, True, plain.shared_bytes)


def test_plan_rejects_unknown_and_bad_groups():
    with pytest.raises(ValueError, match="kernel='int8' is unknown"):
        kernels.plan("int8", 1, 64, 64, 32)
    with pytest.raises(ValueError, match="tile_m=48"):
        kernels.plan("quick", 1, 64, 64, 32, tile_m=48)
    with pytest.raises(ValueError, match="group_size=48 must be a multiple of 32"):
        kernels.plan("quick", 1, 64, 4608, 48)


def test_require_gpu_message(monkeypatch):
    import quickcupy.device as device
    monkeypatch.setattr(device, "no_gpu_reason", lambda: "no CUDA device found")
    with pytest.raises(RuntimeError, match="quickcupy kernels need a CUDA GPU: no CUDA device found"):
        kernels.require_gpu()


def test_a_header_edit_changes_the_compiled_text(tmp_path):
    """CuPy's disk cache keys on the text handed to NVRTC: editing only a header must change it, in
    a fresh process (what a user upgrading quickcupy, or a developer, runs next)."""
    folder = tmp_path / "cuda"
    shutil.copytree(kernels.cuda_dir(), folder)
    probe = ("import os, sys; from quickcupy import kernels; "
             "print(kernels.source_code('spin.cu').splitlines()[0])")
    env = {"QUICKCUPY_CUDA_DIR": str(folder), "PATH": "", "PYTHONPATH": str(kernels.cuda_dir().parent)}

    def first_line():
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
    before = first_line()
    assert before == f"// quickcupy cuda/ sha256 {kernels.sources_digest(folder)}"
    header = folder / "quant_common.cuh"
    header.write_text(header.read_text() + "\n#define QUICKCUPY_PROBE 2\n")
    after = first_line()
    assert after != before and after.endswith(kernels.sources_digest(folder))


@needs_nvrtc
def test_a_header_edit_reaches_the_binary(tmp_path, monkeypatch):
    """The compiled code follows the header: a constant defined only in a header shows in the PTX."""
    folder = tmp_path / "cuda"
    shutil.copytree(kernels.cuda_dir(), folder)
    (folder / "probe.cu").write_text('#include "probe.cuh"\nextern "C" __global__ void probe(int* o) { *o = PROBE; }\n')
    monkeypatch.setenv("QUICKCUPY_CUDA_DIR", str(folder))
    cubins = []
    for value in (1234567, 7654321):
        (folder / "probe.cuh").write_text(f"#define PROBE {value}\n")
        cubin, _, _ = kernels.nvrtc_compile("probe.cu", "sm_80", ["probe"])
        cubins.append(cubin)
        assert value.to_bytes(4, "little") in cubin
    assert cubins[0] != cubins[1]


@pytest.mark.gpu
def test_a_header_edit_runs_the_new_code_in_a_fresh_process(tmp_path):
    """The case measured on an H100 before the fix: a kernel including a header with VAL 1, the
    header changed to VAL 2, and a fresh process sharing CuPy's cache still printed 1."""
    import os
    folder = tmp_path / "cuda"
    shutil.copytree(kernels.cuda_dir(), folder)
    (folder / "probe.cu").write_text('#include "probe.cuh"\nextern "C" __global__ void probe(int* o) { *o = PROBE; }\n')
    script = ("import cupy; from quickcupy import kernels; o = cupy.zeros(1, cupy.int32); "
              "kernels.get_function(cupy.cuda.Device().id, 'probe.cu', 'probe')((1,), (1,), (o,)); print(int(o[0]))")
    env = dict(os.environ, QUICKCUPY_CUDA_DIR=str(folder), CUPY_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, (str(kernels.cuda_dir().parent), os.environ.get("PYTHONPATH")))))
    seen = []
    for value in (1, 2):
        (folder / "probe.cuh").write_text(f"#define PROBE {value}\n")
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        seen.append(int(out.stdout.strip()))
    assert seen == [1, 2]

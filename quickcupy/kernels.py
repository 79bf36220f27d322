"""Kernel loader, launch plans and the launcher of the GEMM designs.

A *plan* (pure Python, no GPU) says which template instance of which design runs with which grid
and split-K for a GEMM shape; the bank-conflict model and the tests use it too. The loader compiles
each instance once per device with NVRTC through ``cupy.RawModule``; CuPy's on-disk cache keeps the
binary between processes. That cache keys on the text handed to NVRTC, not on the headers it
includes, so :func:`source_code` starts every source with a digest of all files in ``cuda/``: an
edit of any header changes the text and recompiles.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import device, registry
from .dtypes import ctype, np_dtype
from .registry import DecodeDesign, DecodeShape, Design, GemmDesign, Tile

MIN_COMPUTE_CAPABILITY = (8, 0)   # mma.sync m16n8k16, ldmatrix, cp.async
CUDA_DIR_ENV = "QUICKCUPY_CUDA_DIR"   # development: compile the kernels from another cuda/ folder


def cuda_dir() -> Path:
    """Folder of the CUDA sources: $QUICKCUPY_CUDA_DIR if set, else quickcupy/cuda when installed,
    ../cuda in a checkout."""
    if os.environ.get(CUDA_DIR_ENV):
        return Path(os.environ[CUDA_DIR_ENV])
    here = Path(__file__).resolve().parent
    for cand in (here / "cuda", here.parent / "cuda"):
        if (cand / "quant_common.cuh").is_file():
            return cand
    raise FileNotFoundError(f"CUDA sources not found next to {here} (looked in cuda/ and ../cuda/)")


def sources_digest(folder: Path | None = None) -> str:
    """sha256 over the names and contents of every .cu/.cuh file in ``folder`` (default cuda_dir())."""
    folder = cuda_dir() if folder is None else Path(folder)
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.cu*")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


LINEINFO_ENV = "QUICKCUPY_LINEINFO"   # "1": compile with -lineinfo (ncu's per-source-line counters)


def lineinfo() -> bool:
    """True when $QUICKCUPY_LINEINFO is "1": kernels carry line tables (``-lineinfo``)."""
    return os.environ.get(LINEINFO_ENV, "") == "1"


def source_code(filename: str) -> str:
    """A kernel source as compiled: a digest line of every file it may include, then the file.

    With :func:`lineinfo`, a ``#line 1 "<path of the file>"`` directive follows the digest, so the
    line tables name the file in cuda/ and its own line numbers (not NVRTC's unnamed program, one off).
    """
    folder = cuda_dir()
    head = f"// quickcupy cuda/ sha256 {sources_digest(folder)}\n"
    if lineinfo():
        head += f'#line 1 "{(folder / filename).resolve()}"\n'
    return head + (folder / filename).read_text()


def compile_options(arch: str) -> tuple:
    """NVRTC options used at run time (and by the CPU compile test), ``arch`` like "sm_90";
    ``-lineinfo`` added with :func:`lineinfo` (CuPy's cache keys on the options, so both builds coexist)."""
    return ("-std=c++17", f"-arch={arch}", f"-I{cuda_dir()}") + (("-lineinfo",) if lineinfo() else ())


# --------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class LaunchPlan:
    design: Design
    name: str                    # template instance, e.g. "quick_gemm<16, 4, 4, 2, 2, half>"
    bm: int                      # rows of C per block
    bn: int                      # columns of C per block
    tile: Tile
    grid: tuple                  # (M tiles, N tiles, K splits)
    shared_bytes: int            # dynamic shared memory
    chunks_per_split: int        # 32-deep K chunks per split
    M: int
    N: int
    K: int
    group_size: int
    threads: int = 0             # threads per block (0: the design's)
    counters: bool = False       # the kernel reduces split-K itself and needs arrival counters
    shape: DecodeShape | None = None   # planner "decode": the block shape chosen
    prologue: int = 0            # the instance's prologue (registry.PRO_NORM: launch's norm=; PRO_SILU_MUL: x is gate | up)
    epilogue: bool = False       # the instance adds the residual itself (residual epilogue; launch's residual=)

    @property
    def kernel(self) -> str:
        return self.design.name

    @property
    def source(self) -> str:
        return self.design.source

    @property
    def block(self) -> tuple:
        return (self.threads or self.design.threads, 1, 1)

    @property
    def split_k(self) -> int:
        return self.grid[2]


def _split_k(tiles: int, chunks: int, step_chunks: int, target_blocks: int, split_k=None, rule="nearest"):
    """Splits K so that tiles * splits comes nearest ``target_blocks`` (one wave; with rule "fill",
    the most splits that stay within it); each split gets at least two main-loop steps and a whole
    number of steps (a step never straddles a group)."""
    if split_k is None:
        want = max(1, round(target_blocks / tiles) if rule == "nearest" else target_blocks // tiles)
        split_k = max(1, min(want, chunks // (2 * step_chunks)))
    split_k = max(1, min(int(split_k), math.ceil(chunks / step_chunks)))
    per = math.ceil(math.ceil(chunks / split_k) / step_chunks) * step_chunks
    return math.ceil(chunks / per), per


@dataclass(frozen=True)
class DeviceLimits:
    """What a launch plan needs to know of a GPU (read off the device by :func:`device_limits`)."""
    sm_count: int
    smem_per_sm: int             # shared memory per SM (bytes)
    smem_per_block: int          # the most one block may ask for (opt-in limit)
    smem_reserved: int = 1024    # reserved per block by the system


# Plans made without a GPU (the bank model, CPU tests, tools on a CPU) assume an H100 SXM.
H100 = DeviceLimits(sm_count=132, smem_per_sm=228 * 1024, smem_per_block=227 * 1024)


def plan(kernel, M: int, N: int, K: int, group_size: int, device: DeviceLimits | int = H100,
         tile_m=None, split_k=None, tile: Tile | None = None, dtype: str = "float16",
         prologue: int = 0, epilogue: bool = False) -> LaunchPlan:
    """Launch plan of ``kernel`` (a :mod:`quickcupy.registry` Variant or Design record, or its
    name) for x (M, K) times weight (K, N) with ``group_size`` (the effective size: K for one group
    per row), ``dtype`` ("float16" or "bfloat16") the activations' (the instance's template type),
    on a GPU of ``device`` limits (an int: an H100's with that many SMs).

    ``tile_m``/``split_k`` override the choice by M; ``tile`` overrides the design's Tile (tuning).
    Scales and zeros are reloaded every gcd(group_size / 32, chunks) chunks, so every group size
    that is a multiple of 32 works with every tile.

    ``prologue`` (0, registry.PRO_NORM or PRO_SILU_MUL) / ``epilogue`` ask for the RMSNorm or
    SiLU * up prologue / the residual epilogue in the kernel: the plan takes what its instance has
    (:func:`_fuse_decode`; LaunchPlan.prologue/epilogue say what), with the grid and split of the
    plain launch; the caller composes the rest (:func:`quickcupy.gemm`). The plan's M, N, K are
    the GEMM's (with PRO_SILU_MUL, x's rows are 2K long)."""
    if isinstance(device, int):
        device = dataclasses.replace(H100, sm_count=device)
    design = registry.design_of(kernel)
    fixed = kernel if isinstance(kernel, registry.Variant) else registry.VARIANTS.get(kernel) \
        if isinstance(kernel, str) else None
    if tile_m is None and fixed is not None:
        tile_m = fixed.tile_m
    design.check_m(M)
    design.check_dtype(dtype)
    if isinstance(design, DecodeDesign):
        if tile_m is not None or tile is not None:
            raise ValueError(f"tile_m/tile do not apply to {design.name} (it picks its block shape by M)")
        p = _plan_decode(design, M, N, K, group_size, device, split_k, dtype)
        return _fuse_decode(p, prologue, epilogue, device, dtype) if prologue or epilogue else p
    return _plan_gemm(design, M, N, K, group_size, device, tile_m, split_k, tile, dtype)


def _plan_gemm(design: GemmDesign, M, N, K, group_size, device: DeviceLimits, tile_m, split_k, tile, dtype):
    bm = design.tile_m(M) if tile_m is None else tile_m
    if bm not in design.tiles:
        raise ValueError(f"tile_m={bm} is not available for {design.name} {tuple(design.tiles)}")
    if group_size % 32 or K % group_size:
        raise ValueError(f"group_size={group_size} must be a multiple of 32 dividing K={K}")
    t = design.tiles[bm] if tile is None else tile
    # the instance for bm may fix its columns (a tuning Tile override cannot change them)
    bn = design.tiles[bm].bn or next((b for b in design.tile_n if N % b == 0), design.tile_n[-1])
    gch = math.gcd(group_size // 32, t.chunks)
    chunks = K // 32
    tiles = math.ceil(M / bm) * math.ceil(N / bn)
    splits, per = _split_k(tiles, chunks, t.chunks, t.blocks_per_sm * device.sm_count, split_k, design.split_rule)
    return LaunchPlan(design=design, name=design.instance(bm, bn, gch, tile, dtype), bm=bm, bn=bn, tile=t,
                      grid=(math.ceil(M / bm), math.ceil(N / bn), splits),
                      shared_bytes=design.smem_bytes(bm, bn, t), chunks_per_split=per,
                      M=M, N=N, K=K, group_size=group_size, threads=t.threads)


# Decode planner (cuda/quick_decode.cu). Fitted on H100 sweeps of every block shape of the registry
# and split at the seven Llama bench shapes, M = 1..16 (results/h100/bench_decode_sweep.json, two runs):
# the ring rule below picks, where it applies, a launch within 1.2 % of the best measured ring launch
# on average (7 % at worst: 11008x4096, M = 4 and 8); the register rule is the first decode design's
# (within 6 %, 0.7 % on average, of its own sweep). Shared memory per SM and per block come from
# the device (DeviceLimits).
DECODE_SLOT_BYTES = 592           # per chunk of a warp's ring slot: sizeof(DecodeSlot<U>) / U (512 + 64 + 16)
# register pipeline (shapes with stages 0): M <= 8 ...
SPLIT_PENALTY = 0.2               # score lost by a split-K across blocks (partials, arrival, reduction)
A_PENALTY = 0.25                  # score lost per M / (8 tile columns per block): activation re-reads
BLOCK_OVERHEAD_CHUNKS = 16        # a block's start (first DRAM latency, activations) in chunks
# ... where the ring is not faster: M < RING_MIN_M, or layers of at least WIDE_TILES x SMs tile
# columns up to M = 8 (many narrow blocks with small activation slices already fill the GPU there).
# M = 2 moved to the ring after its per-round copy arithmetic was cut (commit 88a2c6a, A/B on the
# H100, results/h100/decode_ring_m2_ab.txt): faster on 8192x8192, 4096x12288 and 4096x4096 (18.4 vs
# 18.9, 15.9 vs 17.1, 9.2 vs 10.4 us), within 1% on 28672x8192 and 11008x4096; at M = 1 the
# register pipeline stays faster on 6 of the 7 shapes.
RING_MIN_M = 2
WIDE_TILES = 4
# shared ring: score = min(RING_WARPS, warps per SM) / RING_WARPS - RING_SPLIT x split-K reduction
#                      round trips - RING_SHARED [two blocks on an SM] - RING_ROUNDS / rounds per
#                      warp - RING_WAVE (waves - 1) + RING_SMS x fraction of SMs with a block
RING_WARPS = 12
RING_SPLIT = 0.01
RING_SHARED = 0.05
RING_ROUNDS = 2.0
RING_WAVE = 0.5
RING_SMS = 0.001                  # ties: the launch that keeps more SMs busy


def _decode_smem(sh: DecodeShape, M: int, cps: int, prologue: int = 0) -> int:
    """Dynamic shared memory of a launch with ``cps`` chunks per split: the warps' ring slots, then the
    activations (the whole slice, M rows of 32 cps + 8 halfs, for the register pipeline; a ring of S
    slots of M rows x one round, 32 KW U + 8 halfs, otherwise) and 16 zero bytes (then, with the
    RMSNorm ``prologue``, the norm weight's slice, one more such row, and 8 fp32 row sums per warp;
    with the SiLU * up one, up's slice, M more rows); or, with KW > 1, the fp32 sums of the upper
    warps of each tile column, whichever is larger."""
    if sh.stages == 0:
        acts = M * (32 * cps + 8) * 2
    else:
        acts = sh.nwarps * sh.stages * sh.chunks * DECODE_SLOT_BYTES + sh.stages * M * (32 * sh.round_chunks + 8) * 2
    if prologue == registry.PRO_NORM:
        acts += (32 * cps + 8) * 2 + 8 * 4 * sh.nwarps
    elif prologue == registry.PRO_SILU_MUL:
        acts += M * (32 * cps + 8) * 2
    return max(acts + 16, (sh.kw - 1) * sh.columns * sh.mb * 1024)


def _decode_fit(sh: DecodeShape, M: int, K: int, tiles_n: int, device: DeviceLimits, splits: int):
    """(splits, chunks per split, blocks per SM, waves) for a requested split count."""
    sm_count = device.sm_count
    step = sh.round_chunks                       # each warp of a column gets whole batches
    chunks = K // 32
    cps = -(-(-(-chunks // splits)) // step) * step
    splits = -(-chunks // cps)
    per_sm = _decode_per_sm(sh, _decode_smem(sh, M, cps), device)
    blocks = -(-tiles_n // sh.columns) * splits
    return splits, cps, per_sm, (-(-blocks // (per_sm * sm_count)) if per_sm else 10 ** 9)


def _decode_per_sm(sh: DecodeShape, smem: int, device: DeviceLimits) -> int:
    """Blocks of shape ``sh`` with ``smem`` bytes of dynamic shared memory that fit one SM (0: none)."""
    regs = 65536 // (sh.minb * sh.nwarps * 32)   # what __launch_bounds__ allows
    return 0 if smem > device.smem_per_block else min(65536 // (regs * 32 * sh.nwarps), 64 // sh.nwarps,
                                                      device.smem_per_sm // (smem + device.smem_reserved))


def _decode_ring_score(sh: DecodeShape, fit, M: int, tiles_n: int, sm_count: int) -> float:
    splits, cps, per_sm, waves = fit
    blocks = -(-tiles_n // sh.columns) * splits
    resident = min(blocks, per_sm * sm_count)
    reduce_trips = -(-splits // 4) * -(-M // 8) if splits > 1 else 0   # splitk_reduce_strip32<4> round trips
    return (min(RING_WARPS, resident * sh.nwarps / sm_count) / RING_WARPS - RING_SPLIT * reduce_trips
            - RING_SHARED * (resident > sm_count) - RING_ROUNDS * sh.round_chunks / cps - RING_WAVE * (waves - 1)
            + RING_SMS * min(resident, sm_count) / sm_count)


def _plan_decode(design: DecodeDesign, M: int, N: int, K: int, group_size: int, device: DeviceLimits,
                 split_k=None, dtype: str = "float16", ring=None):
    """The decode launch rule. The register pipeline for M < RING_MIN_M and for wide layers up to
    M = 8: of its shapes, each with the largest split that keeps the grid to one wave, the best of
        score = warps used / (16 SMs) - SPLIT_PENALTY [splits > 1] - A_PENALTY M / (8 tile columns).
    Otherwise the ring shapes of 8-row (M <= 8) or 16-row tiles, each with the splits that give one
    block per SM or fill one wave (and half of it), scored by _decode_ring_score. ``ring`` True or
    False overrides the choice of pipeline (experiments; M > 8 always runs the ring)."""
    sm_count = device.sm_count
    tiles_n, chunks = N // 32, K // 32
    mb = 1 if M <= 8 else 2
    register = mb == 1 and (M < RING_MIN_M or tiles_n >= WIDE_TILES * sm_count)
    if ring is not None:
        register = mb == 1 and not ring
    candidates = [sh for sh in design.shapes if sh.mb == mb and (sh.stages == 0) == register]

    def best_split(sh):
        fits = [_decode_fit(sh, M, K, tiles_n, device, s) for s in range(1, -(-chunks // sh.chunks) + 1)]
        one_wave = [f for f in fits if f[3] <= 1]
        if one_wave:
            return max(one_wave, key=lambda f: f[0])
        return min((f for f in fits if f[2]), key=lambda f: f[3] * (f[1] // sh.kw + BLOCK_OVERHEAD_CHUNKS))

    if split_k is not None:
        sh = candidates[0]
        fit = _decode_fit(sh, M, K, tiles_n, device, int(split_k))
    elif register:
        scored = []
        for sh in candidates:
            f = best_split(sh)
            if f[3] <= 1:
                warps = -(-tiles_n // sh.columns) * f[0] * sh.nwarps
                score = (warps / (16 * sm_count) - SPLIT_PENALTY * (f[0] > 1)
                         - A_PENALTY * M / (8 * sh.columns))
                scored.append((score, sh, f))
        sh, fit = ((candidates[0], best_split(candidates[0])) if not scored else
                   max(scored, key=lambda x: x[0])[1:])
    else:
        best = None
        for sh in candidates:
            cols = -(-tiles_n // sh.columns)
            per_sm = _decode_fit(sh, M, K, tiles_n, device, 1)[2]
            if not per_sm:
                continue
            wanted = {per_sm * sm_count // cols, round(sm_count / cols), sm_count // cols,
                      round(per_sm * sm_count / cols / 2)}
            for s in sorted(max(1, w) for w in wanted):
                f = _decode_fit(sh, M, K, tiles_n, device, s)
                score = _decode_ring_score(sh, f, M, tiles_n, sm_count) if f[2] else -1e9
                if best is None or score > best[0]:
                    best = (score, sh, f)
        _, sh, fit = best
    splits, cps, _, _ = fit
    while _decode_smem(sh, M, cps) > device.smem_per_block:       # a long K slice of many rows
        splits, cps, _, _ = _decode_fit(sh, M, K, tiles_n, device, splits + 1)
    return LaunchPlan(design=design, name=sh.instance(math.gcd(group_size // 32, sh.chunks), dtype), bm=8 * sh.mb,
                      bn=32 * sh.columns, tile=Tile(chunks=sh.chunks), grid=(-(-tiles_n // sh.columns), splits, 1),
                      shared_bytes=_decode_smem(sh, M, cps), chunks_per_split=cps, M=M, N=N, K=K,
                      group_size=group_size, threads=32 * sh.nwarps, counters=True, shape=sh)


def _fuse_decode(p: LaunchPlan, prologue: int, epilogue: bool, device: DeviceLimits, dtype: str) -> LaunchPlan:
    """Decode plan ``p`` (plain) with the fused instance that does the most of what is asked: both,
    else the prologue, else the epilogue, among the design's instances for the shape
    (DecodeDesign.fusions) whose shared memory fits the device without fewer blocks per SM than the
    grid needs in the plain launch's waves; ``p`` itself when none does. The
    grid and split stay, so the epilogue's result is the plain GEMM's then add_rms_norm's add, bit
    for bit."""
    sh = p.shape
    have = p.design.fusions(sh)
    blocks = p.grid[0] * p.grid[1]

    def waves(per_sm):
        return -(-blocks // (per_sm * device.sm_count)) if per_sm else 10 ** 9

    for pro, epi in ((prologue, epilogue), (prologue, False), (0, epilogue)):
        if (pro or epi) and (pro, epi) in have:
            smem = _decode_smem(sh, p.M, p.chunks_per_split, pro)
            if waves(_decode_per_sm(sh, smem, device)) <= waves(_decode_per_sm(sh, p.shared_bytes, device)):
                return dataclasses.replace(p, name=sh.instance(math.gcd(p.group_size // 32, sh.chunks), dtype,
                                                               pro, epi),
                                           shared_bytes=smem, prologue=pro, epilogue=epi)
    return p


def all_instances():
    """Every (source, template instance) the loader may compile: what the CPU compile test builds."""
    return [(s.filename, name) for s in registry.SOURCES.values() for name in s.instances]


def toolkit_include_dir():
    """A CUDA include folder holding cuda_fp16.h, for compiling without CuPy's run-time set-up (the
    CPU compile tests): found as CuPy finds it, through cuda.pathfinder (pip's nvidia-cuda-runtime
    wheel, conda, $CUDA_PATH/$CUDA_HOME), else /usr/local/cuda; None when there is none."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory
        found = find_nvidia_header_directory("cudart")
    except Exception:                     # cuda-pathfinder missing (older CuPy) or nothing found
        found = None
    candidates = [found] + [os.path.join(r, "include") for r in (os.environ.get("CUDA_PATH"),
                                                                 os.environ.get("CUDA_HOME"), "/usr/local/cuda") if r]
    for folder in candidates:
        if folder and (Path(folder) / "cuda_fp16.h").is_file():
            return Path(folder)
    return None


def nvrtc_compile(source: str, arch: str, names, extra_options=()):
    """Compiles a source with NVRTC (no GPU needed) exactly as the loader does.

    Returns (cubin bytes, {name: lowered name}, compiler log). Raises RuntimeError with the log.
    """
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(source_code(source), source, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        include = toolkit_include_dir()
        options = list(compile_options(arch)) + ([f"-I{include}"] if include else []) + list(extra_options)
        try:
            nvrtc.compileProgram(prog, options)
        except Exception as exc:
            raise RuntimeError(f"NVRTC failed on {source} for {arch}:\n{nvrtc.getProgramLog(prog)}") from exc
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
        return nvrtc.getCUBIN(prog), lowered, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


# -------------------------------------------------------------------------------------- loader
def require_gpu():
    """The current CuPy device, checked to be sm_80 or newer; clear RuntimeError otherwise."""
    reason = device.no_gpu_reason()
    if reason is not None:
        raise RuntimeError(f"quickcupy kernels need a CUDA GPU: {reason}")
    import cupy
    dev = cupy.cuda.Device()
    cc = tuple(int(c) for c in dev.compute_capability)
    if cc < MIN_COMPUTE_CAPABILITY:
        raise RuntimeError(f"quickcupy kernels need compute capability 8.0 or newer (Ampere, Hopper); "
                           f"device {dev.id} is {cc[0]}.{cc[1]}")
    return dev


@functools.lru_cache(maxsize=None)
def device_arch(device_id: int) -> str:
    """NVRTC target of a device, e.g. "sm_90"."""
    import cupy
    return "sm_" + "".join(str(c) for c in cupy.cuda.Device(device_id).compute_capability)


@functools.lru_cache(maxsize=None)
def unsupported_reason(kernel, device_id: int):
    """Why gemm kernel ``kernel`` (a name or a registry record) cannot run on CUDA device
    ``device_id`` (a design built for one architecture only, e.g. wgmma's sm_90a), or None when it can."""
    design = registry.design_of(kernel)
    if design.arch is None:
        return None
    have = device_arch(device_id)
    if have != design.arch.rstrip("a"):
        name = kernel if isinstance(kernel, str) else kernel.name
        return f"kernel={name!r} is built for {design.arch} only (Hopper wgmma); device {device_id} is {have}"
    return None


@functools.lru_cache(maxsize=None)
def _module(device_id: int, arch: str, source: str, name: str, code_digest: str):
    import cupy
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=source_code(source), options=compile_options(arch),
                              name_expressions=[name] if "<" in name else None)


def get_function(device_id: int, source: str, name: str, shared_bytes: int = 0):
    """The compiled kernel ``name`` of ``source`` for device ``device_id`` (compiled on first use),
    allowed ``shared_bytes`` of dynamic shared memory. The limit is a property of the kernel, shared by
    every launch, so it only ever rises: to the device's maximum the first time more than 48 KB is asked."""
    fn = _get_function(device_id, source, name, _digest_once())
    if shared_bytes > 48 * 1024 and (device_id, source, name) not in _RAISED:
        import cupy
        with cupy.cuda.Device(device_id):
            optin = cupy.cuda.runtime.getDeviceProperties(device_id)["sharedMemPerBlockOptin"]
            if shared_bytes > optin:
                raise ValueError(f"{name} needs {shared_bytes} bytes of shared memory, the device allows {optin}")
            fn.max_dynamic_shared_size_bytes = optin - fn.shared_size_bytes
        _RAISED.add((device_id, source, name))
    return fn


_RAISED = set()


# First calls may come from several threads at once: one compiles, the others wait for its module.
_COMPILE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _get_function(device_id: int, source: str, name: str, code_digest: str):
    import cupy
    with _COMPILE_LOCK, cupy.cuda.Device(device_id):
        known = registry.SOURCES.get(source)     # None: a file outside the registry (a test's probe)
        arch = (known.arch if known else None) or device_arch(device_id)
        return _module(device_id, arch, source, name, code_digest).get_function(name)


@functools.lru_cache(maxsize=1)
def _digest_once() -> str:
    """The sources' digest, read once per process (the in-process cache of compiled modules); the
    -lineinfo switch is part of it."""
    return sources_digest() + (":lineinfo" if lineinfo() else "")


@functools.lru_cache(maxsize=None)
def device_limits(device_id: int) -> DeviceLimits:
    """The :class:`DeviceLimits` of CUDA device ``device_id``, read once."""
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return DeviceLimits(sm_count=props["multiProcessorCount"],
                        smem_per_sm=props.get("sharedMemPerMultiprocessor", H100.smem_per_sm),
                        smem_per_block=props.get("sharedMemPerBlockOptin", H100.smem_per_block),
                        smem_reserved=props.get("reservedSharedMemPerBlock", H100.smem_reserved))


# ------------------------------------------------------------------------------------ launcher
PDL_ENV = "QUICKCUPY_PDL"          # "0": never launch with programmatic dependent launch
_PROGRAMMATIC_STREAM_SERIALIZATION = 6     # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):      # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):         # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


_CTYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
           np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64,
           np.dtype(np.float32): ctypes.c_float}


def _kernel_arg(a):
    """A kernel argument as a ctypes value: a CuPy array's device pointer, a NumPy scalar as its C
    type, a NumPy record (a CUtensorMap) as its bytes."""
    if hasattr(a, "data") and hasattr(a.data, "ptr"):
        return ctypes.c_uint64(a.data.ptr)
    if isinstance(a, np.generic) and a.dtype in _CTYPES:
        return _CTYPES[a.dtype](a.item())
    if isinstance(a, (np.ndarray, np.void)) and a.dtype.fields:
        raw = a.tobytes()
        return (ctypes.c_char * len(raw)).from_buffer_copy(raw)
    raise TypeError(f"kernel argument of type {type(a).__name__} ({getattr(a, 'dtype', '')}) has no C form here")


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_id: int) -> bool:
    import cupy
    return cupy.cuda.Device(device_id).compute_capability >= "90" and os.environ.get(PDL_ENV, "1") != "0"


def pdl_active(device_id: int) -> bool:
    """Whether :func:`launch_kernel` launches with programmatic dependent launch now: on sm_90+
    while the current stream is captured into a CUDA graph (where the graph keeps the programmatic
    edges and the launch's host cost is paid once), unless ``QUICKCUPY_PDL=0`` or this thread is
    inside ``pdl_allowed(False)``."""
    return _pdl_capable(device_id) and not getattr(_PDL_LOCAL, "off", False) and capturing()


# Per thread: "off" (pdl_allowed(False)), "record" (the list of record_gemm_pdl, or None).
_PDL_LOCAL = threading.local()


@contextlib.contextmanager
def pdl_allowed(on: bool):
    """Within the block this thread's launches use programmatic dependent launch only if ``on``
    (and :func:`pdl_active`'s conditions hold)."""
    before = getattr(_PDL_LOCAL, "off", False)
    _PDL_LOCAL.off = not on
    try:
        yield
    finally:
        _PDL_LOCAL.off = before


def takes_pdl(p: LaunchPlan | None) -> bool:
    """Whether a GEMM launch of plan ``p`` (None: the dequant path, cuBLAS) takes part in
    programmatic dependent launch: its kernel fetches its weights, then waits in ``qc::pdl_wait``
    (the decode design, launched with the attribute)."""
    return p is not None and bool(p.counters)


@contextlib.contextmanager
def recording_gemm_pdl():
    """Yields a list that gets :func:`takes_pdl` of every GEMM this thread launches (or stands in
    for: :func:`record_gemm_pdl`) within the block; a decode graph captures with programmatic
    launch only when all of its GEMMs take part (quickcupy.llama.model.DecodeGraph)."""
    before = getattr(_PDL_LOCAL, "record", None)
    _PDL_LOCAL.record = []
    try:
        yield _PDL_LOCAL.record
    finally:
        _PDL_LOCAL.record = before


def record_gemm_pdl(takes: bool):
    """Adds one GEMM's :func:`takes_pdl` to the innermost :func:`recording_gemm_pdl` (if any)."""
    record = getattr(_PDL_LOCAL, "record", None)
    if record is not None:
        record.append(bool(takes))


def launch_kernel(fn, grid, block, args, shared_mem: int = 0, *, pdl: bool = False):
    """Launches ``fn`` (a ``cupy.RawKernel``) on the current stream, as ``fn(grid, block, args, shared_mem=...)``
    does; with ``pdl`` (the kernel calls ``qc::pdl_wait`` before it touches anything the previous
    kernel writes, see quant_common.cuh) and :func:`pdl_active`, through ``cuLaunchKernelEx`` with
    the programmatic-stream-serialization attribute, so it starts while the previous kernel ends."""
    import cupy
    if not (pdl and pdl_active(cupy.cuda.Device().id)):
        fn(grid, block, args, shared_mem=shared_mem)
        return
    grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
    values = [_kernel_arg(a) for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                           ctypes.c_void_p(cupy.cuda.get_current_stream().ptr), ctypes.pointer(attr), 1)
    res = _driver().cuLaunchKernelEx(ctypes.byref(config), ctypes.c_void_p(fn.kernel.ptr), params, None)
    if res != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed (CUresult {res})")


# (device, instance) whose shared-memory carveout was set. Two threads may both set it the first
# time: the attribute is the same either way.
_CARVED = set()


def launch(p: LaunchPlan, x, qweight, qzeros, scales, bias, out, device_id: int, norm=None, residual=None):
    """Runs plan ``p`` on checked CuPy arrays (no checks here: quickcupy.gemm does them) on the
    current stream: the GEMM kernel, then with split-K the reduction of its fp32 partials. Scratch
    (partials, arrival counters) comes from :func:`workspace`, never from a per-call allocation, so
    a launch captured in a CUDA graph keeps its buffers for as long as the graph can replay.
    ``norm`` (weight (K,), eps) for a plan with the RMSNorm prologue, ``residual`` (M, N) (may be
    ``out``) for one with the epilogue (LaunchPlan.prologue/epilogue; ignored otherwise); with the
    SiLU * up prologue x is (M, 2K).

    Argument order of every GEMM design: (A, qweight, qzeros, scales, bias, C, partial, M, N, K,
    group_size, chunks_per_split); bias and partial may be null; a design with ``tensor_maps``
    takes TMA maps of A, qweight, scales and qzeros (:func:`gemm_tensor_maps`) before them; the decode design takes arrival
    counters after partial and (norm weight, eps, residual) last."""
    fn = get_function(device_id, p.source, p.name, p.shared_bytes)
    M, N, K = p.M, p.N, p.K
    null = np.uint64(0)
    if p.counters:             # split over grid.y, reduced by the kernel; bias added by it
        if p.shape.stages and (device_id, p.name) not in _CARVED:
            # all of the SM's L1/shared split as shared memory: the rings of two blocks need up to
            # 220 KB per SM and read nothing through L1 (the register pipeline keeps the default)
            fn.preferred_shared_memory_carveout = 100
            _CARVED.add((device_id, p.name))
        splits = p.grid[1]
        ws = workspace(device_id)
        partial = ws.buffer("partials", splits * M * N, np.float32) if splits > 1 else null
        with_norm = p.prologue == registry.PRO_NORM
        if (with_norm and norm is None) or (p.epilogue and residual is None):
            raise ValueError(f"{p.name} fuses the {'RMSNorm prologue' if with_norm else 'residual epilogue'}: "
                             f"launch needs {'norm' if with_norm else 'residual'}")
        norm_w, eps = norm if with_norm else (null, 0.0)
        launch_kernel(fn, p.grid, p.block, (x, qweight, qzeros, scales, null if bias is None else bias, out,
                                            partial, ws.counters(N // 32), np.int32(M), np.int32(N), np.int32(K),
                                            np.int32(p.group_size), np.int32(p.chunks_per_split), norm_w,
                                            np.float32(eps), residual if p.epilogue else null),
                      p.shared_bytes, pdl=takes_pdl(p))
        return out
    splits = p.split_k
    partial = workspace(device_id).buffer("partials", splits * M * N, np.float32) if splits > 1 else null
    args = (x, qweight, qzeros, scales, bias if splits == 1 and bias is not None else null, out, partial,
            np.int32(M), np.int32(N), np.int32(K), np.int32(p.group_size), np.int32(p.chunks_per_split))
    if p.design.tensor_maps:
        args = gemm_tensor_maps(p, x, qweight, qzeros, scales) + args
    fn(p.grid, p.block, args, shared_mem=p.shared_bytes)
    if splits > 1:
        reduce_fn = get_function(device_id, "splitk_reduce.cu", f"splitk_reduce<{ctype(out.dtype)}>")
        threads = registry.SPLITK_REDUCE_THREADS
        blocks = -(-(M * N // 4) // threads)
        reduce_fn((blocks,), (threads,), (partial, null if bias is None else bias, out,
                                          np.int32(splits), np.int32(M), np.int32(N)))
    return out


# A CUtensorMap (cuda.h): 128 opaque bytes, passed by value as a __grid_constant__ kernel parameter.
_TENSOR_MAP = np.dtype([("opaque", "<u8", (16,))])


@functools.lru_cache(maxsize=1)
def _encode_tiled():
    """The driver's cuTensorMapEncodeTiled, through ctypes (CuPy does not wrap it; the driver
    library is there wherever CuPy runs kernels)."""
    import ctypes
    fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SWIZZLE_NONE, _SWIZZLE_128B, _L2_256B, _INTERLEAVE_NONE, _OOB_ZERO = 0, 3, 3, 0, 0
_TMA_TYPES = {"uint64": 4, "float16": 6, "bfloat16": 9}   # CU_TENSOR_MAP_DATA_TYPE_*


@functools.lru_cache(maxsize=4096)
def _tensor_map_2d(ptr: int, dtype: str, cols: int, rows: int, row_bytes: int, box_cols: int, box_rows: int,
                   swizzle: int, what: str):
    """TMA map of a row-major (rows, cols) array of ``dtype`` at device address ``ptr``, rows
    ``row_bytes`` apart, boxes of box_rows x box_cols, zeros past the edges; the 128 bytes as a NumPy
    scalar CuPy passes by value. Cached: a layer's weights get one map for as long as they live at
    ``ptr`` (a freed and reused address gets the same map, which then describes the new array)."""
    import ctypes
    buf = ctypes.create_string_buffer(128 + 64)
    addr = ctypes.addressof(buf) + (-ctypes.addressof(buf)) % 64       # the map must be 64-byte aligned
    res = _encode_tiled()(ctypes.c_void_p(addr), _TMA_TYPES[dtype], 2, ctypes.c_void_p(ptr),
                          (ctypes.c_uint64 * 2)(cols, rows), (ctypes.c_uint64 * 1)(row_bytes),
                          (ctypes.c_uint32 * 2)(box_cols, box_rows), (ctypes.c_uint32 * 2)(1, 1),
                          _INTERLEAVE_NONE, swizzle, _L2_256B, _OOB_ZERO)
    if res != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {res}) for {what} ({rows} x {cols} {dtype})")
    return np.frombuffer(ctypes.string_at(addr, 128), dtype=_TENSOR_MAP)[0]


def x_tensor_map(ptr: int, M: int, K: int, box_rows: int, dtype: str = "float16"):
    """TMA map of a 16-bit (``dtype`` "float16" or "bfloat16") (M, K) row-major array at device
    address ``ptr``: boxes of ``box_rows`` x 64 elements (128-byte rows), written to shared memory in
    the 128-byte swizzle, zeros past the edges."""
    return _tensor_map_2d(ptr, dtype, K, M, 2 * K, 64, box_rows, _SWIZZLE_128B, "x")


def sm90_step_groups(p: LaunchPlan) -> int:
    """Groups whose scales and zeros one quick_sm90 K step loads: the kernel's GPS = chunks per step /
    GCH, GCH = gcd(group_size / 32, chunks per step) as in the instance name (2 when group_size / 32
    is odd: the step's two chunks may fall in two groups; else 1)."""
    return p.tile.chunks // math.gcd(p.group_size // 32, p.tile.chunks)


def gemm_tensor_maps(p: LaunchPlan, x, qweight, qzeros, scales) -> tuple:
    """The TMA maps a ``tensor_maps`` design (quick_sm90) takes: x (box bm x 64, 128-byte swizzle),
    then the QUICK-packed qweight, scales and qzeros, each as a 2-D array of 8-byte words with one
    row per 32-feature tile column (N / 32 rows; qweight K / 32 x 512 bytes a row, scales groups x
    64, qzeros groups x 16), so a block's tile columns (bn / 32: 8, or 4 with 256-token tiles) of
    one 64-deep K step are one box of that many rows: 1 KB of weights a row, and the scales and
    zeros of :func:`sm90_step_groups` groups."""
    M, N, K, G = p.M, p.N, p.K, p.group_size
    rows, chunks, groups = N // 32, K // 32, K // G
    box_rows = p.bn // 32                       # a block's tile columns
    step_groups = sm90_step_groups(p)
    # in 8-byte words: a chunk of a tile column is 512 bytes, a group's scales 64, its zeros 16
    return (x_tensor_map(x.data.ptr, M, K, p.bm, x.dtype.name),
            _tensor_map_2d(qweight.data.ptr, "uint64", chunks * 64, rows, chunks * 512, p.tile.chunks * 64, box_rows,
                           _SWIZZLE_NONE, "qweight"),
            _tensor_map_2d(scales.data.ptr, "uint64", groups * 8, rows, groups * 64, 8 * step_groups, box_rows,
                           _SWIZZLE_NONE, "scales"),
            _tensor_map_2d(qzeros.data.ptr, "uint64", groups * 2, rows, groups * 16, 2 * step_groups, box_rows,
                           _SWIZZLE_NONE, "qzeros"))


class Workspace:
    """Scratch of the launches that share one stream (or one capture sequence of it): named
    buffers (split-K partials, the act-order gather of x, under capture gemm's composed norm and
    residual intermediates) and uint32 arrival counters (zeroed
    once; the kernels leave them at 0). Launches on one stream run one after another, so they may
    share a buffer. Buffers only grow, and an outgrown one is kept alive with the workspace: a
    CUDA graph that captured a launch keeps reading and writing the memory it captured."""

    def __init__(self):
        self._buffers, self._old = {}, []

    def buffer(self, name: str, n: int, dtype, zeroed: bool = False):
        """A buffer of at least ``n`` elements of ``dtype`` (CuPy, 1-D), kept for later calls;
        ``zeroed``: zero when made (on the current stream: in a capture, by the graph)."""
        key = (name, dtype)
        have = self._buffers.get(key)
        if have is None or have.size < n:
            import cupy
            with allocation_allowed():
                new = (cupy.zeros if zeroed else cupy.empty)(max(n, 0 if have is None else 2 * have.size), dtype)
            if have is not None:
                self._old.append(have)
            self._buffers[key] = have = new
        return have

    def counters(self, n: int):
        """At least ``n`` uint32 arrival counters, zero between launches (the kernels leave them so)."""
        return self.buffer("counters", n, np.uint32, zeroed=True)


# Workspaces by (device, stream handle, capture id or None). A stream handle is reused by CUDA only
# after the destroyed stream's work has finished, so a new stream with an old handle may take the
# old workspace over. Each capture sequence gets its own workspace, kept for the life of the
# process (a graph may replay at any later time, concurrently with eager calls and with other
# graphs captured on the same stream); :func:`using_workspace` lets an owner of graphs (the Llama
# decode graph) tie their scratch to its own lifetime instead.
_WORKSPACES = {}
_WORKSPACES_LOCK = threading.Lock()
_LOCAL = threading.local()


def workspace(device_id: int) -> Workspace:
    """The workspace of launches on the current stream of ``device_id`` (see :data:`_WORKSPACES`),
    or the one :func:`using_workspace` set for this thread."""
    owned = getattr(_LOCAL, "workspace", None)
    if owned is not None:
        return owned
    import cupy
    stream = cupy.cuda.get_current_stream()
    key = (device_id, stream.ptr, capture_id(stream))
    ws = _WORKSPACES.get(key)
    if ws is None:
        with _WORKSPACES_LOCK:
            ws = _WORKSPACES.setdefault(key, Workspace())
    return ws


@contextlib.contextmanager
def using_workspace(ws: Workspace):
    """Within the block, this thread's launches take their scratch from ``ws`` (whose owner keeps
    it as long as a graph captured in the block can replay)."""
    before = getattr(_LOCAL, "workspace", None)
    _LOCAL.workspace = ws
    try:
        yield ws
    finally:
        _LOCAL.workspace = before


# ----------------------------------------------------------------------------- stream capture
_CAPTURE_ACTIVE = 1                # CU_STREAM_CAPTURE_STATUS_ACTIVE
_CAPTURE_MODE_RELAXED = 2          # CU_STREAM_CAPTURE_MODE_RELAXED


@functools.lru_cache(maxsize=1)
def _driver():
    """The CUDA driver library (there wherever CuPy runs kernels), for the capture queries and the
    attributed launch CuPy does not wrap."""
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuStreamGetCaptureInfo_v2.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                              ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.c_void_p]
    lib.cuThreadExchangeStreamCaptureMode.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    return lib


def capture_id(stream):
    """The id of the capture sequence CuPy ``stream`` is in, or None when it is not capturing."""
    try:
        if not stream.is_capturing():
            return None
    except Exception:           # the legacy stream while another stream captures: that launch fails anyway
        return None
    status, ident = ctypes.c_int(0), ctypes.c_uint64(0)
    res = _driver().cuStreamGetCaptureInfo_v2(ctypes.c_void_p(stream.ptr), ctypes.byref(status),
                                              ctypes.byref(ident), None, None, None)
    if res != 0:
        raise RuntimeError(f"cuStreamGetCaptureInfo failed (CUresult {res})")
    return int(ident.value) if status.value == _CAPTURE_ACTIVE else None


def capturing() -> bool:
    """True when the current CuPy stream is being captured into a CUDA graph."""
    import cupy
    return capture_id(cupy.cuda.get_current_stream()) is not None


@contextlib.contextmanager
def allocation_allowed():
    """Lets a cudaMalloc through while this thread's stream is captured in the global mode (what
    ``torch.cuda.graph`` uses, which forbids it): the thread's capture mode is relaxed for the block.
    The memory is not part of the graph; the workspace keeps it alive."""
    if not capturing():
        yield
        return
    mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
    res = _driver().cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))
    if res != 0:
        raise RuntimeError(f"cuThreadExchangeStreamCaptureMode failed (CUresult {res})")
    try:
        yield
    finally:
        _driver().cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))


def dequantize(qweight, qzeros, scales, N: int, K: int, group_size: int, device_id: int, out=None,
               dtype="float16"):
    """W (N, K) of a layer in the QUICK layout (cuda/dequant.cu), on the current stream, as ``dtype``
    (float16 or bfloat16; ``out``'s dtype when given)."""
    import cupy
    if out is None:
        out = cupy.empty((N, K), np_dtype(dtype))
    fn = get_function(device_id, "dequant.cu", f"dequant_quick<{ctype(out.dtype)}>")
    warps = registry.DEQUANT_THREADS // 32
    fn((-(-(K // 32) // warps), N // 32), (registry.DEQUANT_THREADS,),
       (qweight, qzeros, scales, out, np.int32(N), np.int32(K), np.int32(group_size)))
    return out


def launch_dequant(x, qweight, qzeros, scales, bias, out, N: int, K: int, group_size: int, device_id: int):
    """The "dequant" path: W = dequantize(...) into a scratch buffer of x's dtype (CuPy's pool keeps
    it between calls), then out = x @ W.T (+ bias) by cuBLAS."""
    import cupy
    w = dequantize(qweight, qzeros, scales, N, K, group_size, device_id, dtype=x.dtype)
    x2, out2 = x.reshape(-1, K), out.reshape(-1, N)
    cupy.matmul(x2, w.T, out=out2)
    if bias is not None:
        out2 += bias
    return out

"""Kernel sources, launch plans and the lazy CuPy loader.

A *plan* (pure Python, no GPU) says which template instance of which source runs with which grid
and split-K for a GEMM shape; the bank-conflict model and the tests use it too. The loader compiles
each instance once per device with NVRTC through ``cupy.RawModule`` (CuPy's on-disk kernel cache
keeps the binary between processes).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from . import smem_maps

MIN_COMPUTE_CAPABILITY = (8, 0)   # mma.sync m16n8k16, ldmatrix, cp.async


def cuda_dir() -> Path:
    """Folder of the CUDA sources: quickcupy/cuda when installed, ../cuda in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "cuda", here.parent / "cuda"):
        if (cand / "quant_common.cuh").is_file():
            return cand
    raise FileNotFoundError(f"CUDA sources not found next to {here} (looked in cuda/ and ../cuda/)")


SOURCES = ("awq_gemm.cu", "quick_gemm.cu", "splitk_reduce.cu", "decode_attention.cu", "spin.cu")

# decode_attention<head_dim, heads per block> (used by quickcupy.llama): a block takes the largest of
# DECODE_HEADS_PER_BLOCK that divides the GQA group. head_dim: a multiple of 32 (a warp spans it)
# between the least and the greatest of DECODE_HEAD_DIMS, the ones CI compiles and spill-checks.
DECODE_HEAD_DIMS = (64, 96, 128, 256)
DECODE_HEADS_PER_BLOCK = (8, 4, 2, 1)
DECODE_THREADS = 128            # THREADS of cuda/decode_attention.cu


def source_code(filename: str) -> str:
    """A kernel source as compiled: the generated index-map macros, then the file."""
    return smem_maps.cuda_macros() + (cuda_dir() / filename).read_text()


def compile_options(arch: str) -> tuple:
    """NVRTC options used at run time (and by the CPU compile test), ``arch`` like "sm_90"."""
    return ("-std=c++17", f"-arch={arch}", f"-I{cuda_dir()}")


# --------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class TileConfig:
    """Compile-time shape of one kernel instance."""
    bm: int          # rows of C per block
    bn: int          # columns of C per block
    chunks: int      # 32-deep K chunks per main-loop step (U)
    stages: int      # cp.async ring depth for activations (QUICK)
    threads: int
    wstages: int = 1  # register sets of weights in flight (QUICK): loads run wstages - 1 steps ahead


AWQ_TILE_N = (128, 64)          # AutoAWQ picks 128 when N allows, else 64
# Rows per block -> (chunks per step, cp.async stages, weight stages, resident blocks per SM).
# Chosen from a sweep on the H100 at K = N = 8192 (BENCHMARKS.md, "Tuning"); the last number is
# what the register count allows and sets the split-K target of one full wave.
QUICK_TILES = {
    16: (4, 2, 2, 4),
    32: (4, 3, 2, 3),
    64: (4, 3, 2, 2),
    128: (2, 3, 3, 2),
}
AWQ_BLOCKS_PER_SM = 8           # 64-thread blocks: as many threads in flight as 2 QUICK blocks


@dataclass(frozen=True)
class LaunchPlan:
    kernel: str                  # "awq" or "quick"
    source: str                  # file in cuda/
    name: str                    # template instance, e.g. "quick_gemm<16, 4, 4, 3>"
    tile: TileConfig
    grid: tuple                  # (M tiles, N tiles, K splits)
    block: tuple
    shared_bytes: int            # dynamic shared memory
    chunks_per_split: int        # 32-deep K chunks per split
    M: int
    N: int
    K: int
    group_size: int

    @property
    def split_k(self) -> int:
        return self.grid[2]


def _split_k(tiles: int, chunks: int, step_chunks: int, target_blocks: int, split_k=None):
    """Splits K so that tiles * splits comes nearest ``target_blocks`` (one wave); each split gets
    at least two main-loop steps and a whole number of steps (a step never straddles a group)."""
    if split_k is None:
        want = max(1, round(target_blocks / tiles))
        split_k = max(1, min(want, chunks // (2 * step_chunks)))
    split_k = max(1, min(int(split_k), math.ceil(chunks / step_chunks)))
    per = math.ceil(math.ceil(chunks / split_k) / step_chunks) * step_chunks
    return math.ceil(chunks / per), per


def quick_tile_m(M: int) -> int:
    """Rows per block for QUICK: the smallest tile that covers M, 128 beyond 64 rows."""
    for bm in (16, 32, 64):
        if M <= bm:
            return bm
    return 128


def plan(kernel: str, M: int, N: int, K: int, group_size: int, sm_count: int = 132,
         tile_m=None, split_k=None, quick_tile=None) -> LaunchPlan:
    """Launch plan of ``kernel`` ("awq" or "quick") for x (M, K) times weight (K, N).

    ``tile_m``/``split_k`` override the choice by M; ``quick_tile`` = (chunks, stages, weight
    stages, blocks per SM) overrides QUICK_TILES (tuning)."""
    chunks = K // 32
    if kernel == "awq":
        bm = 16 if tile_m is None else tile_m
        if bm not in (16, 32, 64):
            raise ValueError(f"tile_m={bm} is not available for awq (16, 32, 64)")
        bn = next(b for b in AWQ_TILE_N if N % b == 0)
        tile = TileConfig(bm=bm, bn=bn, chunks=1, stages=1, threads=smem_maps.AWQ_THREADS)
        name = f"awq_gemm<{bm}, {bn}>"
        shared = 0
        target = AWQ_BLOCKS_PER_SM * sm_count
    elif kernel == "quick":
        bm = quick_tile_m(M) if tile_m is None else tile_m
        if bm not in QUICK_TILES:
            raise ValueError(f"tile_m={bm} is not available for quick {tuple(QUICK_TILES)}")
        u, stages, wstages, per_sm = QUICK_TILES[bm] if quick_tile is None else quick_tile
        gch = min(group_size // 32, u)
        tile = TileConfig(bm=bm, bn=128, chunks=u, stages=stages, threads=smem_maps.QUICK_THREADS,
                          wstages=wstages)
        name = f"quick_gemm<{bm}, {u}, {gch}, {stages}, {wstages}>"
        shared = stages * bm * (32 * u + smem_maps.PAD) * 2
        target = per_sm * sm_count
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    tiles = math.ceil(M / tile.bm) * math.ceil(N / tile.bn)
    splits, per = _split_k(tiles, chunks, tile.chunks, target, split_k)
    return LaunchPlan(kernel=kernel, source=f"{kernel}_gemm.cu", name=name, tile=tile,
                      grid=(math.ceil(M / tile.bm), math.ceil(N / tile.bn), splits),
                      block=(tile.threads, 1, 1), shared_bytes=shared, chunks_per_split=per,
                      M=M, N=N, K=K, group_size=group_size)


def all_instances():
    """Every (source, template instance) the planner can ask for: what the CPU compile test builds."""
    out = [("awq_gemm.cu", f"awq_gemm<{bm}, {bn}>") for bm in (16, 32, 64) for bn in AWQ_TILE_N]
    for bm, (u, stages, wstages, _) in QUICK_TILES.items():
        out += [("quick_gemm.cu", f"quick_gemm<{bm}, {u}, {gch}, {stages}, {wstages}>")
                for gch in (1, 2, 4) if gch <= u]
    out.append(("splitk_reduce.cu", "splitk_reduce"))
    out.append(("spin.cu", "quickcupy_spin"))
    out += [("decode_attention.cu", f"decode_attention<{d}, {g}>")
            for d in DECODE_HEAD_DIMS for g in DECODE_HEADS_PER_BLOCK]
    return out


def toolkit_include_dir():
    """A CUDA toolkit include folder holding cuda_fp16.h (for compiling without CuPy's runtime
    set-up), from $CUDA_PATH or /usr/local/cuda; None when there is none."""
    import os
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
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
    from .device import no_gpu_reason
    reason = no_gpu_reason()
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
def _module(device_id: int, arch: str, source: str, name: str):
    import cupy
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=source_code(source), options=compile_options(arch),
                                name_expressions=[name] if "<" in name else None)
    return module


@functools.lru_cache(maxsize=None)
def get_function(device_id: int, source: str, name: str, shared_bytes: int = 0):
    """The compiled kernel ``name`` of ``source`` for device ``device_id`` (compiled on first use)."""
    import cupy
    with cupy.cuda.Device(device_id) as dev:
        arch = "sm_" + "".join(str(c) for c in dev.compute_capability)
        fn = _module(device_id, arch, source, name).get_function(name)
        if shared_bytes > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = shared_bytes
    return fn


@functools.lru_cache(maxsize=None)
def sm_count(device_id: int) -> int:
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]

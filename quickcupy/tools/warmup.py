"""``python -m quickcupy warmup``: compile, once, the kernel instances this GPU will run.

The kernels are CUDA C++ compiled at run time by NVRTC, one template instance at a time, on the
first call that needs it (0.2-1.5 s each); CuPy keeps each binary in its on-disk cache
(``$CUPY_CACHE_DIR``, default ``~/.cupy/kernel_cache``), keyed on the source text (which carries a
digest of every file in ``cuda/``) and the compile options, so later processes load it in
milliseconds. This tool makes the instances that calls of the given shapes, M values, group size
and dtype will ask for (with ``auto``: the kernels its table picks on this GPU, also under CUDA-graph
capture) and loads them, so a notebook or a server pays the compiles once, up front.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .. import attention, device as _device, dispatch, dtypes, kernels, registry
from ..quantize import effective_group_size
from .bench import DEFAULT_SHAPES
from .common import (DTYPE_HELP, UsageError, parse_dtype, parse_group_size, parse_ms, parse_names,
                     parse_shapes)

# Every M of the decode kernel's launch rule, then powers of two: the tile and split choices by M.
DEFAULT_MS = tuple(range(1, 17)) + tuple(2 ** i for i in range(5, 14))
KERNEL_NAMES = tuple(k for k in registry.VARIANTS)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "warmup", help="compile the kernel instances this GPU will run, once (CuPy's disk cache keeps them)",
        description="Compiles, with a progress line each, the kernel instances that gemm calls of the given "
                    "shapes, row counts, group size and dtype will use on this GPU (with kernel auto: the ones "
                    "its tuning table picks), and with --llama the Llama model's small ops and decode "
                    "attention, so that later processes load them from CuPy's on-disk cache.")
    p.add_argument("--kernels", default="auto", help="comma-separated kernel names from "
                   f"{', '.join(KERNEL_NAMES)}; default: %(default)s")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in DEFAULT_SHAPES),
                   help="comma-separated KxN weight shapes; default: %(default)s")
    p.add_argument("--m", default=",".join(map(str, DEFAULT_MS)), help="comma-separated M values; default: %(default)s")
    p.add_argument("--group-size", default="128", help="-1 or a multiple of 32 dividing K; default: %(default)s")
    p.add_argument("--dtype", default="fp16", help=DTYPE_HELP + "; default: %(default)s")
    p.add_argument("--llama", action="store_true", help="also the Llama model's small ops and decode attention")
    p.set_defaults(func=run)
    return p


def cache_dir() -> Path:
    """CuPy's on-disk kernel cache."""
    return Path(os.environ.get("CUPY_CACHE_DIR") or Path.home() / ".cupy" / "kernel_cache")


def gemm_instances(names, shapes, ms, group_size: int, dtype: str, limits: kernels.DeviceLimits,
                   choose=None, runnable=lambda v: True) -> list:
    """[(source, instance, dynamic shared bytes)] that gemm calls of ``names`` (variant names) on
    (K, N) ``shapes`` with ``ms`` rows launch on a GPU of ``limits``, in first-use order. ``choose(M,
    N, K, capturable)`` is auto's choice (a Variant); ``runnable(variant)`` filters what this GPU runs."""
    out = {}
    for named in map(registry.variant, names):
        for K, N in shapes:
            G = effective_group_size(group_size, K)
            for M in ms:
                picks = [choose(M, N, K, c) for c in (False, True)] if named.path == "auto" else [named]
                for v in picks:
                    if not runnable(v) or dtype not in v.design.dtypes or M > (v.design.max_m or M):
                        continue
                    if K % G or K % v.design.k_multiple or N % v.design.n_multiple:
                        continue
                    if v.path == "dequant":
                        out[("dequant.cu", f"dequant_quick<{dtypes.ctype(dtype)}>", 0)] = None
                        continue
                    p = kernels.plan(v, M, N, K, G, limits, dtype=dtype)
                    out[(p.source, p.name, p.shared_bytes)] = None
                    if not p.counters and p.split_k > 1:
                        out[("splitk_reduce.cu", f"splitk_reduce<{dtypes.ctype(dtype)}>", 0)] = None
    return list(out)


def llama_instances(dtype: str) -> list:
    """[(source, instance, 0)] of the Llama model's small ops and decode attention for ``dtype``."""
    c = dtypes.ctype(dtype)
    ops = [("llama_ops.cu", name, 0) for name in registry.LLAMA_OPS if f"<{c}>" in name or "<" not in name]
    attn = [("decode_attention.cu", name, attention.decode_smem_bytes(d, g, 2))
            for name in registry.SOURCES["decode_attention.cu"].instances if name.endswith(f", {c}>")
            for d, g in [tuple(int(v) for v in name[name.index("<") + 1:].split(",")[:2])]]
    return ops + attn


def run(args) -> int:
    names = parse_names("--kernels", args.kernels, KERNEL_NAMES)
    shapes = parse_shapes(args.shapes)
    ms = parse_ms(args.m)
    group_size = parse_group_size("--group-size", args.group_size, [k for k, _ in shapes])
    dtype = parse_dtype(args.dtype)
    reason = _device.no_gpu_reason()
    if reason is not None:
        raise UsageError(f"warmup compiles for the GPU it runs on: {reason}")
    dev = kernels.require_gpu().id
    todo = gemm_instances(names, shapes, ms, group_size, dtype, kernels.device_limits(dev),
                          choose=lambda M, N, K, c: dispatch.kernel_for(M, N, K, dev, dtype, capturable=c),
                          runnable=lambda v: kernels.unsupported_reason(v, dev) is None)
    if args.llama:
        todo += llama_instances(dtype)
    print(f"warmup: {len(todo)} kernel instances for {kernels.device_arch(dev)}, cache {cache_dir()}", flush=True)
    start, cached = time.perf_counter(), 0
    for i, (source, name, shared) in enumerate(todo, 1):
        t = time.perf_counter()
        kernels.get_function(dev, source, name, shared)
        dt = time.perf_counter() - t
        cached += dt < 0.05                # loaded, not compiled
        print(f"warmup: {i}/{len(todo)} {name} {dt:.2f} s", flush=True)
    print(f"warmup: {len(todo)} instances ready in {time.perf_counter() - start:.1f} s "
          f"({len(todo) - cached} compiled, {cached} already in the cache)")
    return 0

r"""What limits quick_decode at small M: fixed cost, streaming rate, block timing, edited copies?

The experiments behind docs/decode.md, run from the checkout on a GPU:

    python dev/decode_probe.py MODE [options]

Each mode times like ``bench`` (event pairs behind a spin kernel, weights rotated past L2) on random
packed QUICK weights made on the GPU (no host quantization: timing only; outputs are compared between
launches, correctness is the tests' job).

Modes:

- ``fixed``: M = 1, N = 8192, K = 1024 .. 32768: quick_decode against a plain read of the same packed
  words (``ld.global.nc``, 4 x 16 bytes in flight per thread, 4 blocks of 512 threads per SM) and an
  empty kernel; least-squares fit time = a + b x floor for both: ``a`` is what a launch costs beyond
  streaming, ``b`` how fast it streams.
- ``blocks``: per-block timestamps (``%globaltimer``) of a copy of cuda/quick_decode.cu instrumented
  at its start and at the end of its main loop: when blocks start, when each finishes streaming, and
  how unevenly the SMs finish.
- ``ab --old FILE``: the current kernel against another quick_decode.cu (e.g. ``git show
  REV:cuda/quick_decode.cu > FILE``) with the same launch plans, output bit-identity checked; where
  the plan uses the register pipeline, the ring is timed too (the launch rule told to use the ring).
- ``evict``: the L2 evict-first policy: the current kernel (ring weight copies with the policy) against
  a copy with the policy moved from the ring to the register pipeline's loads.
- ``shapes --shapes ... --splits ...``: any DecodeShape at chosen split counts, against the plan.
- ``launch --points KxNxM``: three launches of the plan per point and nothing else, for a profiler,
  e.g. the stall reasons: ``ncu --clock-control none --launch-skip 2 --launch-count 1 -k
  regex:quick_decode --section WarpStateStats --metrics
  regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio python
  dev/decode_probe.py launch --points 8192x8192x16``.

The instrumented or altered copies go into a temporary copy of cuda/ as quick_decode_<tag>.cu, and the
loader is pointed at that copy ($QUICKCUPY_CUDA_DIR) while they run: the package's cuda/ is never
written (the loader compiles a file outside the registry for the device's arch).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's quickcupy

from quickcupy import kernels, registry
from quickcupy.registry import DecodeShape
from quickcupy.tools.bench_report import moved_bytes, rotation_copies, weight_bytes
from source_variants import replace_once   # dev/, beside this file

SOURCE = "quick_decode.cu"
L2_BYTES = 50 * 2 ** 20            # H100; only sets how many copies rotate
COPY_BW = 2994e9                   # bytes/s (read + write) of the H100's device copy, as bench measures it
DESIGN = registry.DESIGNS["quick_decode"]

# --------------------------------------------------------------------------- source variants (pure)
TIMESTAMPS = r'''
// decode_probe: per-block timestamps (globaltimer ns): [0] start, [1] end of the main loop (max over
// the block's warps), [2] the SM
__device__ unsigned long long probe_ts[3][16384];
__device__ __forceinline__ unsigned long long probe_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
'''
_NS = "using namespace qc;\n"
_START = "  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;\n"
_LOOP_END = "  // ---- the KW warps of a tile column add their sums in warp order (fixed: deterministic)\n"
_RING_POLICY = ", c < left, w_policy);"
_REG_LOAD = "ld_stream16<1>(wb + c * 32, active && rcb + c < nch_b)"



def timestamped_source(text: str) -> str:
    """quick_decode.cu with per-block timestamps into ``probe_ts`` (start, main-loop end, SM id)."""
    text = replace_once(text, _NS, _NS + TIMESTAMPS, "namespace line")
    text = replace_once(text, _START, _START + (
        "  const int probe_b = blockIdx.y * gridDim.x + blockIdx.x;\n"
        "  if (threadIdx.x == 0) { unsigned sm; asm volatile(\"mov.u32 %0, %smid;\" : \"=r\"(sm));\n"
        "    probe_ts[0][probe_b] = probe_now(); probe_ts[2][probe_b] = sm; }\n"), "kernel start")
    return replace_once(text, _LOOP_END, "  if (lane == 0) atomicMax(&probe_ts[1][probe_b], probe_now());\n" + _LOOP_END,
                         "main-loop end")


def evict_moved_source(text: str) -> str:
    """quick_decode.cu with the evict-first policy taken off the ring's weight copies and put on the
    register pipeline's weight loads."""
    text = replace_once(text, _RING_POLICY, ", c < left);", "ring weight copy with the policy")
    text = replace_once(text, _START, _START + "  const unsigned long long probe_policy = l2_evict_first_policy();\n",
                         "kernel start")
    return replace_once(text, _REG_LOAD, "ld_stream16(wb + c * 32, active && rcb + c < nch_b, probe_policy)",
                         "register-pipeline load")


@contextmanager
def variant(tag: str, text: str):
    """For the duration: a temporary copy of the CUDA sources with ``text`` added as
    quick_decode_<tag>.cu, and $QUICKCUPY_CUDA_DIR pointing the loader at it; yields the file name.
    The sources the loader used before (the package's cuda/) are only read."""
    name = f"quick_decode_{tag}.cu"
    before = os.environ.get(kernels.CUDA_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="decode_probe_") as tmp:
        folder = Path(tmp) / "cuda"
        folder.mkdir()
        for path in kernels.cuda_dir().glob("*.cu*"):
            shutil.copy(path, folder / path.name)
        (folder / name).write_text(text)
        os.environ[kernels.CUDA_DIR_ENV] = str(folder)
        try:
            yield name
        finally:
            if before is None:
                del os.environ[kernels.CUDA_DIR_ENV]
            else:
                os.environ[kernels.CUDA_DIR_ENV] = before


# ------------------------------------------------------------------------------------ GPU helpers
def random_layer(K: int, N: int, G: int):
    """A QuantLinear of random packed QUICK words, fp16 scales in [0.001, 0.011) and random zeros, made
    on the GPU (int4 bytes and speed as a real layer; no quantization)."""
    import cupy
    from quickcupy.gemm import QuantLinear
    qweight = cupy.random.randint(-2 ** 31, 2 ** 31 - 1, (N // 32, K // 32, 32, 4), dtype=np.int64).astype(np.int32)
    qzeros = cupy.random.randint(-2 ** 31, 2 ** 31 - 1, (N // 32, K // G, 4), dtype=np.int64).astype(np.int32)
    scales = (cupy.random.random((N // 32, K // G, 8, 4), dtype=np.float32) * 0.01 + 0.001).astype(np.float16)
    return QuantLinear.from_packed(qweight, qzeros, scales, layout="quick", in_features=K, out_features=N,
                                   group_size=G)


def rotation(K: int, N: int, G: int) -> list:
    first = random_layer(K, N, G)
    return [first] + [first.copy() for _ in range(rotation_copies(weight_bytes("quick", K, N, G), L2_BYTES) - 1)]


def floor_us(M: int, K: int, N: int, G: int) -> float:
    return moved_bytes("quick", M, K, N, G) / COPY_BW * 1e6


def with_source(plan, source: str):
    return dataclasses.replace(plan, design=dataclasses.replace(plan.design, source=source))


def launch(plan, x, y, layer):
    """One launch of ``plan`` (its source may be a variant) on ``layer``."""
    fn = kernels.get_function(layer.device, plan.source, plan.name, plan.shared_bytes)
    if plan.shape.stages:
        fn.preferred_shared_memory_carveout = 100      # as kernels.launch sets for the ring
    kernels.launch(plan, x, layer.qweight, layer.qzeros, layer.scales, None, y, layer.device)


def time_us(plan, x, y, layers, repeats: int = 30) -> float:
    from quickcupy.tools.timing import rotating, time_gpu
    return time_gpu(rotating(lambda layer: launch(plan, x, y, layer), layers), 10, repeats) * 1e6


def output(plan, x, layer):
    import cupy
    y = cupy.full((x.shape[0], layer.out_features), np.nan, np.float16)
    launch(plan, x, y, layer)
    return y


def shape_plan(sh: DecodeShape, M: int, N: int, K: int, G: int, splits: int):
    """LaunchPlan of block shape ``sh`` with ``splits`` K splits (kernels._decode_fit's arithmetic)."""
    splits, cps, _, _ = kernels._decode_fit(sh, M, K, N // 32, kernels.device_limits(0), splits)
    return kernels.LaunchPlan(design=DESIGN, name=sh.instance(math.gcd(G // 32, sh.chunks)), bm=8 * sh.mb,
                              bn=32 * sh.columns, tile=registry.Tile(chunks=sh.chunks),
                              grid=(-(-(N // 32) // sh.columns), splits, 1), shared_bytes=kernels._decode_smem(sh, M, cps),
                              chunks_per_split=cps, M=M, N=N, K=K, group_size=G, threads=32 * sh.nwarps,
                              counters=True, shape=sh)


def ring_plan(M: int, N: int, K: int, G: int):
    """The launch rule's choice with the ring pipeline at every M and layer width."""
    return kernels._plan_decode(DESIGN, M, N, K, G, kernels.device_limits(0), ring=True)


def x_of(M: int, K: int):
    import cupy
    return cupy.random.standard_normal((M, K), dtype=np.float32).astype(np.float16)


# ------------------------------------------------------------------------------------------ modes
PLAIN_READ = r'''
#include "quant_common.cuh"
extern "C" __global__ void probe_plain_read(const uint4* __restrict__ p, long long n, unsigned* out) {
  unsigned acc = 0;
  const long long T = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += 4 * T) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = qc::ld_stream16<1>(p + i + u * T, i + u * T < n);  // as quick_decode's loads
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678u) out[0] = acc;   // never true in practice; keeps the loads
}
extern "C" __global__ void probe_empty() {}
'''


def mode_fixed(args):
    import cupy
    from quickcupy.tools.timing import rotating, time_gpu
    module = cupy.RawModule(code=PLAIN_READ, options=kernels.compile_options(kernels.device_arch(0)))
    read, empty = module.get_function("probe_plain_read"), module.get_function("probe_empty")
    sink = cupy.zeros(1, np.uint32)
    sms = kernels.device_limits(0).sm_count
    print(f"empty kernel: {time_gpu(lambda: empty((1,), (32,), ()), 10, args.repeats) * 1e6:.2f} us")
    N, G, rows = 8192, args.group_size, []
    for K in (1024, 2048, 4096, 8192, 16384, 32768):
        layers, x = rotation(K, N, G), x_of(1, K)
        y = cupy.empty((1, N), np.float16)
        p = kernels.plan("quick_decode", 1, N, K, G, kernels.device_limits(0))
        t_dec = time_us(p, x, y, layers, args.repeats)
        words = layers[0].qweight.nbytes // 16
        t_read = time_gpu(rotating(lambda L: read((4 * sms,), (512,), (L.qweight, np.int64(words), sink)), layers),
                          10, args.repeats) * 1e6
        rows.append((K, floor_us(1, K, N, G), t_dec, t_read))
        print(f"K={K:6d} N={N} M=1  floor {rows[-1][1]:6.1f}  quick_decode {t_dec:6.1f} ({p.name} grid {p.grid})"
              f"  plain read of the packed words {t_read:6.1f}  (us)", flush=True)
        del layers
        cupy.get_default_memory_pool().free_all_blocks()
    A = np.array([[1.0, r[1]] for r in rows])
    for col, name in ((2, "quick_decode"), (3, "plain read")):
        (a, b), *_ = np.linalg.lstsq(A, np.array([r[col] for r in rows]), rcond=None)
        print(f"fit {name}: time = {a:.2f} us + {b:.3f} x floor")


def mode_blocks(args):
    import cupy
    from quickcupy.tools.timing import spin
    text = timestamped_source((kernels.cuda_dir() / SOURCE).read_text())
    with variant("ts", text) as src:
        for K, N, M in args.points:
            G = args.group_size
            layers, x = rotation(K, N, G), x_of(M, K)
            y = cupy.empty((M, N), np.float16)
            p = with_source(kernels.plan("quick_decode", M, N, K, G, kernels.device_limits(0)), src)
            module = cupy.RawModule(code=kernels.source_code(src), options=kernels.compile_options(kernels.device_arch(0)),
                                    name_expressions=[p.name])
            fn = module.get_function(p.name)
            if p.shared_bytes > 48 * 1024:
                fn.max_dynamic_shared_size_bytes = p.shared_bytes
            if p.shape.stages:
                fn.preferred_shared_memory_carveout = 100
            ts = cupy.ndarray((3, 16384), np.uint64, module.get_global("probe_ts"))
            nb = p.grid[0] * p.grid[1]
            real = kernels.get_function
            kernels.get_function = lambda dev, s, name, *a, **k: fn if name == p.name and s == src else real(dev, s, name, *a, **k)
            starts, ends, spans = [], [], []
            try:
                for rep in range(4 + args.repeats):
                    layer = layers[rep % len(layers)]
                    ts[1].fill(0)
                    spin(2e-4)                     # the GPU busy and clocked up, the launch queued behind
                    kernels.launch(p, x, layer.qweight, layer.qzeros, layer.scales, None, y, 0)
                    cupy.cuda.Device().synchronize()
                    t = ts[:, :nb].get().astype(np.int64)
                    if rep >= 4:
                        t0 = t[0].min()
                        starts.append(np.sort(t[0] - t0))
                        ends.append(np.sort(t[1] - t0))
                        spans.append(t[1].max() - t0)
            finally:
                kernels.get_function = real
            st, en = np.median(starts, axis=0) / 1e3, np.median(ends, axis=0) / 1e3
            q = lambda a: " ".join(f"{v:6.2f}" for v in np.percentile(a, [0, 10, 50, 90, 100]))
            print(f"{K}x{N} M={M} {p.name} grid {p.grid} (floor {floor_us(M, K, N, G):.1f} us): first block start "
                  f"-> last main-loop end {np.median(spans) / 1e3:.2f} us")
            print(f"   block start    (us; p0 p10 p50 p90 p100): {q(st)}")
            print(f"   main loop ends (us; p0 p10 p50 p90 p100): {q(en)}", flush=True)
            del layers
            cupy.get_default_memory_pool().free_all_blocks()


def mode_ab(args):
    import cupy
    old_text = open(args.old).read()
    with variant("old", old_text) as old:
        print(f"{'G':>4} {'K x N':>12} {'M':>3} {'old':>7} {'new':>7} {'new/old':>7} {'ring':>7} {'floor':>6} bit-identical")
        for G in args.groups:
            for K, N in args.shapes:
                layers = rotation(K, N, G)
                for M in args.ms:
                    x = x_of(M, K)
                    y = cupy.empty((M, N), np.float16)
                    p = kernels.plan("quick_decode", M, N, K, G, kernels.device_limits(0))
                    q = with_source(p, old)
                    t_new, t_old = time_us(p, x, y, layers, args.repeats), time_us(q, x, y, layers, args.repeats)
                    same = bool(cupy.array_equal(output(p, x, layers[0]), output(q, x, layers[0])))
                    t_ring = time_us(ring_plan(M, N, K, G), x, y, layers, args.repeats) if not p.shape.stages else None
                    ring = f"{t_ring:7.1f}" if t_ring else f"{'-':>7}"
                    print(f"{G:>4} {K:>5}x{N:<6} {M:>3} {t_old:7.1f} {t_new:7.1f} {t_new / t_old:7.3f} {ring} "
                          f"{floor_us(M, K, N, G):6.1f} {same}", flush=True)
                del layers
                cupy.get_default_memory_pool().free_all_blocks()


def mode_evict(args):
    import cupy
    text = evict_moved_source((kernels.cuda_dir() / SOURCE).read_text())
    with variant("evict", text) as moved:
        for K, N in args.shapes:
            layers = rotation(K, N, args.group_size)
            for M in args.ms:
                x = x_of(M, K)
                y = cupy.empty((M, N), np.float16)
                p = kernels.plan("quick_decode", M, N, K, args.group_size, kernels.device_limits(0))
                q = with_source(p, moved)
                pairs = [(time_us(p, x, y, layers, args.repeats), time_us(q, x, y, layers, args.repeats)) for _ in range(2)]
                same = bool(cupy.array_equal(output(p, x, layers[0]), output(q, x, layers[0])))
                pipeline = "ring" if p.shape.stages else "registers"
                print(f"{K}x{N} M={M} {p.name} ({pipeline}): policy on the ring {min(a for a, _ in pairs):.1f} us, "
                      f"on the register loads {min(b for _, b in pairs):.1f} us, bit-identical {same}", flush=True)
            del layers
            cupy.get_default_memory_pool().free_all_blocks()


def mode_shapes(args):
    import cupy
    for K, N in args.shapes:
        G = args.group_size
        layers = rotation(K, N, G)
        for M in args.ms:
            x = x_of(M, K)
            y = cupy.empty((M, N), np.float16)
            p = kernels.plan("quick_decode", M, N, K, G, kernels.device_limits(0))
            ref = output(p, x, layers[0])
            print(f"{K}x{N} M={M} plan {p.name} grid {p.grid}: {time_us(p, x, y, layers, args.repeats):.1f} us")
            for sh in args.block_shapes:
                if 8 * sh.mb < M:
                    continue
                cells = []
                for s in args.splits:
                    q = shape_plan(sh, M, N, K, G, s)
                    if q.grid[1] != s or q.shared_bytes > kernels.device_limits(0).smem_per_block:
                        continue
                    t = time_us(q, x, y, layers, args.repeats)
                    out = output(q, x, layers[0]).astype(np.float32)
                    err = float(cupy.abs(out - ref.astype(np.float32)).max() / cupy.abs(ref.astype(np.float32)).max())
                    cells.append(f"splits {s} ({q.grid[0] * q.grid[1]} blocks) {t:.1f}" + ("" if err < 1e-2 else f" WRONG {err:.2g}"))
                print(f"   {sh}: " + ", ".join(cells), flush=True)
        del layers
        cupy.get_default_memory_pool().free_all_blocks()


def mode_launch(args):
    import cupy
    for K, N, M in args.points:
        layer, x = random_layer(K, N, args.group_size), x_of(M, K)
        p = kernels.plan("quick_decode", M, N, K, args.group_size, kernels.device_limits(0))
        for _ in range(3):
            output(p, x, layer)
        cupy.cuda.Device().synchronize()
        print(f"{K}x{N} M={M}: 3 launches of {p.name} grid {p.grid}")


# ---------------------------------------------------------------------------------------- the CLI
DEFAULT_SHAPES = "8192x8192,4096x12288,4096x4096,4096x22016,11008x4096,8192x57344,28672x8192"


def _shapes(text):
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]


def _ints(text):
    return [int(v) for v in text.split(",")]


def _points(text):   # "8192x8192x1,..." -> (K, N, M)
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]


def _block_shapes(text):   # "16:8:1:1:4:0,..." -> DecodeShape(nwarps, kw, mb, minb, chunks, stages)
    return [DecodeShape(*(int(v) for v in s.split(":"))) for s in text.split(",")]


def parser():
    ap = argparse.ArgumentParser(prog="python dev/decode_probe.py", description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("fixed", "blocks", "ab", "evict", "shapes", "launch"))
    ap.add_argument("--shapes", type=_shapes, default=_shapes(DEFAULT_SHAPES), help="KxN,... (ab, evict, shapes)")
    ap.add_argument("--m", dest="ms", type=_ints, default=[1, 2, 4, 8, 16], help="M values (ab, evict, shapes)")
    ap.add_argument("--points", type=_points, default=_points("8192x8192x1,8192x8192x4,8192x8192x16,28672x8192x1,"
                                                              "4096x12288x1,8192x57344x1"), help="KxNxM,... (blocks, launch)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--groups", type=_ints, default=[128, 32], help="group sizes (ab)")
    ap.add_argument("--old", help="(ab) the quick_decode.cu to compare against")
    ap.add_argument("--block-shapes", type=_block_shapes, default=[],
                    help="(shapes) nwarps:kw:mb:minb:chunks:stages,... DecodeShapes to time")
    ap.add_argument("--splits", type=_ints, default=[1, 2, 4], help="(shapes) split counts")
    ap.add_argument("--repeats", type=int, default=30)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.mode == "ab" and not args.old:
        parser().error("ab needs --old FILE")
    kernels.require_gpu()
    {"fixed": mode_fixed, "blocks": mode_blocks, "ab": mode_ab, "evict": mode_evict, "shapes": mode_shapes,
     "launch": mode_launch}[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

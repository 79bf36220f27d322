"""Is quick_sm90 faster as one m64 row block per warpgroup at wgmma N = 256 (docs/hopper.md)?

Times ``dev/quick_sm90_rowblock.cu`` (128 features x 256 tokens a block, 4 m64n256k16 per K step)
against today's quick_sm90 (its own launch plan) and ``cupy.matmul`` in fp16, like ``bench``:
event pairs behind a spin kernel, the packed weights rotated past L2. Split-K as quick_sm90's
"fill" rule (splits while the blocks stay within one wave), reduced by the package's splitk_reduce.

Checked first, on layers quantized from float weights: the experiment's output against the float64
reference of the dequantized weights (awkward shapes: rows past M, tile columns past N, group sizes
32-256 and -1, split-K) and, on the timed shapes, against quick_sm90's output.
From the checkout, on a Hopper GPU (the package's cuda/ is only read)::

    python dev/sm90_rowblock_probe.py [--shapes 8192x8192,4096x22016,11008x4096] [--m 256,1024,4096] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the checkout's quickcupy
sys.path.insert(0, str(ROOT / "dev"))

SOURCE = Path(__file__).resolve().parent / "quick_sm90_rowblock.cu"
THREADS, BT, TC, U = 256, 256, 4, 2        # as the .cu file's rb:: constants
STAGES = 5
SLOT = BT * 64 * 2 + TC * U * 512 + 1024


def smem_bytes(stages: int = STAGES) -> int:
    """The kernel's dynamic shared memory: 2 mbarriers a slot, 1 KB of alignment slack, the ring."""
    return 16 * stages + 1024 + stages * SLOT


def instance(group_size: int, K: int, dtype: str, stages: int = STAGES) -> str:
    gch = math.gcd(effective_group(group_size, K) // 32, U)
    return f"quick_sm90_rowblock<{stages}, {gch}, {'half' if dtype == 'float16' else '__nv_bfloat16'}>"


def effective_group(group_size: int, K: int) -> int:
    return K if group_size == -1 else group_size


def splits_for(M: int, N: int, K: int, sm_count: int) -> tuple:
    """(splits, chunks per split): as many K splits as keep the blocks within one wave."""
    tiles = -(-M // BT) * -(-N // (TC * 32))
    chunks = K // 32
    want = max(1, min(sm_count // tiles, chunks // U))
    cps = -(-chunks // want)
    cps = -(-cps // U) * U                    # whole K steps per split
    return -(-chunks // cps), cps


_MODULES = {}


def function(name: str):
    import cupy
    from quickcupy import kernels
    if name not in _MODULES:
        mod = cupy.RawModule(code=SOURCE.read_text(), options=kernels.compile_options("sm_90a"),
                             name_expressions=[name])
        fn = mod.get_function(name)
        fn.max_dynamic_shared_size_bytes = smem_bytes()
        _MODULES[name] = fn
    return _MODULES[name]


def launch(x, layer, y, sm_count: int, stages: int = STAGES):
    """y = x @ W.T with the experiment (layer: a quick-layout QuantLinear; y: (M, N) like x)."""
    from quickcupy import kernels, registry
    from quickcupy.dtypes import ctype
    M, K = x.shape
    N, G = layer.out_features, effective_group(layer.group_size, layer.in_features)
    gps = U // math.gcd(G // 32, U)
    rows, chunks, groups = N // 32, K // 32, K // G
    maps = (kernels.x_tensor_map(x.data.ptr, M, K, BT, x.dtype.name),
            kernels._tensor_map_2d(layer.qweight.data.ptr, "uint64", chunks * 64, rows, chunks * 512, U * 64, TC,
                                   kernels._SWIZZLE_NONE, "qweight"),
            kernels._tensor_map_2d(layer.scales.data.ptr, "uint64", groups * 8, rows, groups * 64, 8 * gps, TC,
                                   kernels._SWIZZLE_NONE, "scales"),
            kernels._tensor_map_2d(layer.qzeros.data.ptr, "uint64", groups * 2, rows, groups * 16, 2 * gps, TC,
                                   kernels._SWIZZLE_NONE, "qzeros"))
    splits, cps = splits_for(M, N, K, sm_count)
    tiles = -(-M // BT) * -(-N // (TC * 32))
    null = np.uint64(0)
    ws = kernels.workspace(layer.device)
    partial = ws.buffer("partials", splits * M * N, np.float32) if splits > 1 else null
    fn = function(instance(layer.group_size, K, x.dtype.name, stages))
    fn((tiles, 1, splits), (THREADS,), maps + (null, y, partial, np.int32(M), np.int32(N), np.int32(K),
                                                np.int32(G), np.int32(cps)), shared_mem=smem_bytes(stages))
    if splits > 1:
        reduce_fn = kernels.get_function(layer.device, "splitk_reduce.cu", f"splitk_reduce<{ctype(y.dtype)}>")
        threads = registry.SPLITK_REDUCE_THREADS
        reduce_fn((-(-(M * N // 4) // threads),), (threads,), (partial, null, y, np.int32(splits), np.int32(M),
                                                               np.int32(N)))
    return y


def check(sm_count: int, dtype: str) -> list:
    """Relative errors of the experiment against float64 on awkward shapes (fresh random data,
    outputs poisoned with NaN first)."""
    import cupy
    from quickcupy import QuantLinear, quantize
    from quickcupy.reference import reference_gemm, rel_error
    rng = np.random.default_rng(0)
    rows = []
    for M, K, N, G in ((1, 256, 128, 128), (300, 1024, 4096 + 96, 128), (257, 2048, 384, 32),
                       (600, 1536, 512, 96), (64, 4096, 1024, 256), (513, 1024, 640, -1), (1000, 8192, 256, 128)):
        w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
        q = quantize(w, G)
        layer = QuantLinear.from_quantized(q, "quick")
        x = (rng.standard_normal((M, K)) * 0.5).astype(np.float32)
        xg = cupy.asarray(x).astype(dtype)
        y = cupy.full((M, N), np.nan, dtype)
        launch(xg, layer, y, sm_count)
        err = rel_error(y.astype(np.float32), reference_gemm(xg.astype(np.float32).get(), q))
        rows.append((M, K, N, G, splits_for(M, N, K, sm_count)[0], err))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8192x8192,4096x22016,11008x4096", help="KxN weight shapes")
    p.add_argument("--m", default="256,1024,4096")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()

    import cupy
    from decode_probe import rotation
    from quickcupy import kernels
    from quickcupy.tools.timing import rotating, time_gpu

    sm_count = kernels.device_limits(0).sm_count
    bad = 0
    print(f"rowblock vs float64 ({args.dtype}): M K N group splits rel_error")
    for M, K, N, G, splits, err in check(sm_count, args.dtype):
        ok = err < (2e-3 if args.dtype == "float16" else 1.2e-2)
        bad += not ok
        print(f"  {M:5d} {K:5d} {N:5d} {G:4d} {splits:3d}  {err:.2e}  {'ok' if ok else 'WRONG'}")
    if bad:
        print("the experiment is wrong on some shapes: not timed")
        return 1
    dt = np.dtype(args.dtype)
    print(f"us per call (TFLOP/s), group {args.group_size}; 'diff' = max |rowblock - quick_sm90| / max |quick_sm90|")
    print(f"{'K x N':>12} {'M':>5} {'cuBLAS':>14} {'quick_sm90':>14} {'rowblock':>14} {'speedup':>8} {'diff':>9}")
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        cupy.random.seed(0)
        layers = rotation(K, N, args.group_size)
        w16 = [cupy.random.standard_normal((K, N), dtype=np.float32).astype(dt) for _ in range(3)]
        for M in (int(m) for m in args.m.split(",")):
            x = (cupy.random.standard_normal((M, K), dtype=np.float32) * 0.1).astype(dt)
            plan = kernels.plan("quick_sm90", M, N, K, args.group_size, kernels.device_limits(0), dtype=args.dtype)
            y0, y1 = cupy.empty((M, N), dt), cupy.empty((M, N), dt)
            cur = lambda layer: kernels.launch(plan, x, layer.qweight, layer.qzeros, layer.scales, None, y0,  # noqa: E731
                                               layer.device)
            new = lambda layer: launch(x, layer, y1, sm_count)  # noqa: E731
            ref = lambda w: cupy.matmul(x, w)  # noqa: E731
            t = [time_gpu(rotating(f, items), 10, args.repeats) * 1e6
                 for f, items in ((ref, w16), (cur, layers), (new, layers))]
            cur(layers[0])
            new(layers[0])
            a, b = y0.astype(np.float32), y1.astype(np.float32)
            diff = float(cupy.abs(a - b).max() / cupy.abs(a).max())
            fl = 2 * M * N * K / 1e6
            print(f"{K:>6}x{N:<6}{M:>5} {t[0]:8.1f} ({fl / t[0]:3.0f}) {t[1]:8.1f} ({fl / t[1]:3.0f}) "
                  f"{t[2]:8.1f} ({fl / t[2]:3.0f}) {t[1] / t[2]:7.2f}x {diff:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does any kernel access memory out of bounds or race on shared memory (under compute-sanitizer)?

A few GEMMs of every kernel, checked against the float64 reference. From the checkout, on a GPU:

    compute-sanitizer --tool memcheck  python dev/sanitize_gemm.py
    compute-sanitizer --tool racecheck python dev/sanitize_gemm.py --no-cublas
    compute-sanitizer --tool memcheck  python dev/sanitize_gemm.py --dtype bfloat16

``--dtype bfloat16``: bf16 activations, bias and output (the kernels without bf16 instances are
skipped).

``--kernels quick_sm90,...``: only these kernels (default: all of them).

``--no-cublas``: the dequant path runs only its own kernel (checked against the dequantized weight)
and skips cuBLAS, whose sm_90 kernels racecheck cannot follow (it reports hazards inside nvjet
kernels, or fails with an internal error when told to skip them).

Shapes cover split-K, row tails (M not a multiple of the tile), every tile size, group sizes
32/64/96/128/192/256/512/-1, bias and the warps of a block past N (N % 128 != 0).
"""
import sys
from pathlib import Path

import cupy
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's quickcupy

from quickcupy import QuantLinear, dtypes, gemm, kernels, quantize, reference_gemm, registry
from quickcupy.gemm import kernel_layout

CASES = [  # (M, K, N, group_size, tile_m, split_k)
    (1, 512, 320, 128, None, None),
    (300, 1056, 544, 96, None, 3),   # K not a multiple of 64, 3 row tiles, a feature tile mostly past N
    (8, 4608, 1024, 96, None, 5),
    (3, 4608, 1024, 192, None, None),
    (40, 4096, 512, 256, None, 3),
    (16, 4096, 512, 512, None, None),
    (7, 256, 192, 32, None, 3),
    (33, 384, 256, 64, 32, None),
    (100, 640, 448, -1, 64, 2),
    (130, 256, 128, 128, 128, 1),
]


def main() -> int:
    no_cublas = "--no-cublas" in sys.argv[1:]
    dtype = dtypes.np_dtype(sys.argv[sys.argv.index("--dtype") + 1] if "--dtype" in sys.argv else "float16")
    # every kernel design of the registry plus the dequant path (variants that only re-plan a design,
    # like quick_m16, or choose one, like auto, run no code of their own)
    names = tuple(registry.DESIGNS) + tuple(v.name for v in registry.VARIANTS.values() if v.path == "dequant")
    if "--kernels" in sys.argv:
        wanted = sys.argv[sys.argv.index("--kernels") + 1].split(",")
        if set(wanted) - set(names):
            raise SystemExit(f"--kernels: {sorted(set(wanted) - set(names))} not among {names}")
        names = tuple(wanted)
    rng = np.random.default_rng(0)
    worst = 0.0
    for M, K, N, G, tile_m, split_k in CASES:
        w = (rng.standard_normal((N, K)) * 0.05).astype(np.float16)
        bias = rng.standard_normal(N).astype(np.float32).astype(dtype)
        q = quantize(w, G)
        x = rng.standard_normal((M, K)).astype(np.float32).astype(dtype)
        ref = reference_gemm(x.astype(np.float64), q, bias.astype(np.float64))
        for kernel in names:
            if kernels.unsupported_reason(kernel, cupy.cuda.Device().id) or \
                    dtype.name not in registry.variant(kernel).design.dtypes:
                continue
            layout = kernel_layout(kernel)
            if layout == "awq" and (N % 64 or tile_m == 128):
                continue
            if kernel == "quick_decode" and M > 16:
                continue
            layer = QuantLinear.from_quantized(q, layout=layout, bias=bias)
            if kernel == "dequant" and no_cublas:
                w = kernels.dequantize(layer.qweight, layer.qzeros, layer.scales, N, K, layer.group_size,
                                       layer.device, out=cupy.full((N, K), np.nan, dtype))
                ref_w = q.dequantize(np.float64)
                err = float(np.linalg.norm(w.get().astype(np.float64) - ref_w) / np.linalg.norm(ref_w))
                worst = max(worst, err if np.isfinite(err) else np.inf)
                print(f"dequant (kernel only) K={K:4d} N={N:4d} G={G:4d}: rel err {err:.2e}")
                continue
            out = cupy.full((M, N), np.nan, dtype)
            plan = dict(tile_m=tile_m, split_k=split_k) if kernel in ("awq", "quick") else {}
            if kernel == "quick_sm90":
                plan = dict(tile_m=tile_m if tile_m in (64, 128) else None, split_k=split_k)
            gemm(cupy.asarray(x), layer, kernel, out=out, **plan)
            err = float(np.linalg.norm(out.get().astype(np.float64) - ref) / np.linalg.norm(ref))
            worst = max(worst, err if np.isfinite(err) else np.inf)
            print(f"{kernel:7s} M={M:4d} K={K:4d} N={N:4d} G={G:4d} tile_m={tile_m} split_k={split_k}: rel err {err:.2e}")
    cupy.cuda.Device().synchronize()
    print(f"{dtype.name}: worst relative error {worst:.2e}")
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())

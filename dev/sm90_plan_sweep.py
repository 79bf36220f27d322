"""Which quick_sm90 launch is fastest at each weight shape and M: every tile (rows per block) times
every split-K, beside the plan's own choice and cuBLAS fp16.

Each shape quantizes one random weight, makes enough copies of its packed layer to rotate past
twice the L2 (as ``bench`` does), and times ``gemm(x, layer, "quick_sm90", out, tile_m=, split_k=)``
with ``quickcupy.tools.timing`` (event pairs behind a spin kernel, median of ``--repeats``). Every
launch's output is checked against cuBLAS on the dequantized fp16 weight (the largest difference
over max |y|, as ``bench`` checks; above ``bench.WARN_REL_ERR`` the launch is marked BAD, not timed).
A split the plan clamps (too few K steps) is timed once, under the split it runs.

From the checkout, on a Hopper GPU::

    python dev/sm90_plan_sweep.py [--shapes 8192x8192,4096x4096,4096x22016,11008x4096] \\
        [--m 64,128,192,256,384] [--tiles 128,192,256] [--splits 1,2,3,4,6,8] [--repeats 20] [--json FILE]

One line per (shape, M): the plan's launch, the fastest one, cuBLAS, then every launch as
``tile/split:us``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the checkout's quickcupy

KERNEL = "quick_sm90"


def launches(M: int, N: int, K: int, group_size: int, tiles, splits, device) -> list:
    """The distinct (tile_m, split_k) launches of ``tiles`` x ``splits`` at this point, as the plan
    runs them (a split the plan clamps counted once, under the split it runs), tile by tile."""
    from quickcupy import kernels
    out = []
    for tm in tiles:
        for sk in splits:
            p = kernels.plan(KERNEL, M, N, K, group_size, device, tile_m=tm, split_k=sk)
            if (tm, p.split_k) not in out:
                out.append((tm, p.split_k))
    return out


def line(K: int, N: int, M: int, row: dict) -> str:
    """One table line of a point's measurements (``row`` as :func:`sweep_point` returns it)."""
    def us(v):
        return "BAD" if v is None else f"{v:.1f}"
    timed = {k: v for k, v in row["launches"].items() if v is not None}
    best = min(timed, key=timed.get) if timed else None
    each = " ".join(f"{k}:{us(v)}" for k, v in row["launches"].items())
    return (f"K={K} N={N} M={M}: plan {row['plan']} {us(row['launches'][row['plan']])} | best {best} "
            f"{us(timed.get(best))} | cuBLAS {row['cublas_us']:.1f} | {each}")


def sweep_point(x, y, y_ref, layers, fp16_weights, M, N, K, group_size, tiles, splits, repeats, device) -> dict:
    """{"plan": "tile/split", "cublas_us": us, "launches": {"tile/split": us or None (BAD)}} at one M."""
    import cupy

    from quickcupy import gemm, kernels
    from quickcupy.tools.bench import WARN_REL_ERR
    from quickcupy.tools.timing import rotating, time_gpu
    cupy.matmul(x, fp16_weights[0], out=y_ref)
    ref_max = float(cupy.abs(y_ref).max()) or 1.0
    cublas = time_gpu(rotating(lambda w: cupy.matmul(x, w, out=y), fp16_weights), 10, repeats) * 1e6
    p = kernels.plan(KERNEL, M, N, K, group_size, device)
    row = {"plan": f"{p.bm}/{p.split_k}", "cublas_us": cublas, "launches": {}}
    for tm, sk in launches(M, N, K, group_size, tiles, splits, device) + [(p.bm, p.split_k)]:
        key = f"{tm}/{sk}"
        if key in row["launches"]:
            continue
        y.fill(float("nan"))
        gemm(x, layers[0], KERNEL, y, tile_m=tm, split_k=sk)
        err = float(cupy.abs(y.astype(cupy.float32) - y_ref.astype(cupy.float32)).max()) / ref_max
        if not err <= WARN_REL_ERR:
            row["launches"][key] = None
            continue
        call = rotating(lambda layer, tm=tm, sk=sk: gemm(x, layer, KERNEL, y, tile_m=tm, split_k=sk), layers)
        row["launches"][key] = time_gpu(call, 10, repeats) * 1e6
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x8192,4096x4096,4096x22016,11008x4096", help="KxN weight shapes")
    ap.add_argument("--m", default="64,128,192,256,384")
    ap.add_argument("--tiles", default=None, help="rows per block (default: every quick_sm90 tile)")
    ap.add_argument("--splits", default="1,2,3,4,6,8")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the points here")
    args = ap.parse_args(argv)
    from quickcupy import registry
    from quickcupy.tools.common import UsageError, parse_int_list, parse_ms, parse_shapes
    try:
        shapes, ms, splits = parse_shapes(args.shapes), parse_ms(args.m), parse_int_list("--splits", args.splits, 1)
        tiles = parse_int_list("--tiles", args.tiles, 1) if args.tiles else None
    except UsageError as err:
        raise SystemExit(str(err)) from None
    have = sorted(registry.design_of(KERNEL).tiles)
    tiles = tiles or have
    if set(tiles) - set(have):
        raise SystemExit(f"--tiles: {KERNEL} has {have}-row tiles, not {sorted(set(tiles) - set(have))}")
    from quickcupy import device as _device
    if _device.no_gpu_reason():
        raise SystemExit(f"needs a CUDA GPU: {_device.no_gpu_reason()}")
    import cupy
    import numpy as np

    from quickcupy import QuantLinear, kernels
    from quickcupy.tools.bench import _dequantized_fp16, host_quantize_pack
    from quickcupy.tools.bench_report import rotation_copies, weight_bytes
    reason = kernels.unsupported_reason(KERNEL, cupy.cuda.Device().id)
    if reason:
        raise SystemExit(f"{KERNEL}: {reason}")
    G = args.group_size
    device = kernels.device_limits(cupy.cuda.Device().id)
    l2 = cupy.cuda.Device().attributes["L2CacheSize"]
    print(f"# dev/sm90_plan_sweep.py {' '.join(sys.argv[1:] if argv is None else argv)}; "
          f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, us per call, fp16, group {G}")
    points = []
    for K, N in shapes:
        rng = np.random.default_rng(0)
        q, _ = host_quantize_pack(K, N, G)      # bench's random weight, quantized on the host
        first = QuantLinear.from_quantized(q, "quick")
        layers = [first] + [first.copy() for _ in range(rotation_copies(weight_bytes("int4", K, N, G), l2) - 1)]
        w = _dequantized_fp16(q)
        fp16_weights = [w] + [w.copy() for _ in range(rotation_copies(weight_bytes("fp16", K, N, G), l2) - 1)]
        x_all = cupy.asarray(rng.standard_normal((max(ms), K), dtype=np.float32)).astype(cupy.float16)
        y_all, y_ref_all = cupy.empty((max(ms), N), cupy.float16), cupy.empty((max(ms), N), cupy.float16)
        for M in ms:
            row = sweep_point(x_all[:M], y_all[:M], y_ref_all[:M], layers, fp16_weights, M, N, K, G,
                              tiles, splits, args.repeats, device)
            print(line(K, N, M, row), flush=True)
            points.append({"K": K, "N": N, "M": M, **row})
        del layers, fp16_weights, x_all, y_all, y_ref_all, w
        cupy.get_default_memory_pool().free_all_blocks()
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "points": points}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

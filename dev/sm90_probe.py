"""Where does quick_sm90's time go, and is an edit of it faster? Timed variants of the kernel.

quick_sm90 (cuda/quick_sm90.cu) timed alone like ``bench`` (event pairs behind a spin kernel, the
weights rotated past L2) at chosen shapes and M, as:

- ``current``: today's kernel and launch plan;
- each edit of ``EDITS``, compiled from an edited copy of cuda/ in a temporary folder:
  ``issuer-0`` (thread 0 issues every K step's TMA boxes, instead of lane 0 of warp it % 8),
  ``no-dequant`` (the A fragments are the packed words themselves: the loads stay, the
  dequantization's arithmetic goes), ``no-wgmma`` (no wgmma: the fragments are folded into the
  accumulators so nothing is dead; what the copies, barriers and dequantization cost alone);
  the last two compute nonsense and are timed only;
- ``stages-S`` for each ``--stages`` S: today's source with the ring S slots deep (a Tile override).

From the checkout, on a Hopper GPU (the package's cuda/ is never written)::

    python dev/sm90_probe.py [--shapes 8192x8192,4096x22016,11008x4096] [--m 256,1024,4096] [--stages 4,6] [--rounds 2]

Each variant runs in its own process (the loader reads ``$QUICKCUPY_CUDA_DIR`` once), the list
``--rounds`` times over in the same order, so drift shows. ``current`` and the variants that keep
the arithmetic are checked against ``current``'s output.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the checkout's quickcupy

import source_variants  # noqa: E402  (dev/, beside this file)

# Named edits of cuda/quick_sm90.cu: (text found exactly once, its replacement).
EDITS = {
    "issuer-0": [("tid == 32 * (it % WARPS)", "tid == 0")],
    "no-dequant": [("        D::dequant8(words[j], zz, sj, h[j]);",
                    "        for (int r = 0; r < 4; ++r) h[j][r] = words[j] >> r;")],
    "no-wgmma": [("      for (int b = 0; b < RB; ++b) wgmma_rs<BT, T>(acc[b], cur[b][s], wgmma_desc_sw128(x + 32 * s));",
                  "      for (int b = 0; b < RB; ++b)\n"
                  "        acc[b][s] += __uint_as_float((cur[b][s][0] ^ cur[b][s][1] ^ cur[b][s][2] ^ cur[b][s][3]"
                  " ^ (x + 32 * s)) & 0x007fffffu);")],
}
CHECKED = ("issuer-0",)          # edits that keep the arithmetic: output compared with current's


def edited(source: str, name: str) -> str:
    """``source`` with the edits of ``EDITS[name]`` applied (RuntimeError if a text is not there
    exactly once)."""
    return source_variants.edited(source, EDITS[name], f"quick_sm90.cu, {name}")


def parse_shapes(text: str) -> list:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def measure(args) -> list:
    """Every (shape, M) point of one variant in this process: us per call and an output checksum."""
    import cupy
    import numpy as np

    from decode_probe import rotation   # random packed QUICK layers made on the GPU, rotated past L2
    from quickcupy import kernels, registry
    from quickcupy.tools.timing import rotating, time_gpu

    design = registry.DESIGNS["quick_sm90"]
    out = []
    for K, N in parse_shapes(args.shapes):
        cupy.random.seed(0)
        layers = rotation(K, N, args.group_size)
        first, G = layers[0], args.group_size
        for M in (int(m) for m in args.m.split(",")):
            tile = None
            if args.stages:
                tile = dataclasses.replace(design.tiles[design.tile_m(M)], stages=args.stages)
            p = kernels.plan("quick_sm90", M, N, K, G, kernels.device_limits(0), tile=tile)
            if p.shared_bytes > kernels.device_limits(0).smem_per_block:   # a ring too deep for this tile
                out.append({"K": K, "N": N, "M": M, "us": float("nan"), "tflops": float("nan"),
                            "checksum": float("nan"), "instance": f"{p.name}: does not fit"})
                continue
            x = (cupy.random.standard_normal((M, K), dtype=np.float32) * 0.1).astype(np.float16)
            y = cupy.empty((M, N), np.float16)
            call = lambda layer: kernels.launch(p, x, layer.qweight, layer.qzeros, layer.scales, None, y,  # noqa: E731
                                                layer.device)
            us = time_gpu(rotating(call, layers), 10, args.repeats) * 1e6
            call(first)
            out.append({"K": K, "N": N, "M": M, "us": us, "tflops": 2 * M * N * K / us / 1e6,
                        "checksum": float(cupy.abs(y.astype(np.float32)).sum()), "instance": p.name})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8192x8192,4096x22016,11008x4096", help="KxN weight shapes")
    p.add_argument("--m", default="256,1024,4096")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--stages", default="4,6", help="ring depths to try besides the plan's ('' for none)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2, help="times the whole list of variants runs")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # a child: measure and print JSON
    args = p.parse_args()
    if args.one:                  # --stages: one depth, or '' for the plan's
        args.stages = int(args.stages) if args.stages else 0
        print(json.dumps(measure(args)))
        return 0
    base = [sys.executable, __file__, "--one", "--shapes", args.shapes, "--m", args.m,
            "--group-size", str(args.group_size), "--repeats", str(args.repeats), "--stages", ""]
    source = (ROOT / "cuda" / "quick_sm90.cu").read_text()
    variants = {"current": (None, [])}
    variants.update({name: (edited(source, name), []) for name in EDITS})
    variants.update({f"stages-{s}": (None, ["--stages", s]) for s in args.stages.split(",") if s})
    results = source_variants.run(base, "quick_sm90.cu", variants, args.rounds)
    print(f"quick_sm90 variants, group {args.group_size}, fp16; us per call in each of {args.rounds} rounds "
          f"(TFLOP/s of the last); 'same' = output as current's")
    points = results["current"][0]
    for i, pt in enumerate(points):
        print(f"K={pt['K']} N={pt['N']} M={pt['M']} ({pt['instance']})")
        for name, runs in results.items():
            r = [run[i] for run in runs]
            times = "  ".join(f"{x['us']:8.1f}" for x in r)
            same = ("same" if all(abs(x["checksum"] - pt["checksum"]) <= 1e-3 * abs(pt["checksum"]) for x in r)
                    else "DIFFERS") if name in CHECKED or name.startswith("stages") else "timing only"
            print(f"  {name:11s} {times}  {r[-1]['tflops']:6.0f}  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

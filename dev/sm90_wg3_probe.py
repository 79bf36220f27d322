"""Does quick_sm90 run faster with more warps per scheduler? Times ``dev/quick_sm90_wg3.cu``.

The experiment (see its header) gives a block WGS warpgroups of one m64 row block each, BT tokens
(wgmma N): ``--configs BTxWGS,...``, e.g. 192x3 (192 features x 192 tokens, 3 warps per scheduler),
128x3, 128x4 (256 x 128, 4 warps per scheduler) and 256x2 (quick_sm90's own 256-token tile, the
control); a suffix sS sets the ring's slots (64x2s7: 7 slots, so that two blocks share an SM).
Each config runs the deepest ring that fits one block an SM (at most 8 slots) unless told, and
split-K as quick_sm90's "fill" rule (splits while the blocks stay within one wave of as many blocks
as an SM holds, from the compiled kernel's registers and shared memory), reduced by the package's
splitk_reduce.

Checked first, every config on layers quantized from float weights against the float64 reference
of the dequantized weights (awkward shapes: rows past M, tile columns past N, group sizes 32-256
and -1, split-K); a config that is wrong anywhere is not timed. Then timed like ``bench`` (event
pairs behind a spin kernel, the packed weights rotated past L2) against today's quick_sm90 (its own
plan), ``cupy.matmul`` and, at M <= 16, quick_decode, in fp16 or bf16. From the checkout, on a Hopper GPU::

    python dev/sm90_wg3_probe.py [--configs 192x3,128x3,128x4,256x2] [--shapes 8192x8192,4096x22016,11008x4096] \
        [--m 256,1024,4096] [--dtype bfloat16]
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

SOURCE = Path(__file__).resolve().parent / "quick_sm90_wg3.cu"
U = 2                                         # 32-deep chunks per K step (WG3_U)
SMEM_LIMIT = 227 * 1024                       # a block's shared memory
SM_SMEM = 228 * 1024                          # an SM's


class Config:
    """One instance shape: BT tokens, WGS warpgroups (64 features each), S ring slots ("BTxWGS" takes
    the deepest ring that fits one block an SM, at most 8; "BTxWGSsS" takes S, e.g. 64x2s7 so that
    two blocks share an SM)."""

    def __init__(self, text: str):
        shape, _, stages = text.partition("s")
        self.bt, self.wgs = (int(v) for v in shape.split("x"))
        if self.bt not in (64, 128, 192, 256) or not 1 <= self.wgs <= 4:
            raise SystemExit(f"--configs {text}: BT must be 64, 128, 192 or 256 and WGS 1-4")
        self.threads, self.tcols = 128 * self.wgs, 2 * self.wgs
        self.bn = 32 * self.tcols
        self.slot = self.bt * 128 + self.tcols * U * 512 + 2048
        self.stages = int(stages) if stages else min(8, (SMEM_LIMIT - 1024) // (self.slot + 16))
        if not 3 <= self.stages <= 8 or self.smem() > SMEM_LIMIT:
            raise SystemExit(f"--configs {text}: {self.stages} slots do not fit (3-8 slots, {SMEM_LIMIT} bytes)")
        self.name = text

    def smem(self) -> int:
        return 16 * self.stages + 1024 + self.stages * self.slot

    def instance(self, group_size: int, dtype: str) -> str:
        gch = math.gcd(group_size // 32, U)
        return (f"quick_sm90_wg<{self.bt}, {self.wgs}, {self.stages}, {gch}, "
                f"{'half' if dtype == 'float16' else '__nv_bfloat16'}>")

    def per_sm(self, num_regs: int) -> int:
        """Blocks an SM holds at ``num_regs`` registers a thread (allocated in 8s), by shared memory
        (1 KB reserved a block), registers and threads."""
        return min(SM_SMEM // (self.smem() + 1024), 65536 // (-(-num_regs // 8) * 8 * self.threads),
                   2048 // self.threads)

    def splits(self, M: int, N: int, K: int, sm_count: int, per_sm: int = 1) -> tuple:
        """(splits, chunks per split): as many K splits as keep the blocks within one wave of
        ``per_sm`` blocks an SM."""
        tiles = -(-M // self.bt) * -(-N // self.bn)
        chunks = K // 32
        want = max(1, min(per_sm * sm_count // tiles, chunks // (2 * U)))
        cps = -(-(-(-chunks // want)) // U) * U
        return -(-chunks // cps), cps


_FUNCTIONS = {}


def function(cfg: Config, name: str):
    import cupy
    from quickcupy import kernels
    if name not in _FUNCTIONS:
        mod = cupy.RawModule(code=SOURCE.read_text(), options=kernels.compile_options("sm_90a"),
                             name_expressions=[name])
        fn = mod.get_function(name)
        fn.max_dynamic_shared_size_bytes = cfg.smem()
        _FUNCTIONS[name] = fn
        print(f"  {name}: {fn.num_regs} registers, {cfg.per_sm(fn.num_regs)} block(s) an SM")
    return _FUNCTIONS[name]


def launch(cfg: Config, x, layer, y, sm_count: int):
    """y = x @ W.T with the experiment (layer: a quick-layout QuantLinear; y: (M, N) like x); the
    number of K splits it ran."""
    import dataclasses

    from quickcupy import kernels, registry
    from quickcupy.dtypes import ctype
    M, K = x.shape
    N = layer.out_features
    G = K if layer.group_size == -1 else layer.group_size
    # quick_sm90's maps for this block shape: x in boxes of BT rows, the packed tensors in boxes of
    # the block's tile columns (kernels.gemm_tensor_maps reads bm, bn, the K step and the group size)
    shape = dataclasses.replace(kernels.plan("quick_sm90", M, N, K, G), bm=cfg.bt, bn=cfg.bn)
    maps = kernels.gemm_tensor_maps(shape, x, layer.qweight, layer.qzeros, layer.scales)
    fn = function(cfg, cfg.instance(G, x.dtype.name))
    splits, cps = cfg.splits(M, N, K, sm_count, cfg.per_sm(fn.num_regs))
    tiles = -(-M // cfg.bt) * -(-N // cfg.bn)
    null = np.uint64(0)
    partial = kernels.workspace(layer.device).buffer("partials", splits * M * N, np.float32) if splits > 1 else null
    fn((tiles, 1, splits), (cfg.threads,), maps + (null, y, partial, np.int32(M), np.int32(N), np.int32(K),
                                                    np.int32(G), np.int32(cps)), shared_mem=cfg.smem())
    if splits > 1:
        reduce_fn = kernels.get_function(layer.device, "splitk_reduce.cu", f"splitk_reduce<{ctype(y.dtype)}>")
        threads = registry.SPLITK_REDUCE_THREADS
        reduce_fn((-(-(M * N // 4) // threads),), (threads,), (partial, null, y, np.int32(splits), np.int32(M),
                                                               np.int32(N)))
    return splits


CHECK_SHAPES = ((1, 256, 128, 128), (300, 1024, 4096 + 96, 128), (257, 2048, 384, 32), (600, 1536, 512, 96),
                (64, 4096, 1024, 256), (513, 1024, 640, -1), (1000, 8192, 256, 128))


def check(cfg: Config, sm_count: int, dtype: str) -> list:
    """(M, K, N, group, splits, relative error) against float64 on CHECK_SHAPES (fresh random data,
    outputs poisoned with NaN first)."""
    import cupy
    from quickcupy import QuantLinear, quantize
    from quickcupy.reference import reference_gemm, rel_error
    rng = np.random.default_rng(0)
    rows = []
    for M, K, N, G in CHECK_SHAPES:
        q = quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, G)
        layer = QuantLinear.from_quantized(q, "quick")
        xg = cupy.asarray((rng.standard_normal((M, K)) * 0.5).astype(np.float32)).astype(dtype)
        y = cupy.full((M, N), np.nan, dtype)
        splits = launch(cfg, xg, layer, y, sm_count)
        err = rel_error(y.astype(np.float32), reference_gemm(xg.astype(np.float32).get(), q))
        rows.append((M, K, N, G, splits, err))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="192x3,128x3,128x4,256x2", help="BTxWGS instance shapes")
    p.add_argument("--shapes", default="8192x8192,4096x22016,11008x4096", help="KxN weight shapes")
    p.add_argument("--m", default="256,1024,4096")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()

    import cupy
    from decode_probe import rotation

    import quickcupy
    from quickcupy import kernels
    from quickcupy.tools.timing import rotating, time_gpu

    sm_count = kernels.device_limits(0).sm_count
    configs = []
    for cfg in (Config(c) for c in args.configs.split(",") if c):
        print(f"{cfg.name} ({cfg.bn} features x {cfg.bt} tokens, {cfg.threads} threads, {cfg.stages} slots, "
              f"{cfg.smem()} bytes) vs float64 ({args.dtype}): M K N group splits rel_error")
        bad = 0
        for M, K, N, G, splits, err in check(cfg, sm_count, args.dtype):
            ok = err < (2e-3 if args.dtype == "float16" else 1.2e-2)
            bad += not ok
            print(f"  {M:5d} {K:5d} {N:5d} {G:4d} {splits:3d}  {err:.2e}  {'ok' if ok else 'WRONG'}")
        if bad:
            print(f"  {cfg.name} is wrong on some shapes: not timed")
        else:
            configs.append(cfg)
    if not configs:
        return 1
    dt = np.dtype(args.dtype)
    print(f"\nus per call, group {args.group_size}, {args.dtype}; (x) = quick_sm90's time / the config's; "
          f"'diff' = the largest max |config - quick_sm90| / max |quick_sm90|")
    print(f"{'K x N':>12} {'M':>5} {'cuBLAS':>8} {'decode':>8} {'quick_sm90':>10} "
          + " ".join(f"{c.name:>15}" for c in configs)
          + f" {'diff':>9}")
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        cupy.random.seed(0)
        layers = rotation(K, N, args.group_size)
        w16 = [cupy.random.standard_normal((K, N), dtype=np.float32).astype(dt) for _ in range(3)]
        for M in (int(m) for m in args.m.split(",")):
            x = (cupy.random.standard_normal((M, K), dtype=np.float32) * 0.1).astype(dt)
            plan = kernels.plan("quick_sm90", M, N, K, args.group_size, kernels.device_limits(0), dtype=args.dtype)
            y0 = cupy.empty((M, N), dt)
            cur = lambda layer: kernels.launch(plan, x, layer.qweight, layer.qzeros, layer.scales, None, y0,  # noqa: E731
                                               layer.device)
            t_ref = time_gpu(rotating(lambda w: cupy.matmul(x, w), w16), 10, args.repeats) * 1e6
            t_cur = time_gpu(rotating(cur, layers), 10, args.repeats) * 1e6
            # quick_decode (M <= 16), the kernel auto runs there today
            t_dec = (time_gpu(rotating(lambda layer: quickcupy.gemm(x, layer, kernel="quick_decode"), layers), 10,
                              args.repeats) * 1e6 if M <= 16 else float("nan"))
            cur(layers[0])
            ref = y0.astype(np.float32)
            cells, diff = [], 0.0
            for cfg in configs:
                y1 = cupy.empty((M, N), dt)
                new = lambda layer, cfg=cfg, y1=y1: launch(cfg, x, layer, y1, sm_count)  # noqa: E731
                t = time_gpu(rotating(new, layers), 10, args.repeats) * 1e6
                new(layers[0])
                diff = max(diff, float(cupy.abs(y1.astype(np.float32) - ref).max() / cupy.abs(ref).max()))
                cells.append(f"{t:8.1f} ({t_cur / t:4.2f})")
            print(f"{K:>6}x{N:<6}{M:>5} {t_ref:8.1f} {t_dec:8.1f} {t_cur:10.1f} " + " ".join(f"{c:>15}" for c in cells)
                  + f" {diff:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

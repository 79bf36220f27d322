"""Does any kernel access memory out of bounds or race on shared memory (under compute-sanitizer)?

A few GEMMs of every kernel, checked against the float64 reference; then the Llama step's kernels:
decode attention (plain and fused-rope modes, sliding window, several tiles, GQA and MHA), the small
ops, quick_decode's fused prologues and epilogue, and a captured decode step of a tiny model
(programmatic dependent launch on sm_90), replayed.
From the checkout, on a GPU:

    compute-sanitizer --tool memcheck  python dev/sanitize.py
    compute-sanitizer --tool racecheck python dev/sanitize.py --no-cublas
    compute-sanitizer --tool memcheck  python dev/sanitize.py --dtype bfloat16

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
    (257, 2048, 160, 32, None, None),   # quick_sm90's 256-token tiles: 2 row tiles, 5 tile columns
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
                plan = dict(tile_m=tile_m if tile_m in registry.design_of(kernel).tiles else None, split_k=split_k)
            gemm(cupy.asarray(x), layer, kernel, out=out, **plan)
            err = float(np.linalg.norm(out.get().astype(np.float64) - ref) / np.linalg.norm(ref))
            worst = max(worst, err if np.isfinite(err) else np.inf)
            print(f"{kernel:7s} M={M:4d} K={K:4d} N={N:4d} G={G:4d} tile_m={tile_m} split_k={split_k}: rel err {err:.2e}")
    if "--kernels" not in sys.argv:
        worst = max(worst, llama_kernels(dtype, rng))
    cupy.cuda.Device().synchronize()
    print(f"{dtype.name}: worst relative error {worst:.2e}")
    return 0 if worst < 1e-2 else 1


def _rel(a, ref) -> float:
    err = float(np.linalg.norm(np.asarray(a, np.float64) - ref) / np.linalg.norm(ref))
    return err if np.isfinite(err) else np.inf


def llama_kernels(dtype, rng) -> float:
    """The decode step's kernels against NumPy, then a captured tiny-model decode step replayed
    against eager. Returns the worst relative error."""
    from quickcupy.attention import decode_attention, decode_attention_rope
    from quickcupy.llama import LlamaConfig, LlamaModel, ops, random_head, random_layers
    from quickcupy.llama.model import apply_rope, attention, rms_norm, rope_tables
    worst = 0.0
    # (batch, heads, kv heads, head_dim, cached positions after the new one, max_len, window)
    for B, nh, nkv, d, length, max_len, window in ((1, 8, 8, 128, 300, 304, None), (2, 8, 2, 64, 40, 48, 16),
                                                    (3, 4, 1, 128, 129, 136, 100)):
        keys = rng.standard_normal((B, nkv, d, max_len)).astype(np.float32)
        values = rng.standard_normal((B, nkv, max_len, d)).astype(np.float32)
        qkv = rng.standard_normal((B, nh + 2 * nkv, d)).astype(np.float32)
        cos, sin = rope_tables(LlamaConfig(hidden_size=nh * d, intermediate_size=64, num_attention_heads=nh,
                                           num_key_value_heads=nkv, num_hidden_layers=1), np.arange(max_len))
        to = lambda a: cupy.asarray(a.astype(dtype))  # noqa: E731
        k_dev, v_dev = to(keys), to(values)
        out = decode_attention_rope(to(qkv), k_dev, v_dev, cupy.asarray(cos), cupy.asarray(sin), nh, length,
                                    window=window)
        # NumPy: the same rotation and cache write, then causal attention of the last position
        qk = apply_rope(qkv[:, None, :nh + nkv].astype(dtype).astype(np.float32), cos[length - 1:length],
                        sin[length - 1:length])
        keys[..., length - 1] = qk[:, 0, nh:]
        values[:, :, length - 1] = qkv[:, nh + nkv:].astype(dtype).astype(np.float32)
        ref = attention(qk[:, :, :nh], qk[:, :, nh:], qkv[:, None, nh + nkv:], length - 1,
                        (keys.astype(dtype).astype(np.float32), values.astype(dtype).astype(np.float32)),
                        window=window, written=True)
        err = _rel(out.get().reshape(B, -1), ref.reshape(B, -1))
        plain = decode_attention(to(qk[:, 0, :nh]), k_dev, v_dev, length, window=window)
        err = max(err, _rel(plain.get().reshape(B, -1), ref.reshape(B, -1)))
        worst = max(worst, err)
        print(f"decode attention B={B} heads={nh}/{nkv} d={d} length={length} window={window}: rel err {err:.2e}")
    x = rng.standard_normal((3, 4096)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(4096)).astype(np.float32)
    delta = rng.standard_normal((3, 4096)).astype(np.float32)
    xd = cupy.asarray(x.astype(dtype))
    h = ops.add_rms_norm(xd, cupy.asarray(w.astype(dtype)), 1e-5, cupy.asarray(delta.astype(dtype)))
    ref = rms_norm((x.astype(dtype).astype(np.float32) + delta.astype(dtype).astype(np.float32)), w, 1e-5)
    gu = rng.standard_normal((3, 2 * 1024)).astype(np.float32)
    s = ops.silu_mul(cupy.asarray(gu.astype(dtype)))
    g32 = gu.astype(dtype).astype(np.float32)
    ref_s = g32[:, :1024] / (1 + np.exp(-g32[:, :1024])) * g32[:, 1024:]
    err = max(_rel(h.get(), ref), _rel(s.get(), ref_s))
    top = ops.argmax_rows(cupy.asarray(gu.astype(dtype)))
    err = max(err, 0.0 if np.array_equal(top.get(), np.argmax(gu.astype(dtype), axis=1)) else np.inf)
    worst = max(worst, err)
    print(f"llama ops (add_rms_norm, silu_mul, argmax_rows): rel err {err:.2e}")
    # quick_decode's fused prologues (RMSNorm, SiLU * up) and residual epilogue: M = 1 runs the
    # register pipeline (all three fused), M = 3 the ring (the residual fused); split-K and not
    q = quantize((rng.standard_normal((512, 1024)) * 0.05).astype(np.float32), 128)
    layer = QuantLinear.from_quantized(q)
    W = q.dequantize(np.float64)
    nw = (1 + 0.1 * rng.standard_normal(1024)).astype(np.float32)
    for M in (1, 3):
        x = rng.standard_normal((M, 1024)).astype(np.float32).astype(dtype)
        r = rng.standard_normal((M, 512)).astype(np.float32).astype(dtype)
        gu = rng.standard_normal((M, 2048)).astype(np.float32).astype(dtype)
        x64, g64, u64 = x.astype(np.float64), gu[:, :1024].astype(np.float64), gu[:, 1024:].astype(np.float64)
        refs = {"norm": rms_norm(x64, nw, 1e-5) @ W.T, "silu_mul": (g64 / (1 + np.exp(-g64)) * u64) @ W.T,
                "residual": r.astype(np.float64) + x64 @ W.T}
        for split_k in (None, 3):
            for case, ref in refs.items():
                out = cupy.full((M, 512), np.nan, dtype)
                arg = cupy.asarray(gu if case == "silu_mul" else x)
                fused = {"norm": {"norm": (cupy.asarray(nw.astype(dtype)), 1e-5)}, "silu_mul": {"silu_mul": True},
                         "residual": {"residual": cupy.asarray(r)}}[case]
                gemm(arg, layer, "quick_decode", out=out, split_k=split_k, **fused)
                err = _rel(out.get(), ref)
                worst = max(worst, err)
                print(f"quick_decode {case} M={M} split_k={split_k}: rel err {err:.2e}")
    # a tiny model's captured decode step against its eager step
    config = LlamaConfig.preset("tiny")
    head = random_head(config, 512, seed=1)
    head.lm_head = quantize(head.lm_head, 64)      # a 4-bit head: no cuBLAS (racecheck cannot follow it)
    model = LlamaModel(config, [w.quantized(64) for w in random_layers(config, seed=0)], "auto", 64, head=head,
                       dtype=dtype.name)
    for batch in (1, 2):      # batch 1: the down GEMM runs SiLU * up in its prologue
        ids = rng.integers(0, 512, (batch, 12))
        graph = model.generate(ids, 6, graph=True)
        eager = model.generate(ids, 6, graph=False)
        same = np.array_equal(graph, eager)
        worst = max(worst, 0.0 if same else np.inf)
        print(f"tiny model decode, batch {batch}: graph replay {'equals' if same else 'DIFFERS FROM'} eager over 6 tokens")
    return worst


if __name__ == "__main__":
    sys.exit(main())

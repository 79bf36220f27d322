"""``python -m quickcupy accuracy``: relative error of every kernel against float64, fp16 and bf16.

For each M: one AWQ-quantized random weight (K x N, group G) and random activations, rounded to
each dtype; the reference is float64 of those very inputs (:func:`quickcupy.reference_gemm`). Each
kernel's ``||y - ref|| / ||ref||`` is shown next to the *floor*, the error of rounding the float64
result itself to the dtype (no kernel can do better), and the bf16/fp16 ratio. Three NumPy rows
show where bf16's zero-point/scale arithmetic can go (each then multiplied exactly, output rounded
to bf16): the weights as the kernels make them (each (code - zero) * scale rounded once to bf16,
:func:`dequant_bf16`); the scale rounded to bf16 first, then the product rounded again; and the
naive zero-point path, code * s - zero * s with s, both products and the difference in bf16.
"""
from __future__ import annotations

import argparse

import numpy as np

from .. import device, dtypes, kernels, registry
from ..gemm import KERNELS as ALL
from ..gemm import QuantLinear, gemm
from ..quantize import quantize
from ..reference import reference_gemm, rel_error
from .common import (UsageError, check_output_path, deprecated, parse_group_size, parse_int, parse_ms, parse_names,
                     parse_shapes, table)


def split_scale_bf16(scales):
    """fp16 scales -> (hi, lo) bf16 arrays with hi + lo == scale exactly (ScaleBf2 in
    cuda/quant_common.cuh: hi the nearest bf16, lo the exact remainder)."""
    s = np.asarray(scales, np.float16).astype(np.float32)
    hi = s.astype(dtypes.np_dtype("bfloat16"))
    return hi, (s - hi.astype(np.float32)).astype(dtypes.np_dtype("bfloat16"))


def dequant_bf16(d, scales):
    """bf16 weights of integer ``d`` = code - zero and fp16 ``scales`` as the kernels compute them:
    fma(d, hi, d * lo) in bf16, emulated in float64 (d * lo and d * hi + d * lo are exact there,
    so the one bf16 rounding is the fma's)."""
    hi, lo = split_scale_bf16(scales)
    d = np.asarray(d, np.float64)
    prod_lo = (d * lo.astype(np.float64)).astype(dtypes.np_dtype("bfloat16")).astype(np.float64)
    return (d * hi.astype(np.float64) + prod_lo).astype(dtypes.np_dtype("bfloat16"))


def _round_bf16(a):
    return np.asarray(a, np.float64).astype(dtypes.np_dtype("bfloat16")).astype(np.float64)


def emulated_bf16_weights(q) -> dict:
    """bf16 weights (N, K), as float64, of a QuantizedWeight made three ways: the kernels' (each
    (code - zero) * scale rounded once), the scale rounded to bf16 before the product, and the naive
    zero-point path code * s - zero * s with s, both products and the difference rounded to bf16."""
    N, K, G = q.out_features, q.in_features, q.group_size
    codes = q.codes.reshape(N, K // G, G).astype(np.float64)
    zeros = q.zeros[..., None].astype(np.float64)
    scales = q.scales[..., None]
    s_bf16 = _round_bf16(scales)
    return {"weights rounded once (the kernels')":
                dequant_bf16(codes - zeros, np.broadcast_to(scales, codes.shape)).astype(np.float64).reshape(N, K),
            "bf16(scale), then bf16(product)": _round_bf16((codes - zeros) * s_bf16).reshape(N, K),
            "naive zero point: bf16(code*s) - bf16(zero*s)":
                _round_bf16(_round_bf16(codes * s_bf16) - _round_bf16(zeros * s_bf16)).reshape(N, K)}


DEFAULT_SHAPES = "4096x4096"


def add_parser(subparsers):
    p = subparsers.add_parser(
        "accuracy", help="relative error vs float64 of every kernel, fp16 and bf16",
        description="For each weight shape and M, every kernel's relative error against float64 of the same "
                    "rounded inputs, in fp16 and in bf16, next to the error of rounding the exact result to the "
                    "dtype (the floor no kernel can beat). Needs a GPU.")
    p.add_argument("--shapes", default=None, help=f"comma-separated KxN weight shapes; default: {DEFAULT_SHAPES}")
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)     # deprecated spelling of --shapes
    p.add_argument("--m", default="1,16,256", help="comma-separated M values (rows of x); default: %(default)s")
    p.add_argument("--group-size", default="128", help="default: %(default)s")
    p.add_argument("--kernels", default=None,
                   help="comma-separated kernels; default: every gemm kernel this GPU can run")
    p.add_argument("--seed", default="0", help="default: %(default)s")
    p.add_argument("--out", metavar="PATH", help="also write the table (with the command) to PATH")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.shape is None:
        shapes = parse_shapes(DEFAULT_SHAPES if args.shapes is None else args.shapes)
    elif args.shapes is not None:
        raise UsageError("--shape is the old spelling of --shapes; give --shapes only")
    else:
        deprecated("accuracy", f"--shape {args.shape}", f"--shapes {args.shape}")
        shapes = parse_shapes(args.shape, "--shape")
    ms = parse_ms(args.m)
    G = parse_group_size("--group-size", args.group_size, [K for K, _ in shapes])
    names = tuple(ALL) if args.kernels is None else parse_names("--kernels", args.kernels, tuple(ALL))
    seed = parse_int("--seed", args.seed, 0)
    check_output_path("--out", args.out)
    reason = device.no_gpu_reason()
    if reason is not None:
        print(f"accuracy needs a CUDA GPU: {reason}")
        return 1
    import cupy
    dev = cupy.cuda.Device().id
    reasons = {k: kernels.unsupported_reason(k, dev) for k in names}
    skipped = [f"{k}: {why}" for k, why in reasons.items() if why]
    names = tuple(k for k, why in reasons.items() if not why)
    text = "\n\n".join(measure(K, N, ms, G, names, seed) for K, N in shapes)
    text += "".join(f"\nskipped {s}" for s in skipped)
    head = f"command: {getattr(args, 'command_line', 'python -m quickcupy accuracy')}\n"
    head += f"device: {device.device_info().get('name')}\n"
    print(head + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(head + text + "\n")
    return 0


def measure(K, N, ms, G, names, seed) -> str:
    """The table (text) of every kernel's error for fp16 and bf16 at each M."""
    import cupy
    bf16 = dtypes.np_dtype("bfloat16")
    rng = np.random.default_rng(seed)
    q = quantize((rng.standard_normal((N, K)) * 0.05).astype(np.float16), G)
    layers = {}
    emulated = emulated_bf16_weights(q)
    rows = []
    for M in ms:
        x32 = rng.standard_normal((M, K)).astype(np.float32)
        res = {}
        for dt in (np.dtype(np.float16), bf16):
            x = x32.astype(dt)
            ref = reference_gemm(x.astype(np.float64), q)
            floor = rel_error(ref.astype(dt).astype(np.float64), ref)
            errs = {}
            for kernel in names:
                design = registry.design_of(kernel)
                if M > (design.max_m or M) or dt.name not in design.dtypes:
                    continue
                if design.layout not in layers:
                    layers[design.layout] = QuantLinear.from_quantized(q, layout=design.layout)
                out = cupy.full((M, N), np.nan, dt)
                gemm(cupy.asarray(x), layers[design.layout], kernel, out=out)
                errs[kernel] = rel_error(out.get().astype(np.float64), ref)
            if dt == bf16:
                for name, w in emulated.items():
                    errs[f"numpy: {name}"] = rel_error(_round_bf16(x.astype(np.float64) @ w.T), ref)
            res[dt.name] = (floor, errs)
        f16, fb = res["float16"], res["bfloat16"]
        for kernel in list(f16[1]) + [k for k in fb[1] if k not in f16[1]]:
            e16, eb = f16[1].get(kernel), fb[1].get(kernel)
            rows.append([kernel, M, _f(e16), _f(f16[0]), _r(e16, f16[0]), _f(eb), _f(fb[0]), _r(eb, fb[0]),
                         _r(eb, e16)])
    headers = ["kernel", "M", "fp16 err", "fp16 floor", "fp16 err/floor", "bf16 err", "bf16 floor",
               "bf16 err/floor", "bf16/fp16"]
    return (f"K={K} N={N} group_size={G}: ||y - ref|| / ||ref||, ref = float64 of the same rounded inputs; "
            f"floor = the float64 result rounded to the dtype\n" + table(headers, rows))


def _f(v):
    return "" if v is None else f"{v:.3e}"


def _r(a, b):
    return "" if a is None or b is None or not b else f"{a / b:.2f}"

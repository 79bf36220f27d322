"""``python -m quickcupy bench``: time the GEMM kernels against cuBLAS fp16 and the memory floor.

For each (K, N) shape and each M, every kernel computes y (M, N) = x (M, K) @ W (K, N) in float16
(or bfloat16 with ``--dtype bfloat16``): ``fp16`` is ``cupy.matmul`` with a dense weight of that
dtype (cuBLAS), the others go through :func:`quickcupy.gemm` by name, one per entry of
``quickcupy.gemm.KERNELS``.

How it measures:

- CUDA events around each call, the calls queued behind a short spin kernel so that Python launch
  overhead stays out of the times; warm-up first, then the median of the repeats.
- Weights rotate over enough copies that together they exceed twice the L2 cache, so each call
  reads its weight from DRAM, as one layer of a model does; x and y stay the same (in a model the
  activations come hot from the previous layer).
- The memory floor of a point is the bytes that must move over the device-to-device copy bandwidth
  measured in the same run (bytes read + written). ``time_over_floor`` = time / floor.
- An event pair around one call costs a few us by itself (an empty kernel measures 3.7 us this way
  on the H100), which small layers cannot hide. So each point is also timed as a stream: the repeats
  back to back between one event pair (weights still rotating), ``stream_us`` per call, as the layers
  of a CUDA-graph decode step run. ``stream_over_floor`` = stream_us / floor. The quickcupy kernels
  are also timed as one CUDA graph of the repeats (``graph_us`` per call; with programmatic
  dependent launch on sm_90, where a call starts while the previous one ends), as a decode step's
  graph runs them. ``graph_over_floor`` = graph_us / floor.

Without a GPU it says so in one line and prints what a CPU can: the bank-conflict model's predictions
(a table of conflicts per kernel and M at the first shape; ``--verbose``: every counter of every shape,
as ``--json``/``--csv`` write them), the host's quantize/pack times, and one summary line.
"""
from __future__ import annotations

import functools
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import device as _device
from .. import kernels
from ..analysis.smem_predict import WALKS, predict
from ..dtypes import np_dtype
from ..gemm import QuantLinear, check_layer_shape, gemm
from ..layouts import pack_awq, pack_quick
from ..llama.model import MODELS, LlamaConfig, gemm_shapes
from ..quantize import quantize
from ..registry import VARIANTS, variant
from .bench_report import (BASELINE, CLOCK_FIELDS, SCHEMA, derive_points, format_header, format_table,
                           rotation_copies, weight_bytes, write_csv, write_plot)
from .common import (DTYPE_HELP, Progress, UsageError, check_output_path, format_rows, jsonable, now, ordered_unique,
                     parse_dtype, parse_group_size, parse_int, parse_ms, parse_names, parse_shapes, table, write_json)
from .timing import rotating, time_gpu, time_gpu_graph, time_gpu_samples, time_gpu_stream

DEFAULT_SHAPES = ((8192, 8192),                                                  # K x N
                  (4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))     # Llama-2-7B layers
DEFAULT_MS = tuple(2 ** i for i in range(13))                                    # 1 .. 4096
DEFAULT_GROUP_SIZE = 128
FALLBACK_L2_BYTES = 50 * 2 ** 20
WARN_REL_ERR = 0.05        # a kernel whose output differs more from fp16 than this gets a warning
AVAILABLE = (BASELINE, *VARIANTS)


@dataclass(frozen=True)
class Settings:
    """What one ``bench`` run does, parsed and checked once."""
    shapes: tuple            # ((K, N), ...)
    ms: tuple
    kernels: tuple           # names from AVAILABLE
    group_size: int          # as given (-1: one group per row)
    warmup: int
    repeats: int
    seed: int
    json: str | None
    csv: str | None
    plot: str | None
    quiet: bool
    command: str
    dtype: str = "float16"   # activations (and the cuBLAS baseline's weight): float16 or bfloat16
    verbose: bool = False    # without a GPU: every counter of every prediction, not the short table


# ------------------------------------------------------------------------------ argument parsing
def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="time the GEMM kernels against cuBLAS and the memory floor",
        description="Times y = x @ W of every GEMM kernel (and of cuBLAS on a dense weight) over weight shapes and "
                    "a sweep of M, with weights rotated past L2, each point next to the memory floor measured in the "
                    "same run. Without a GPU it prints the bank-conflict model's predictions instead.")
    # Values are strings parsed in settings(), so that a bad one gives one line (UsageError).
    p.add_argument("--shapes", default=None,
                   help="comma-separated KxN weight shapes (x is M x K, W is K x N); default: "
                        + ",".join(f"{k}x{n}" for k, n in DEFAULT_SHAPES) + " unless --models is given")
    p.add_argument("--models", default=None,
                   help="comma-separated model names whose fused GEMM shapes (qkv, o, gate|up, down) are "
                        f"added: {', '.join(MODELS)}")
    p.add_argument("--m", default=",".join(map(str, DEFAULT_MS)),
                   help="comma-separated M values (rows of x); default: %(default)s")
    p.add_argument("--kernels", default=None,
                   help=f"comma-separated kernel names from {', '.join(AVAILABLE)}; default: all")
    p.add_argument("--group-size", default=str(DEFAULT_GROUP_SIZE),
                   help="quantization group size: -1 (whole rows) or a multiple of 32 dividing K; "
                        "default: %(default)s")
    p.add_argument("--dtype", default="fp16",
                   help=DTYPE_HELP + ", of every kernel and of the cuBLAS baseline; default: %(default)s")
    p.add_argument("--warmup", default="10", help="untimed calls per point; default: %(default)s")
    p.add_argument("--repeats", default="50", help="timed calls per point, the median is reported; default: %(default)s")
    p.add_argument("--seed", default="0", help="seed of the random weights and activations; default: %(default)s")
    p.add_argument("--json", metavar="PATH", help="write every point, the device and the versions as JSON")
    p.add_argument("--csv", metavar="PATH", help="write one row per point as CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of TFLOP/s vs M (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    p.add_argument("--verbose", action="store_true",
                   help="without a GPU: print every counter the bank model predicts per shape, M and kernel "
                        "(default: a short table of conflicts)")
    p.set_defaults(func=run)
    return p


def model_shapes(text: str) -> list:
    """``"llama3-8b,qwen2.5-7b"`` -> the (K, N) of their fused GEMMs, first occurrence order."""
    shapes = []
    for name in parse_names("--models", text, MODELS):
        shapes += gemm_shapes(LlamaConfig(**MODELS[name])).values()
    return list(dict.fromkeys(shapes))


def settings(args) -> Settings:
    """Parsed and checked settings from the argparse namespace; UsageError with a one-line message.
    Output paths are checked here, before any work."""
    shapes = model_shapes(args.models) if args.models else []
    if args.shapes is not None or not shapes:
        shapes = list(dict.fromkeys(parse_shapes(args.shapes or ",".join(f"{k}x{n}" for k, n in DEFAULT_SHAPES))
                                    + shapes))
    group_size = parse_group_size("--group-size", args.group_size, [K for K, _ in shapes])
    kernels = parse_names("--kernels", args.kernels, AVAILABLE)
    for flag in ("json", "csv", "plot"):
        check_output_path(f"--{flag}", getattr(args, flag))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, which is not installed: "
                             "pip install matplotlib (or quickcupy[plot])") from None
    return Settings(shapes=tuple(shapes), ms=tuple(parse_ms(args.m)), kernels=tuple(kernels),
                    group_size=group_size, warmup=parse_int("--warmup", args.warmup, 0),
                    repeats=parse_int("--repeats", args.repeats, 1), seed=parse_int("--seed", args.seed, 0),
                    json=args.json, csv=args.csv, plot=args.plot, quiet=args.quiet,
                    command=getattr(args, "command_line", None) or "python -m quickcupy bench",
                    dtype=parse_dtype(getattr(args, "dtype", "float16")), verbose=getattr(args, "verbose", False))


def shape_refusal(kernel: str, K: int, N: int, M: int | None = None, dtype: str | None = None,
                  device: int | None = None):
    """Why ``kernel`` cannot run a (K, N) layer (or M rows of it, or ``dtype`` activations, or on
    CUDA ``device``: quick_sm90 off Hopper): the library's own message, or None."""
    if kernel == BASELINE:
        return None
    if device is not None:
        if kernels.unsupported_reason(kernel, device):
            return f"ValueError: {kernels.unsupported_reason(kernel, device)}"
    v = variant(kernel)
    try:
        check_layer_shape(v.layout, K, N)
        if M is not None and v.path == "gemm":
            v.design.check_m(M)
        if dtype is not None:
            v.design.check_dtype(dtype)
    except ValueError as exc:
        return f"ValueError: {exc}"
    return None


# ------------------------------------------------------------------------------------ GPU sweep
def measure_copy_bandwidth(l2_bytes: int, warmup: int = 5, repeats: int = 20) -> dict:
    """Device-to-device cudaMemcpy of a buffer well beyond L2: bytes read + written per second."""
    import cupy
    nbytes = max(256 * 2 ** 20, 8 * l2_bytes)
    src = cupy.ones(nbytes, cupy.uint8)
    dst = cupy.empty_like(src)
    t = time_gpu(functools.partial(dst.data.copy_from_device_async, src.data, nbytes), warmup, repeats)
    del src, dst
    cupy.get_default_memory_pool().free_all_blocks()
    return {"bytes": 2 * nbytes, "time_us": t * 1e6, "bytes_per_s": 2 * nbytes / t, "gb_per_s": 2 * nbytes / t / 1e9}


def _dequantized_fp16(q):
    """(K, N) float16 CuPy weight equal to ``q.dequantize()`` transposed, computed on the GPU."""
    import cupy
    N, K = q.codes.shape
    G = q.group_size
    codes = cupy.asarray(q.codes).reshape(N, K // G, G).astype(cupy.float32)
    codes -= cupy.asarray(q.zeros)[..., None]
    codes *= cupy.asarray(q.scales).astype(cupy.float32)[..., None]
    return cupy.ascontiguousarray(codes.reshape(N, K).astype(cupy.float16).T)


def host_quantize_pack(K: int, N: int, group_size: int, seed: int = 0):
    """Quantizes a random float16 (N, K) weight on the host and packs it both ways, timed.

    Returns (QuantizedWeight, {"K", "N", "quantize_s", "pack_awq_s", "pack_quick_s"})."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K), dtype=np.float32) * 0.02).astype(np.float16)
    t0 = time.perf_counter()
    q = quantize(w, group_size)
    t1 = time.perf_counter()
    times = {"K": K, "N": N, "quantize_s": t1 - t0}
    for name, pack in (("pack_awq_s", pack_awq), ("pack_quick_s", pack_quick)):
        t = time.perf_counter()
        try:
            pack(q)
            times[name] = time.perf_counter() - t
        except ValueError:                       # a shape this layout cannot hold
            times[name] = None
    return q, times


def _weights(K, N, s: Settings, l2_bytes, progress):
    """The weights of one shape: (w_fp16, fp16 copies or None, {layout: [QuantLinear copies]},
    host timings or None). With int4 kernels ONE random weight is quantized on the host and w_fp16
    is its dequantization (so fp16 computes the same product); the copies are made on the GPU."""
    import cupy
    quantized = [k for k in s.kernels if k != BASELINE and shape_refusal(k, K, N) is None]
    layers, host = {}, None
    if quantized:
        progress.note(f"K={K} N={N} group_size={s.group_size}: quantizing a random weight")
        q, host = host_quantize_pack(K, N, s.group_size, s.seed)
        w_fp16 = _dequantized_fp16(q)
        n_int4 = rotation_copies(weight_bytes("int4", K, N, s.group_size), l2_bytes)
        for layout in ordered_unique(variant(k).layout for k in quantized):
            first = QuantLinear.from_quantized(q, layout=layout)
            layers[layout] = [first] + [first.copy() for _ in range(n_int4 - 1)]
    else:
        progress.note(f"K={K} N={N}")
        w_fp16 = (cupy.random.standard_normal((K, N), dtype=cupy.float32) * 0.02).astype(cupy.float16)
    fp16_weights = None
    if BASELINE in s.kernels:
        n_fp16 = rotation_copies(weight_bytes(BASELINE, K, N, s.group_size), l2_bytes)
        fp16_weights = [w_fp16] + [w_fp16.copy() for _ in range(n_fp16 - 1)]
    return w_fp16, fp16_weights, layers, host


def _bench_shape(K, N, s: Settings, l2_bytes, progress):
    """(raw measurements, skipped points, host timings) of one (K, N) over every M and kernel."""
    import cupy
    cupy.random.seed(s.seed)
    w_fp16, fp16_weights, layers, host = _weights(K, N, s, l2_bytes, progress)
    dt = np_dtype(s.dtype)
    if dt != np.float16 and fp16_weights is not None:     # the cuBLAS baseline in the same dtype
        fp16_weights = [w.astype(dt) for w in fp16_weights]
    w_fp16 = w_fp16.astype(dt)
    x_all = cupy.random.standard_normal((max(s.ms), K), dtype=cupy.float32).astype(dt)
    y_all = cupy.empty((max(s.ms), N), dt)
    y_ref_all = cupy.empty((max(s.ms), N), dt)
    raw, skipped = [], []
    device = cupy.cuda.Device().id
    for kernel in s.kernels:
        reason = shape_refusal(kernel, K, N, device=device)
        if reason:
            progress.note(f"skipping {kernel} at K={K} N={N}: {reason}")
            skipped += [{"K": K, "N": N, "M": M, "kernel": kernel, "reason": reason} for M in s.ms]
    for M in s.ms:
        x, y, y_ref = x_all[:M], y_all[:M], y_ref_all[:M]
        cupy.matmul(x, w_fp16, out=y_ref)
        ref_max = float(cupy.abs(y_ref).max()) or 1.0
        for kernel in s.kernels:
            if shape_refusal(kernel, K, N, device=device):
                continue
            reason = shape_refusal(kernel, K, N, M, s.dtype)
            if reason:
                skipped.append({"K": K, "N": N, "M": M, "kernel": kernel, "reason": reason})
                continue
            progress.step(f"K={K} N={N} M={M} {kernel}")
            if kernel == BASELINE:
                items, call = fp16_weights, (lambda w, x=x, y=y: cupy.matmul(x, w, out=y))
            else:                            # the record, so the timed calls look no name up
                v = variant(kernel)
                items = layers[v.layout]
                call = (lambda layer, x=x, y=y, v=v: gemm(x, layer, kernel=v, out=y))
            samples = time_gpu_samples(rotating(call, items), s.warmup, s.repeats)
            stream_s = time_gpu_stream(rotating(call, items), s.repeats)
            graph_s = None if kernel == BASELINE else time_gpu_graph(rotating(call, items), s.repeats)
            err = float(cupy.abs(y.astype(cupy.float32) - y_ref.astype(cupy.float32)).max()) / ref_max
            if not err <= WARN_REL_ERR:
                progress.note(f"warning: {kernel} at K={K} N={N} M={M}: output differs from the fp16 "
                              f"GEMM of the same dequantized weight by {err:.3g} (relative to max |y|)")
            raw.append({"K": K, "N": N, "M": M, "group_size": s.group_size, "kernel": kernel,
                        "time_s": float(np.median(samples)), "time_min_s": float(samples.min()),
                        "stream_s": stream_s, "graph_s": graph_s,
                        "copies": len(items), "max_rel_err": err})
    del layers, fp16_weights, x_all, y_all, y_ref_all, w_fp16
    cupy.get_default_memory_pool().free_all_blocks()
    return raw, skipped, host


def measure(s: Settings, result: dict) -> dict:
    """Times every (shape, M, kernel) of the settings on the GPU; fills and returns ``result`` with
    bandwidth, points (bench_report.POINT_FIELDS), skipped, clocks, host timings."""
    l2_bytes = result["device"].get("l2_bytes") or FALLBACK_L2_BYTES
    progress = Progress("bench", len(s.shapes) * len(s.ms) * len(s.kernels), not s.quiet)
    bandwidth = measure_copy_bandwidth(l2_bytes)
    raw, skipped, clocks, host = [], [], [], []
    try:
        for K, N in s.shapes:
            r, sk, h = _bench_shape(K, N, s, l2_bytes, progress)
            raw, skipped, host = raw + r, skipped + sk, host + ([h] if h else [])
            now_dev = _device.device_info()      # sampled while the GPU is still at its working clocks
            clocks.append({"K": K, "N": N, **{k: now_dev.get(k) for k in CLOCK_FIELDS}})
    finally:
        progress.close(f"{progress.done} points in {time.perf_counter() - progress.t0:.1f} s")
    result.update(bandwidth=bandwidth, points=derive_points(raw, bandwidth["bytes_per_s"]), skipped=skipped,
                  clocks=clocks, host=host, finished=now())
    return result


def _run_on_gpu(s: Settings, result: dict) -> int:
    measure(s, result)
    if s.json:
        write_json(s.json, result)
    if s.csv:
        write_csv(s.csv, result["points"], result["device"].get("name"))
    if s.plot:
        if result["points"]:
            write_plot(s.plot, result)
        else:
            print("bench: no points measured, no plot written", file=sys.stderr)
    print(format_header(result))
    print()
    print(format_table(result["points"]))
    return 0


# ------------------------------------------------------------------------- without a GPU
def bank_predictions(s: Settings) -> tuple:
    """(rows, skipped) of the bank-conflict model (quickcupy.analysis.smem_predict) for every shape,
    M and int4 kernel of the settings (those that run one of our GEMM designs): per-launch shared-memory instructions, wavefronts and
    conflicts; shapes a kernel cannot hold are skipped with the message the GPU path gives."""
    rows, skipped = [], []
    for K, N in s.shapes:
        for kernel in (k for k in s.kernels if k in VARIANTS and VARIANTS[k].design.name in WALKS
                       and VARIANTS[k].path == "gemm"):
            reason = shape_refusal(kernel, K, N)
            if reason:
                skipped.append({"K": K, "N": N, "kernel": kernel, "reason": reason})
                continue
            rows += [{"K": K, "N": N, "M": M, "kernel": kernel, **predict(kernel, M, N, K, s.group_size)}
                     for M in s.ms if shape_refusal(kernel, K, N, M) is None]
    return rows, skipped


def _run_without_gpu(s: Settings, result: dict, reason: str) -> int:
    print(f"bench: no GPU ({reason}); nothing timed, showing the bank-conflict model's predictions instead",
          file=sys.stderr)
    rows, skipped = bank_predictions(s)
    for sk in skipped:
        print(f"bench: skipping {sk['kernel']} at K={sk['K']} N={sk['N']}: {sk['reason']}", file=sys.stderr)
    if s.plot:
        print("bench: --plot draws measured times; without a GPU there are none, no plot written",
              file=sys.stderr)
    result.update(predictions=rows, skipped=skipped,
                  host=[host_quantize_pack(K, N, s.group_size, s.seed)[1] for K, N in s.shapes],
                  finished=now())
    if s.json:
        write_json(s.json, result)
    if s.csv:
        import csv
        with open(s.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ordered_unique(k for r in rows for k in r) or ["K"])
            writer.writeheader()
            writer.writerows(jsonable(rows))
    print(format_rows(jsonable(rows)) if s.verbose else conflicts_table(rows))
    print("\nhost (this CPU): quantize a float16 weight and pack it, seconds")
    print(format_rows(jsonable(result["host"])))
    print("\n" + no_gpu_summary(rows, s))
    return 0


def _conflicts(row: dict) -> int:
    """Every bank conflict the model predicts for one launch (stores, loads, ldmatrix, cp.async)."""
    return sum(v for k, v in row.items() if k.endswith("_conflicts"))


def conflicts_table(rows) -> str:
    """The short view of the predictions: at the first shape, one row per kernel, one column per M,
    each cell the launch's predicted bank conflicts ("-" where the kernel does not serve that M)."""
    if not rows:
        return "(no predictions)"
    K, N = rows[0]["K"], rows[0]["N"]
    here = [r for r in rows if (r["K"], r["N"]) == (K, N)]
    ms = ordered_unique(r["M"] for r in here)
    cells = {(r["kernel"], r["M"]): _conflicts(r) for r in here}
    body = [[k] + [cells.get((k, M), "-") for M in ms] for k in ordered_unique(r["kernel"] for r in here)]
    return (f"bank-conflict model at K={K} N={N}: shared-memory bank conflicts per launch "
            f"(--verbose: every counter, shape and M)\n" + table(["kernel"] + [f"M={M}" for M in ms], body))


def no_gpu_summary(rows, s: Settings) -> str:
    """The last line of a run without a GPU: what was printed and, when both ran, quick's shared-memory
    stores against awq's at M = 16 (else the first M), first shape."""
    count = lambda key: len(ordered_unique(map(key, rows)))
    line = (f"no CUDA device, nothing timed: the bank-conflict model's predictions for {len(rows)} launches "
            f"(kernels x M values x shapes: {count(lambda r: r['kernel'])} x {count(lambda r: r['M'])} x "
            f"{count(lambda r: (r['K'], r['N']))})")
    at = {(r["kernel"], r["M"]): r for r in rows if (r["K"], r["N"]) == (rows[0]["K"], rows[0]["N"])}
    both = [M for M in s.ms if ("quick", M) in at and ("awq", M) in at]
    if both:
        M = 16 if 16 in both else both[0]
        q, a = at["quick", M], at["awq", M]
        line += (f"; at K={q['K']} N={q['N']} M={M} quick executes {q['st_inst']} st.shared "
                 f"({_conflicts(q)} bank conflicts), awq {a['st_inst']} ({_conflicts(a)})")
    return line


# -------------------------------------------------------------------------------------- entry
def new_result(s: Settings, reason) -> dict:
    """The header of a bench result: schema, command, settings, device, versions."""
    return {
        "schema": SCHEMA, "command": s.command, "started": now(),
        "settings": {k: v for k, v in asdict(s).items() if k in ("shapes", "ms", "kernels", "group_size",
                                                                  "warmup", "repeats", "seed", "dtype")},
        "timing": "CUDA events per call, queued behind a spin kernel; median of repeats; weights rotated "
                  "over copies totalling > 2x L2",
        "device": _device.device_info() if reason is None else {"available": False, "reason": reason},
        "versions": _device.versions(),
    }


def run(args) -> int:
    s = settings(args)
    reason = _device.no_gpu_reason()
    result = new_result(s, reason)
    if reason is not None:
        return _run_without_gpu(s, result, reason)
    return _run_on_gpu(s, result)

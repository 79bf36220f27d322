"""``python -m quickcupy bench``: time the GEMM kernels against cuBLAS fp16 and the memory floor.

For each (K, N) shape and each M, every kernel computes y (M, N) = x (M, K) @ W (K, N) in float16:
``fp16`` is ``cupy.matmul`` with a float16 weight (cuBLAS), the others go through
:func:`quickcupy.gemm` by name, one per entry of ``quickcupy.gemm.KERNELS``.

How it measures:

- CUDA events around each call, the calls queued behind a short spin kernel so that Python launch
  overhead stays out of the times; warm-up first, then the median of the repeats.
- Weights rotate over enough copies that together they exceed twice the L2 cache, so each call
  reads its weight from DRAM, as one layer of a model does; x and y stay the same (in a model the
  activations come hot from the previous layer).
- The memory floor of a point is the bytes that must move over the device-to-device copy bandwidth
  measured in the same run (bytes read + written). ``time_over_floor`` = time / floor.

Without a GPU it says so in one line and prints what a CPU can: the bank-conflict model's predictions.
"""
from __future__ import annotations

import csv
import math
import shlex
import sys
import time
from datetime import datetime, timezone

import numpy as np

from . import device as _device
from .errors import UsageError
from .report import jsonable, write_json
from .timing import time_gpu, time_gpu_samples  # noqa: F401 (re-exported for the tools)

BASELINE = "fp16"          # cupy.matmul with a float16 weight
REFERENCE_INT4 = "awq"     # every kernel's speedup is also reported against this one
DEFAULT_SHAPES = ((8192, 8192),                                                  # K x N
                  (4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))     # Llama-2-7B layers
DEFAULT_MS = tuple(2 ** i for i in range(13))                                    # 1 .. 4096
DEFAULT_GROUP_SIZE = 128
DEFAULT_WARMUP = 10
DEFAULT_REPEATS = 50
FALLBACK_L2_BYTES = 50 * 2 ** 20
WARN_REL_ERR = 0.05        # a kernel whose output differs more from fp16 than this gets a warning
SCHEMA = "quickcupy.bench/1"
CLOCK_FIELDS = ("sm_clock_mhz", "mem_clock_mhz", "temperature_c")   # sampled after each shape

POINT_FIELDS = (
    "K", "N", "M", "group_size", "kernel",
    "time_us",            # median over the repeats
    "time_us_min",
    "tflops",             # 2*M*N*K / time
    "bytes",              # bytes that must move (see moved_bytes)
    "floor_us",           # bytes / measured copy bandwidth
    "time_over_floor",    # time_us / floor_us (1.0 = at the memory floor)
    "bound_tflops",       # 2*M*N*K / floor: the TFLOP/s a kernel at the memory floor would reach
    "speedup_vs_fp16",    # fp16 time / this time (null if fp16 was not run)
    "speedup_vs_awq",     # awq time / this time (null if awq was not run)
    "copies",             # weight copies rotated over
    "max_rel_err",        # max |y - y_fp16| / max |y_fp16|, y_fp16 from the dequantized weight
)


# ------------------------------------------------------------------------------ argument parsing
def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="time the GEMM kernels against cuBLAS fp16 and the memory floor",
        description=__doc__.splitlines()[0].split(": ", 1)[1])
    # Values are strings parsed in run(), so that a bad one gives one line (UsageError), not usage.
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in DEFAULT_SHAPES),
                   help="comma-separated KxN weight shapes (x is M x K, W is K x N); default: %(default)s")
    p.add_argument("--m", default=",".join(map(str, DEFAULT_MS)),
                   help="comma-separated M values (rows of x); default: %(default)s")
    p.add_argument("--kernels", default=None,
                   help=f"comma-separated kernel names; default: {BASELINE} and every kernel in "
                        "quickcupy.gemm.KERNELS")
    p.add_argument("--group-size", default=str(DEFAULT_GROUP_SIZE),
                   help="quantization group size: 32, 64, 128 or -1 (whole rows); default: %(default)s")
    p.add_argument("--warmup", default=str(DEFAULT_WARMUP), help="untimed calls per point; default: %(default)s")
    p.add_argument("--repeats", default=str(DEFAULT_REPEATS),
                   help="timed calls per point, the median is reported; default: %(default)s")
    p.add_argument("--seed", default="0", help="seed of the random weights and activations; default: %(default)s")
    p.add_argument("--json", metavar="PATH", help="write every point, the device and the versions as JSON")
    p.add_argument("--csv", metavar="PATH", help="write one row per point as CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of TFLOP/s vs M (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    p.set_defaults(func=run)
    return p


def parse_shapes(text: str) -> list:
    """``"8192x8192,4096x4096"`` -> [(K, N), ...]; ValueError naming the bad item."""
    shapes = []
    for item in _items(text, "--shapes"):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--shapes: {item!r} is not KxN with two positive integers (e.g. 4096x12288)")
        K, N = (int(p) for p in parts)
        if K < 1 or N < 1:
            raise ValueError(f"--shapes: {item!r} has a zero dimension; K and N must be >= 1")
        shapes.append((K, N))
    return shapes


def parse_ms(text: str) -> list:
    """``"1,16,128"`` -> [1, 16, 128]; every M >= 1."""
    ms = []
    for item in _items(text, "--m"):
        try:
            m = int(item)
        except ValueError:
            raise ValueError(f"--m: {item!r} is not an integer") from None
        if m < 1:
            raise ValueError(f"--m: M={m} must be >= 1")
        ms.append(m)
    return ms


def parse_kernels(text, available) -> list:
    """Kernel names from ``text`` (None: all of ``available``), each checked against ``available``."""
    if text is None:
        return list(available)
    names = _items(text, "--kernels")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"--kernels: unknown kernel {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(available)}")
    return names


def _int_option(text: str, flag: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{flag}={value} must be >= {minimum}")
    return value


def _items(text: str, flag: str) -> list:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise ValueError(f"{flag}: {text!r} must be a comma-separated list without empty items")
    if len(set(items)) != len(items):
        raise ValueError(f"{flag}: {text!r} repeats an item")
    return items


def available_kernels():
    """([names], note): ``fp16`` then the names of ``quickcupy.gemm.KERNELS``; note says why only
    ``fp16`` when the GEMM module is not importable (else None)."""
    try:
        from .gemm import KERNELS
    except Exception as exc:  # not written yet, or broken: the baseline still runs
        return [BASELINE], f"quickcupy.gemm is not importable ({type(exc).__name__}: {exc})"
    return [BASELINE] + [k for k in KERNELS if k != BASELINE], None


def validate(args) -> dict:
    """Parsed and checked settings from the argparse namespace; ValueError with a one-line message."""
    from .quantize import SUPPORTED_GROUP_SIZES
    shapes = parse_shapes(args.shapes)
    ms = parse_ms(args.m)
    group_size = _int_option(args.group_size, "--group-size", -1)
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"--group-size={group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}")
    for K, N in shapes:
        if group_size != -1 and K % group_size:
            raise ValueError(f"--shapes: {K}x{N} has K={K}, not a multiple of --group-size={group_size}")
    available, note = available_kernels()
    try:
        kernels = parse_kernels(args.kernels, available)
    except ValueError as exc:
        raise ValueError(f"{exc}" + (f" ({note})" if note else "")) from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib, which is not installed: "
                             "pip install matplotlib (or quickcupy[plot])") from None
    return {
        "shapes": shapes, "ms": ms, "kernels": kernels, "group_size": group_size,
        "warmup": _int_option(args.warmup, "--warmup", 0),
        "repeats": _int_option(args.repeats, "--repeats", 1),
        "seed": _int_option(args.seed, "--seed", 0),
        "json": args.json, "csv": args.csv, "plot": args.plot, "quiet": args.quiet,
        "kernels_note": note,
    }


# ------------------------------------------------------------------- floor arithmetic (pure)
def effective_group_size(group_size: int, K: int) -> int:
    return K if group_size == -1 else group_size


def weight_bytes(kernel: str, K: int, N: int, group_size: int) -> int:
    """Bytes of one layer's weight tensors: fp16 K*N*2; int4 K*N/2 + scales K/G*N*2 + zeros K/G*N/2."""
    if kernel == BASELINE:
        return K * N * 2
    groups = K // effective_group_size(group_size, K)
    return K * N // 2 + groups * N * 2 + groups * N // 2


def moved_bytes(kernel: str, M: int, K: int, N: int, group_size: int) -> int:
    """Bytes a GEMM must move at least: its weight, x (M*K*2) read once and y (M*N*2) written once."""
    return weight_bytes(kernel, K, N, group_size) + M * K * 2 + M * N * 2


def floor_seconds(kernel: str, M: int, K: int, N: int, group_size: int, bytes_per_s: float) -> float:
    """The memory floor: moved bytes over the measured copy bandwidth (bytes read + written per s)."""
    return moved_bytes(kernel, M, K, N, group_size) / bytes_per_s


def flops(M: int, K: int, N: int) -> int:
    return 2 * M * N * K


def rotation_copies(layer_bytes: int, l2_bytes: int) -> int:
    """How many weight copies to rotate over so that together they exceed twice the L2 (at least 2)."""
    return max(2, 2 * l2_bytes // max(1, layer_bytes) + 1)


def derive_points(raw, bytes_per_s: float) -> list:
    """Full points (POINT_FIELDS) from measurements.

    raw: dicts with K, N, M, group_size, kernel, time_s, time_min_s, copies, max_rel_err.
    bytes_per_s: the measured copy bandwidth, bytes read + written per second.
    """
    times = {(r["K"], r["N"], r["M"], r["group_size"], r["kernel"]): r["time_s"] for r in raw}
    points = []
    for r in raw:
        K, N, M, G, kernel, t = r["K"], r["N"], r["M"], r["group_size"], r["kernel"], r["time_s"]
        nbytes = moved_bytes(kernel, M, K, N, G)
        floor = nbytes / bytes_per_s
        t_fp16 = times.get((K, N, M, G, BASELINE))
        t_awq = times.get((K, N, M, G, REFERENCE_INT4))
        points.append({
            "K": K, "N": N, "M": M, "group_size": G, "kernel": kernel,
            "time_us": t * 1e6,
            "time_us_min": r.get("time_min_s", t) * 1e6,
            "tflops": flops(M, K, N) / t / 1e12,
            "bytes": nbytes,
            "floor_us": floor * 1e6,
            "time_over_floor": t / floor,
            "bound_tflops": flops(M, K, N) / floor / 1e12,
            "speedup_vs_fp16": None if t_fp16 is None else t_fp16 / t,
            "speedup_vs_awq": None if t_awq is None else t_awq / t,
            "copies": r.get("copies"),
            "max_rel_err": r.get("max_rel_err"),
        })
    return points


# ------------------------------------------------------------------------ table formatting (pure)
def _num(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ordered_unique(values) -> list:
    return list(dict.fromkeys(values))


def _column_widths(title: str, names) -> list:
    """Widths of one section's columns: each fits its kernel name and numbers, together the title."""
    widths = [max(7, len(k) + 1) for k in names]
    widths[-1] += max(0, len(title) + 1 - sum(widths))
    return widths


def format_table(points) -> str:
    """One block per (K, N, group_size): a row per M, columns grouped as time (us), TFLOP/s,
    speedup over fp16, speedup over awq and time over the memory floor, one column per kernel."""
    if not points:
        return "(no points)"
    kernels = _ordered_unique(p["kernel"] for p in points)
    sections = [("time us", kernels, "time_us"), ("TFLOP/s", kernels, "tflops")]
    if BASELINE in kernels:
        sections.append((f"x {BASELINE}", [k for k in kernels if k != BASELINE], "speedup_vs_fp16"))
    if REFERENCE_INT4 in kernels:
        sections.append((f"x {REFERENCE_INT4}", [k for k in kernels if k != REFERENCE_INT4], "speedup_vs_awq"))
    sections.append(("time/floor", kernels, "time_over_floor"))
    sections = [(title, names, field, _column_widths(title, names)) for title, names, field in sections if names]
    blocks = []
    for K, N, G in _ordered_unique((p["K"], p["N"], p["group_size"]) for p in points):
        rows = {}
        for p in points:
            if (p["K"], p["N"], p["group_size"]) == (K, N, G):
                rows.setdefault(p["M"], {})[p["kernel"]] = p
        head1, head2 = [" " * 5], [f"{'M':>5}"]
        for title, names, _, widths in sections:
            head1.append(title.center(sum(widths)))
            head2.append("".join(f"{k:>{w}}" for k, w in zip(names, widths)))
        lines = [f"K={K} N={N} group_size={G}", " | ".join(head1).rstrip(), " | ".join(head2)]
        for M in sorted(rows):
            cells = [f"{M:>5}"]
            for _, names, field, widths in sections:
                cells.append("".join(f"{_num(rows[M].get(k, {}).get(field)):>{w}}" for k, w in zip(names, widths)))
            lines.append(" | ".join(cells))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_header(result: dict) -> str:
    """Command line, device, versions and copy bandwidth as a few readable lines."""
    dev = result.get("device", {})
    lines = [f"command: {result.get('command', '')}"]
    if dev.get("available"):
        keys = ("name", "compute_capability", "sm_count", "driver", "sm_clock_mhz", "sm_clock_max_mhz",
                "mem_clock_mhz", "temperature_c", "power_limit_w", "l2_bytes")
        lines.append("device: " + ", ".join(f"{k}={dev[k]}" for k in keys if dev.get(k) is not None))
    else:
        lines.append(f"device: none ({dev.get('reason', 'unknown')})")
    lines.append("versions: " + ", ".join(f"{k}={v}" for k, v in result.get("versions", {}).items()))
    clocks = result.get("clocks")
    if clocks:
        lines.append("after each shape: " + "; ".join(
            f"{c['K']}x{c['N']}: " + ", ".join(f"{k}={c[k]}" for k in CLOCK_FIELDS if c.get(k) is not None)
            for c in clocks))
    bw = result.get("bandwidth")
    if bw:
        lines.append(f"copy bandwidth: {bw['gb_per_s']:.0f} GB/s (read + write, {bw['bytes'] / 2**20:.0f} MiB "
                     f"in {bw['time_us']:.1f} us); floor = bytes that must move / this")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- timing
def rotating(call, items):
    """A no-argument function that calls ``call(item)`` with the next of ``items`` each time."""
    state = {"i": 0}

    def fn():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return call(item)
    return fn


def measure_copy_bandwidth(l2_bytes: int, warmup: int = 5, repeats: int = 20) -> dict:
    """Device-to-device cudaMemcpy of a buffer well beyond L2: bytes read + written per second."""
    import cupy
    nbytes = max(256 * 2 ** 20, 8 * l2_bytes)
    src = cupy.ones(nbytes, cupy.uint8)
    dst = cupy.empty_like(src)
    t = time_gpu(lambda: dst.data.copy_from_device_async(src.data, nbytes), warmup, repeats)
    del src, dst
    cupy.get_default_memory_pool().free_all_blocks()
    return {"bytes": 2 * nbytes, "time_us": t * 1e6, "bytes_per_s": 2 * nbytes / t, "gb_per_s": 2 * nbytes / t / 1e9}


# ------------------------------------------------------------------------------------ progress
class Progress:
    """A status line on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._width = 0

    def note(self, text: str):
        """A message that stays (a new shape, a skipped kernel)."""
        if self.enabled or text.startswith("warning"):
            self._clear()
            print(text, file=self.stream, flush=True)

    def step(self, text: str):
        self.done += 1
        if self.enabled and self.tty:
            line = f"[{self.done}/{self.total} {time.perf_counter() - self.t0:.0f}s] {text}"
            self.stream.write("\r" + line.ljust(self._width))
            self.stream.flush()
            self._width = len(line)

    def close(self):
        self._clear()
        if self.enabled:
            print(f"bench: {self.done} points in {time.perf_counter() - self.t0:.1f} s", file=self.stream)

    def _clear(self):
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0


# ------------------------------------------------------------------------------------ GPU sweep
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
    from .layouts import pack_awq, pack_quick
    from .quantize import quantize
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K), dtype=np.float32) * 0.02).astype(np.float16)
    t0 = time.perf_counter()
    q = quantize(w, group_size)
    t1 = time.perf_counter()
    pack_awq(q)
    t2 = time.perf_counter()
    pack_quick(q)
    t3 = time.perf_counter()
    return q, {"K": K, "N": N, "quantize_s": t1 - t0, "pack_awq_s": t2 - t1, "pack_quick_s": t3 - t2}


def _weights(K, N, opts, l2_bytes, progress):
    """The weights of one shape: (w_fp16, fp16 copies or None, {layout: [QuantLinear copies] or the
    error that refused the shape}). With int4 kernels, ONE random weight is quantized on the host and
    w_fp16 is its dequantization (so fp16 computes the same product); the copies are made on the GPU."""
    import cupy
    kernels, G = opts["kernels"], opts["group_size"]
    quantized = [k for k in kernels if k != BASELINE]
    layers = {}
    if quantized:
        from . import QuantLinear
        from .gemm import kernel_layout
        progress.note(f"bench: K={K} N={N} group_size={G}: quantizing a random weight")
        q, host = host_quantize_pack(K, N, G, opts["seed"])
        opts.setdefault("host_timings", []).append(host)
        w_fp16 = _dequantized_fp16(q)
        n_int4 = rotation_copies(weight_bytes("int4", K, N, G), l2_bytes)
        for layout in _ordered_unique(kernel_layout(k) for k in quantized):
            try:
                first = QuantLinear.from_quantized(q, layout=layout)
            except (ValueError, NotImplementedError) as exc:     # a shape this layout cannot hold
                layers[layout] = exc
                continue
            layers[layout] = [first] + [first.copy() for _ in range(n_int4 - 1)]
    else:
        progress.note(f"bench: K={K} N={N}")
        w_fp16 = (cupy.random.standard_normal((K, N), dtype=cupy.float32) * 0.02).astype(cupy.float16)
    fp16_weights = None
    if BASELINE in kernels:
        n_fp16 = rotation_copies(weight_bytes(BASELINE, K, N, G), l2_bytes)
        fp16_weights = [w_fp16] + [w_fp16.copy() for _ in range(n_fp16 - 1)]
    return w_fp16, fp16_weights, layers


def _bench_shape(K, N, opts, l2_bytes, progress, skipped):
    """Raw measurements for one (K, N) over every M and kernel; refused points go to ``skipped``."""
    import cupy
    G = opts["group_size"]
    kernels, ms = opts["kernels"], opts["ms"]
    cupy.random.seed(opts["seed"])
    w_fp16, fp16_weights, layers = _weights(K, N, opts, l2_bytes, progress)
    if layers:
        from . import gemm as _gemm_fn
        from .gemm import kernel_layout
    m_max = max(ms)
    x_all = cupy.random.standard_normal((m_max, K), dtype=cupy.float32).astype(cupy.float16)
    y_all = cupy.empty((m_max, N), cupy.float16)
    y_ref_all = cupy.empty((m_max, N), cupy.float16)
    raw, failed = [], {}
    for M in ms:
        x, y, y_ref = x_all[:M], y_all[:M], y_ref_all[:M]
        cupy.matmul(x, w_fp16, out=y_ref)
        ref_max = float(cupy.abs(y_ref).max()) or 1.0
        for kernel in kernels:
            progress.step(f"K={K} N={N} M={M} {kernel}")
            if kernel == BASELINE:
                items, call = fp16_weights, (lambda w, x=x, y=y: cupy.matmul(x, w, out=y))
            else:
                items = layers[kernel_layout(kernel)]
                call = (lambda layer, x=x, y=y, kernel=kernel: _gemm_fn(x, layer, kernel=kernel, out=y))
            try:
                if isinstance(items, Exception):
                    raise items
                samples = time_gpu_samples(rotating(call, items), opts["warmup"], opts["repeats"])
            except (ValueError, NotImplementedError) as exc:
                message = f"{type(exc).__name__}: {exc}"
                skipped.append({"K": K, "N": N, "M": M, "kernel": kernel, "reason": message})
                if failed.get(kernel) != message:
                    progress.note(f"bench: skipping {kernel} at K={K} N={N} M={M}: {message}")
                    failed[kernel] = message
                continue
            err = float(cupy.abs(y.astype(cupy.float32) - y_ref.astype(cupy.float32)).max()) / ref_max
            if not err <= WARN_REL_ERR:
                progress.note(f"warning: {kernel} at K={K} N={N} M={M}: output differs from the fp16 "
                              f"GEMM of the same dequantized weight by {err:.3g} (relative to max |y|)")
            raw.append({"K": K, "N": N, "M": M, "group_size": G, "kernel": kernel,
                        "time_s": float(np.median(samples)), "time_min_s": float(samples.min()),
                        "copies": len(items), "max_rel_err": err})
    del layers, fp16_weights, x_all, y_all, y_ref_all, w_fp16
    cupy.get_default_memory_pool().free_all_blocks()
    return raw


def _run_on_gpu(opts, result) -> int:
    device_info = result["device"]
    l2_bytes = device_info.get("l2_bytes") or FALLBACK_L2_BYTES
    progress = Progress(len(opts["shapes"]) * len(opts["ms"]) * len(opts["kernels"]), not opts["quiet"])
    if opts["kernels_note"]:
        progress.note(f"bench: {opts['kernels_note']}; timing {BASELINE} only")
    bandwidth = measure_copy_bandwidth(l2_bytes)
    raw, skipped, clocks = [], [], []
    try:
        for K, N in opts["shapes"]:
            raw += _bench_shape(K, N, opts, l2_bytes, progress, skipped)
            now = _device.device_info()         # sampled while the GPU is still at its working clocks
            clocks.append({"K": K, "N": N, **{k: now.get(k) for k in CLOCK_FIELDS}})
    finally:
        progress.close()
    result["bandwidth"] = bandwidth
    result["points"] = derive_points(raw, bandwidth["bytes_per_s"])
    result["skipped"] = skipped
    result["clocks"] = clocks
    result["host"] = opts.pop("host_timings", [])
    result["finished"] = _now()
    _write_outputs(opts, result)
    print(format_header(result))
    print()
    print(format_table(result["points"]))
    return 0


# ------------------------------------------------------------------------- without a GPU
def bank_predictions(shapes, ms, group_size, kernels=(REFERENCE_INT4, "quick")):
    """Rows of the bank-conflict model (quickcupy.smem_predict) for every shape, M and kernel:
    per-launch shared-memory instructions, wavefronts and conflicts."""
    from .smem_predict import predict
    rows = []
    for K, N in shapes:
        for M in ms:
            for kernel in kernels:
                rows.append({"K": K, "N": N, "M": M, "kernel": kernel, **predict(kernel, M, N, K, group_size)})
    return rows


def format_rows(rows) -> str:
    """A plain aligned table of dicts (columns: the union of their keys, in first-seen order)."""
    if not rows:
        return "(no rows)"
    columns = _ordered_unique(k for r in rows for k in r)

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return _num(float(v))
        return "-" if v is None else str(v)
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    lines += ["  ".join(f"{v:>{w}}" for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _run_without_gpu(opts, result, reason) -> int:
    print(f"bench: no GPU ({reason}); nothing timed, showing the bank-conflict model's predictions instead",
          file=sys.stderr)
    rows = bank_predictions(opts["shapes"], opts["ms"], opts["group_size"])
    result["predictions"] = rows
    result["host"] = [host_quantize_pack(K, N, opts["group_size"], opts["seed"])[1] for K, N in opts["shapes"]]
    result["finished"] = _now()
    if opts["json"]:
        write_json(opts["json"], result)
    print(format_rows(jsonable(rows)))
    print("\nhost (this CPU): quantize a float16 weight and pack it, seconds")
    print(format_rows(jsonable(result["host"])))
    return 0


# -------------------------------------------------------------------------------------- outputs
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_csv(path, points, device_name=None):
    """One row per point, columns POINT_FIELDS (plus ``device``); empty cells for nulls."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("device",) + POINT_FIELDS)
        writer.writeheader()
        for p in points:
            writer.writerow({"device": device_name, **{k: ("" if p.get(k) is None else p[k]) for k in POINT_FIELDS}})


def write_plot(path, result):
    """PNG of TFLOP/s vs M, one panel per shape, one line per kernel, with the memory-floor bounds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = result["points"]
    bw = result["bandwidth"]["bytes_per_s"]
    shapes = _ordered_unique((p["K"], p["N"], p["group_size"]) for p in points)
    kernels = _ordered_unique(p["kernel"] for p in points)
    cols = min(3, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.3 * rows), squeeze=False)
    for ax, (K, N, G) in zip(axes.flat, shapes):
        here = [p for p in points if (p["K"], p["N"], p["group_size"]) == (K, N, G)]
        for kernel in kernels:
            pts = sorted((p["M"], p["tflops"]) for p in here if p["kernel"] == kernel)
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=kernel)
        ms = sorted({p["M"] for p in here})
        top = max(p["tflops"] for p in here)
        bounds = [("int4", "--", "int4 memory bound")] if any(k != BASELINE for k in kernels) else []
        bounds += [(BASELINE, ":", "fp16 memory bound")] if BASELINE in kernels else []
        for kind, style, label in bounds:
            ax.plot(ms, [flops(m, K, N) / floor_seconds(kind, m, K, N, G, bw) / 1e12 for m in ms],
                    style, color="black", linewidth=1, label=label)
        ax.set_xscale("log", base=2)
        if len(ms) <= 13:
            ax.set_xticks(ms, [str(m) for m in ms], fontsize=8)
            ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_ylim(top=top * 4)
        ax.set_title(f"K={K}, N={N}, group size {G}")
        ax.set_xlabel("M (rows of x, tokens)")
        ax.set_ylabel("TFLOP/s (2·M·N·K / time)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    name = result.get("device", {}).get("name", "GPU")
    fig.suptitle(f"quickcupy bench on {name}; bounds from {bw / 1e9:.0f} GB/s measured copy bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_outputs(opts, result):
    if opts["json"]:
        write_json(opts["json"], result)
    if opts["csv"]:
        write_csv(opts["csv"], result["points"], result["device"].get("name"))
    if opts["plot"]:
        if result["points"]:
            write_plot(opts["plot"], result)
        else:
            print("bench: no points measured, no plot written", file=sys.stderr)


# -------------------------------------------------------------------------------------- entry
def run(args) -> int:
    try:
        opts = validate(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    reason = _device.no_gpu_reason()
    result = {
        "schema": SCHEMA,
        "command": getattr(args, "command_line", None) or shlex.join(sys.argv),
        "started": _now(),
        "settings": {k: opts[k] for k in ("shapes", "ms", "kernels", "group_size", "warmup", "repeats", "seed")},
        "timing": "CUDA events per call, queued behind a spin kernel; median of repeats; weights rotated "
                  "over copies totalling > 2x L2",
        "device": _device.device_info() if reason is None else {"available": False, "reason": reason},
        "versions": _device.versions(),
    }
    if reason is not None:
        return _run_without_gpu(opts, result, reason)
    return _run_on_gpu(opts, result)

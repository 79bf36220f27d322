"""What ``bench`` reports, without a GPU: the memory-floor arithmetic, the derived points, the
text table, CSV and plot. (:mod:`quickcupy.tools.bench` measures; this module turns measurements
into results, so the notebooks and tests use it on committed JSON.)"""
from __future__ import annotations

import csv
import math

from ..quantize import effective_group_size
from .common import num, ordered_unique

BASELINE = "fp16"          # cupy.matmul with a float16 weight
REFERENCE_INT4 = "awq"     # every kernel's speedup is also reported against this one
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
    "gb_per_s",           # bytes / time: the bandwidth the call achieved
    "pct_of_copy_bw",     # gb_per_s over the measured copy bandwidth, in % (100 / time_over_floor)
    "bound_tflops",       # 2*M*N*K / floor: the TFLOP/s a kernel at the memory floor would reach
    "speedup_vs_fp16",    # fp16 time / this time (null if fp16 was not run)
    "speedup_vs_awq",     # awq time / this time (null if awq was not run)
    "stream_us",          # per call when the repeats run back to back between one event pair (null if not measured)
    "stream_over_floor",  # stream_us / floor_us
    "graph_us",           # per call when the repeats replay as one CUDA graph (null for cuBLAS, or if not measured)
    "graph_over_floor",   # graph_us / floor_us
    "copies",             # weight copies rotated over
    "max_rel_err",        # max |y - y_fp16| / max |y_fp16|, y_fp16 from the dequantized weight
)


# ------------------------------------------------------------------- floor arithmetic (pure)
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
            "gb_per_s": nbytes / t / 1e9,
            "pct_of_copy_bw": 100 * floor / t,
            "bound_tflops": flops(M, K, N) / floor / 1e12,
            "speedup_vs_fp16": None if t_fp16 is None else t_fp16 / t,
            "speedup_vs_awq": None if t_awq is None else t_awq / t,
            "stream_us": None if r.get("stream_s") is None else r["stream_s"] * 1e6,
            "stream_over_floor": None if r.get("stream_s") is None else r["stream_s"] / floor,
            "graph_us": None if r.get("graph_s") is None else r["graph_s"] * 1e6,
            "graph_over_floor": None if r.get("graph_s") is None else r["graph_s"] / floor,
            "copies": r.get("copies"),
            "max_rel_err": r.get("max_rel_err"),
        })
    return points


# ------------------------------------------------------------------------ table formatting (pure)
def _column_widths(title: str, names) -> list:
    """Widths of one section's columns: each fits its kernel name and numbers, together the title."""
    widths = [max(7, len(k) + 1) for k in names]
    widths[-1] += max(0, len(title) + 1 - sum(widths))
    return widths


def format_table(points) -> str:
    """One block per (K, N, group_size): a row per M, columns grouped as time (us), TFLOP/s,
    speedup over fp16, speedup over awq, time over the memory floor (and, where measured, the
    back-to-back time over it) and achieved GB/s, one column per kernel."""
    if not points:
        return "(no points)"
    kernels = ordered_unique(p["kernel"] for p in points)
    sections = [("time us", kernels, "time_us"), ("TFLOP/s", kernels, "tflops")]
    if BASELINE in kernels:
        sections.append((f"x {BASELINE}", [k for k in kernels if k != BASELINE], "speedup_vs_fp16"))
    if REFERENCE_INT4 in kernels:
        sections.append((f"x {REFERENCE_INT4}", [k for k in kernels if k != REFERENCE_INT4], "speedup_vs_awq"))
    sections.append(("time/floor", kernels, "time_over_floor"))
    if any(p.get("stream_over_floor") is not None for p in points):
        sections.append(("stream/floor", kernels, "stream_over_floor"))
    graphed = [k for k in kernels if any(p.get("graph_over_floor") is not None for p in points if p["kernel"] == k)]
    if graphed:
        sections.append(("graph/floor", graphed, "graph_over_floor"))
    sections.append(("GB/s", kernels, "gb_per_s"))
    sections = [(title, names, field, _column_widths(title, names)) for title, names, field in sections if names]
    blocks = []
    for K, N, G in ordered_unique((p["K"], p["N"], p["group_size"]) for p in points):
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
                cells.append("".join(f"{num(rows[M].get(k, {}).get(field)):>{w}}" for k, w in zip(names, widths)))
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


# -------------------------------------------------------------------------------------- files
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
    shapes = ordered_unique((p["K"], p["N"], p["group_size"]) for p in points)
    kernels = ordered_unique(p["kernel"] for p in points)
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



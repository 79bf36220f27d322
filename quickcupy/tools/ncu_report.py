"""Reading and writing Nsight Compute results (no GPU, no ncu needed): ncu's CSV output parsed
into launches, launches grouped into GEMM calls and summarized per shape, and the report printed
and saved. :mod:`quickcupy.tools.ncu` runs ncu and uses these."""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field

from .common import write_json

REDUCE_PATTERN = re.compile("reduce", re.IGNORECASE)

# (short label, ncu metric). All are sums over the whole launch. On H100 (ncu 2025.3) the op_ld
# wavefronts and conflicts include ldmatrix's; cp.async (LDGSTS, QUICK's activation copies) writes
# shared memory outside op_st and has its own counters.
METRICS = (
    ("shared st inst", "smsp__sass_inst_executed_op_shared_st.sum"),
    ("shared ld inst", "smsp__sass_inst_executed_op_shared_ld.sum"),
    ("ldmatrix inst", "smsp__sass_inst_executed_op_ldsm.sum"),
    ("cp.async inst", "smsp__sass_inst_executed_op_ldgsts.sum"),
    ("st wavefronts", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum"),
    ("ld wavefronts", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum"),
    ("cp.async wavefronts", "smsp__sass_l1tex_data_pipe_lsu_wavefronts_mem_shared_op_ldgsts.sum"),
    ("st conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"),
    ("ld conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum"),
    ("cp.async conflicts", "smsp__sass_l1tex_data_bank_conflicts_pipe_lsu_mem_shared_op_ldgsts.sum"),
    ("all wavefronts", "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum"),
    ("time", "gpu__time_duration.sum"),
    # DRAM: bytes are sums over a call's launches; the % of peak is per launch (summed when a call
    # has two launches, e.g. quick_gemm + splitk_reduce: read it for single-launch calls).
    ("dram read", "dram__bytes_read.sum"),
    ("dram write", "dram__bytes_write.sum"),
    ("dram % of peak", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
)
METRIC_NAMES = tuple(name for _, name in METRICS)

# Units ncu may print, scaled to the base unit the tool stores (nanoseconds for time).
_UNIT_SCALE = {"nsecond": ("nsecond", 1.0), "usecond": ("nsecond", 1e3),
               "msecond": ("nsecond", 1e6), "second": ("nsecond", 1e9)}
_SI = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_SI_BASES = ("byte", "inst", "cycle", "warp", "request", "sector", "wavefront")


class NcuError(RuntimeError):
    """Nsight Compute could not give the counters; the message is one line saying why."""


# ------------------------------------------------------------------------------------ parsing
@dataclass
class KernelLaunch:
    """One kernel launch profiled by ncu: its result ID, name and metric values (base units)."""
    id: int
    process_id: str
    name: str
    block_size: str = ""
    grid_size: str = ""
    metrics: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)


def parse_value(text: str, unit: str = ""):
    """ncu's "Metric Value" (thousands separators allowed) and unit -> (float, base unit).

    "n/a" and empty values give NaN. Times become nanoseconds; K/M/G/T-prefixed counts are scaled.
    """
    s = text.strip().replace(",", "").replace("\u202f", "").replace("\u00a0", "")
    try:
        value = float(s) if s and s.lower() != "n/a" else math.nan
    except ValueError:
        raise ValueError(f"metric value {text!r} is not a number") from None
    unit = unit.strip()
    if unit in _UNIT_SCALE:
        base, scale = _UNIT_SCALE[unit]
        return value * scale, base
    if len(unit) > 1 and unit[0] in _SI and unit[1:] in _SI_BASES:
        return value * _SI[unit[0]], unit[1:]
    return value, unit


def parse_ncu_csv(text: str) -> list:
    """Kernel launches from ``ncu --csv`` output, in ncu's order (by process, then result ID).

    Lines before the header row ("ID","Process ID",...), ``==PROF==``/``==WARNING==`` lines and any
    other line that does not start with a quote are skipped. Raises ValueError when no header is
    found or a row does not fit it.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith('"ID","Process ID"')),
                 None)
    if start is None:
        raise ValueError("no ncu CSV header (\"ID\",\"Process ID\",...) in the output")
    header = next(csv.reader([lines[start].strip()]))
    need = ("ID", "Process ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")
    missing = [c for c in need if c not in header]
    if missing:
        raise ValueError(f"ncu CSV header lacks column(s) {missing}: {header}")
    col = {name: header.index(name) for name in header}
    launches, order = {}, []
    for lineno, line in enumerate(lines[start + 1:], start + 2):
        line = line.strip()
        if not line.startswith('"'):
            continue
        row = next(csv.reader([line]))
        if row == header:
            continue
        if len(row) != len(header):
            raise ValueError(f"ncu CSV line {lineno} has {len(row)} fields, the header {len(header)}")
        key = (row[col["Process ID"]], int(row[col["ID"]]))
        if key not in launches:
            launches[key] = KernelLaunch(
                id=key[1], process_id=key[0], name=row[col["Kernel Name"]],
                block_size=row[col["Block Size"]] if "Block Size" in col else "",
                grid_size=row[col["Grid Size"]] if "Grid Size" in col else "")
            order.append(key)
        value, unit = parse_value(row[col["Metric Value"]], row[col["Metric Unit"]])
        launches[key].metrics[row[col["Metric Name"]]] = value
        launches[key].units[row[col["Metric Name"]]] = unit
    processes = list(dict.fromkeys(pid for pid, _ in order))
    order.sort(key=lambda k: (processes.index(k[0]), k[1]))
    return [launches[k] for k in order]


def group_calls(launches: list, calls: list) -> list:
    """Splits ncu's launches into GEMM calls: [(call, [KernelLaunch, ...]), ...].

    calls: the child's manifest entries ({"kernel", "layout", "M", "N", "K", ...}) in call order; the
    first launch of a call must name its layout ("awq", "quick"). A launch whose name matches
    REDUCE_PATTERN joins the call before it; any other launch starts a call.
    Raises NcuError when the counts or the kernel families do not line up.
    """
    groups = []
    for launch in launches:
        if groups and REDUCE_PATTERN.search(launch.name):
            groups[-1].append(launch)
        else:
            groups.append([launch])
    names = sorted({launch.name for launch in launches})
    if len(groups) != len(calls):
        raise NcuError(f"ncu reported {len(groups)} GEMM launch(es), the child made {len(calls)} GEMM "
                       f"call(s); kernels profiled: {names or 'none'} (adjust --kernel-regex?)")
    for call, group in zip(calls, groups):
        if call.get("layout", call["kernel"]) not in group[0].name.lower():
            raise NcuError(f"launch {group[0].id} is {group[0].name!r}, but the child's call there was "
                           f"kernel={call['kernel']} M={call['M']}; kernels profiled: {names}")
    return list(zip(calls, groups))


def _median(values):
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def summarize(grouped: list, metrics=METRIC_NAMES) -> list:
    """Per (M, N, K, group_size) shape: each kernel's per-call metric sums (median over repeats).

    Returns [{"M", "N", "K", "group_size", "kernels": {kernel: {"metrics": {name: value},
    "units": {...}, "calls": n, "launch_names": [...], "per_call": [{name: value}, ...]}}}] in the
    order the shapes were first called; warm-up calls are left out.
    """
    shapes = {}
    for call, group in grouped:
        if call.get("warmup"):
            continue
        shape = (call["M"], call["N"], call["K"], call["group_size"])
        entry = shapes.setdefault(shape, {"M": shape[0], "N": shape[1], "K": shape[2],
                                          "group_size": shape[3], "kernels": {}})
        k = entry["kernels"].setdefault(call["kernel"], {"per_call": [], "launch_names": [],
                                                          "units": {}})
        k["per_call"].append({m: math.fsum(l.metrics.get(m, math.nan) for l in group) for m in metrics})
        for launch in group:
            if launch.name not in k["launch_names"]:
                k["launch_names"].append(launch.name)
            k["units"].update({m: launch.units[m] for m in metrics if m in launch.units})
    for entry in shapes.values():
        for k in entry["kernels"].values():
            k["calls"] = len(k["per_call"])
            k["metrics"] = {m: _median([c[m] for c in k["per_call"]]) for m in metrics}
    return list(shapes.values())


# --------------------------------------------------------------------------------- reporting
def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.2f}" if abs(value) >= 100 else f"{value:.3g}"


def _fmt_ratio(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def short_kernel_name(name: str) -> str:
    """"void awq_gemm<16, 128>(const __half *, ...)" -> "awq_gemm<16, 128>" (for printing)."""
    name = name.strip().removeprefix("void ").strip()
    depth = 0
    for i, ch in enumerate(name):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            return name[:i].strip()
    return name


def table_rows(report: dict) -> list:
    """Long-form rows (one per shape and metric) for the CSV file and the printed table."""
    rows = []
    for entry in report["results"]:
        kernels = list(entry["kernels"])
        predicted = entry.get("predicted", {})
        for label, name in METRICS:
            unit = next((k["units"].get(name, "") for k in entry["kernels"].values()), "")
            row = {"M": entry["M"], "N": entry["N"], "K": entry["K"], "group_size": entry["group_size"],
                   "metric": name, "label": label, "unit": unit}
            for k in kernels:
                row[k] = entry["kernels"][k]["metrics"].get(name, math.nan)
            if "ratio" in entry:
                row["awq/quick"] = entry["ratio"][name]
            for k, values in predicted.items():
                row[f"{k} predicted"] = values.get(name, math.nan)
            rows.append(row)
    return rows


def format_report(report: dict) -> str:
    """The printed form: a header (ncu, device) and one table per shape."""
    out = [f"ncu: {report['ncu']['version'] or report['ncu']['path']}"]
    dev = report.get("device") or {}
    if dev.get("name"):
        out.append(f"device: {dev['name']} (sm_{dev.get('compute_capability', '?').replace('.', '')})")
    if report.get("command"):
        out.append(f"command: {report['command']}")
    out.append(f"ncu command: {report['ncu']['command']}")
    rows = table_rows(report)
    for entry in report["results"]:
        out.append("")
        out.append(f"M={entry['M']} N={entry['N']} K={entry['K']} group_size={entry['group_size']}")
        for k, info in entry["kernels"].items():
            out.append(f"  {k}: {info['calls']} call(s), each summed over "
                       f"{' + '.join(short_kernel_name(n) for n in info['launch_names'])}")
        mine = [r for r in rows if (r["M"], r["N"], r["K"], r["group_size"]) ==
                (entry["M"], entry["N"], entry["K"], entry["group_size"])]
        columns = [c for c in mine[0] if c not in ("M", "N", "K", "group_size", "metric", "label", "unit")]
        width = max(len(f"{r['metric']} [{r['unit']}]") if r["unit"] else len(r["metric"]) for r in mine)
        col = max(16, *(len(c) + 2 for c in columns))
        out.append("  " + "metric".ljust(width) + "".join(c.rjust(col) for c in columns))
        for r in mine:
            name = f"{r['metric']} [{r['unit']}]" if r["unit"] else r["metric"]
            out.append("  " + name.ljust(width) + "".join(
                (_fmt_ratio(r[c]) if c == "awq/quick" else _fmt(r[c])).rjust(col) for c in columns))
    return "\n".join(out)


def output_paths(out: str):
    """--out PREFIX (a trailing .csv or .json is dropped) -> (PREFIX.csv, PREFIX.json)."""
    stem, ext = os.path.splitext(out)
    if ext.lower() not in (".csv", ".json"):
        stem = out
    return stem + ".csv", stem + ".json"


def save_report(report: dict, out: str):
    """Writes the long-form CSV and the full JSON report; returns their paths."""
    csv_path, json_path = output_paths(out)
    for path in (csv_path, json_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = table_rows(report)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    write_json(json_path, report, indent=2)
    return csv_path, json_path



"""Reading and writing Nsight Compute results (no GPU, no ncu needed): ncu's CSV output parsed
into launches, launches grouped into GEMM calls and summarized per shape, and the report printed
and saved. :mod:`quickcupy.tools.ncu` runs ncu and uses these."""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field

from ..kernels import cuda_dir
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
    nvtx: tuple = ()     # NVTX push/pop ranges around the launch, outermost first (ncu --nvtx)


def parse_nvtx_ranges(text: str) -> tuple:
    """ncu's "thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg" cell -> the
    range names, outermost first. The cell is a thread id then one quoted
    "<domain>:<name>:<6 attribute fields>" per open range."""
    names = []
    for item in re.findall(r'"([^"]*)"', text):
        if ":" in item:
            names.append(item.split(":", 1)[1].rsplit(":", 6)[0])
    return tuple(names)


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
    nvtx_col = next((i for i, name in enumerate(header) if "Push/Pop_Range" in name), None)
    launches, order = {}, []
    for lineno, line in enumerate(lines[start + 1:], start + 2):
        line = line.strip()
        if not line.startswith('"'):
            continue
        row = next(csv.reader([line]))
        if row == header:
            continue
        if len(row) > len(header) or len(row) <= col["Metric Value"]:
            raise ValueError(f"ncu CSV line {lineno} has {len(row)} fields, the header {len(header)}")
        row += [""] * (len(header) - len(row))   # rule columns are left off rows without a rule
        key = (row[col["Process ID"]], int(row[col["ID"]]))
        if key not in launches:
            launches[key] = KernelLaunch(
                id=key[1], process_id=key[0], name=row[col["Kernel Name"]],
                block_size=row[col["Block Size"]] if "Block Size" in col else "",
                grid_size=row[col["Grid Size"]] if "Grid Size" in col else "",
                nvtx=parse_nvtx_ranges(row[nvtx_col]) if nvtx_col is not None else ())
            order.append(key)
        if not row[col["Metric Name"]]:          # a rule's row (SourceCounters advice): no metric
            continue
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




# ----------------------------------------------------------------------------- NVTX attribution
# The child wraps its measured calls in one NVTX push/pop range ROOT_RANGE (ncu profiles only inside
# it: --nvtx-include "quickcupy_ncu/") and each call in a range named by call_range(); with --nvtx,
# ncu's CSV lists the open ranges of every launch (KernelLaunch.nvtx).
ROOT_RANGE = "quickcupy_ncu"
_RANGE = re.compile(r"(?P<kernel>[\w.]+) M=(?P<M>\d+) N=(?P<N>\d+) K=(?P<K>\d+) g=(?P<g>-?\d+) #(?P<rep>\d+)")


def call_range(call: dict) -> str:
    """NVTX range name of one measured GEMM call, e.g. "awq M=16 N=4096 K=4096 g=128 #0" (no "/":
    ncu's NVTX filter uses it to nest ranges)."""
    return (f"{call['kernel']} M={call['M']} N={call['N']} K={call['K']} g={call['group_size']} "
            f"#{call['repeat']}")


def range_of(name: str):
    """The call_range() text inside a (renamed) launch name, or None."""
    m = _RANGE.search(name)
    return m.group(0) if m else None


def group_by_range(launches: list, calls: list) -> list:
    """[(call, [KernelLaunch, ...])] in the child's call order, launches joined to calls by their
    innermost NVTX range (KernelLaunch.nvtx). Raises NcuError naming the launch or call that does not
    fit (no range, an unknown range, a call without launches, a first launch of another kernel family).
    """
    by_range = {call_range(c): [] for c in calls}
    for launch in launches:
        rng = range_of(launch.nvtx[-1]) if launch.nvtx else None
        if rng is None:
            raise NcuError(f"launch {launch.id} ({short_kernel_name(launch.name)}) is in no quickcupy "
                           f"NVTX range (ranges: {list(launch.nvtx)})")
        if rng not in by_range:
            raise NcuError(f"launch {launch.id} is in NVTX range {rng!r}, which the child did not make")
        by_range[rng].append(launch)
    grouped = []
    for call in calls:
        group = by_range[call_range(call)]
        if not group:
            raise NcuError(f"ncu profiled no launch in NVTX range {call_range(call)!r} "
                           "(adjust --kernel-regex?)")
        if call.get("layout", call["kernel"]) not in group[0].name.lower():
            raise NcuError(f"NVTX range {call_range(call)!r} starts with {short_kernel_name(group[0].name)!r}, "
                           f"not a {call.get('layout', call['kernel'])} kernel")
        grouped.append((call, group))
    return grouped


# ------------------------------------------------------------------------- per-source-line table
# Columns of ncu's source page (--page source --csv --print-source cuda,sass) the per-line table reads,
# as Nsight Compute 2025.3 names them. "L1 Wavefronts Shared" counts all shared-memory wavefronts of a
# line or instruction (ideal + excessive); "Excessive" = those above the ideal: bank conflicts, and
# for LDGSTS what the tables in BENCHMARKS.md explain.
SOURCE_COLUMNS = {
    "inst": "Instructions Executed",
    "wavefronts": "L1 Wavefronts Shared",
    "ideal": "L1 Wavefronts Shared Ideal",
    "excessive": "L1 Wavefronts Shared Excessive",
}


@dataclass
class SourceRow:
    """One row of ncu's source page: a CUDA line (address "") or a SASS instruction under it."""
    file: str
    line: int            # CUDA line number (for a SASS row: of the CUDA line it is listed under)
    address: str         # SASS address, "" for a CUDA line
    source: str          # the line's text or the SASS instruction
    values: dict         # {"inst", "wavefronts", "ideal", "excessive"}: float, NaN if not reported


def parse_source_csv(text: str) -> list:
    """[SourceRow] from ``ncu --import R --page source --csv --print-source cuda,sass`` (or sass).

    The page is blocks of ``"File Path","<path>"``, ``"Function Name",...``, a header ("Line No",
    "Source", "Address", "Source", metrics...) and rows: a CUDA line (its metrics summed over its
    instructions) followed by its SASS instructions ("..." rows mark skipped ones). An instruction of
    an inlined helper is listed under the helper's line and again under the call site's. Raises
    ValueError when no header is found.
    """
    rows, header, current, line_no = [], None, "", 0
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw.startswith('"'):
            continue
        fields = _source_fields(raw, len(header) if header else None)
        if fields[0] in ("File Path", "File Name") and len(fields) >= 2:
            current = fields[1]
            continue
        if fields[0] in ("Line No", "Address", "# Address"):
            header = fields
            idx = {key: header.index(name) for key, name in SOURCE_COLUMNS.items() if name in header}
            addr = next((i for i, h in enumerate(header) if h in ("Address", "# Address")), None)
            has_line = header[0] == "Line No"
            continue
        if header is None or len(fields) < len(header) or fields[0] in ("Kernel Name", "Function Name"):
            continue
        address = fields[addr].strip() if addr is not None else ""
        if has_line and fields[0].strip().isdigit():
            line_no, address, text_col = int(fields[0]), "", 1
        elif address.startswith("0x"):
            text_col = addr + 1
        else:
            continue                      # "..." rows and anything else
        values = {}
        for key in SOURCE_COLUMNS:
            try:
                values[key] = parse_value(fields[idx[key]])[0] if key in idx else math.nan
            except ValueError:            # "-" where a metric does not apply
                values[key] = math.nan
        rows.append(SourceRow(file=current, line=line_no, address=address,
                              source=fields[text_col].rstrip(), values=values))
    if header is None:
        raise ValueError("no ncu source-page header (\"Line No\" or \"Address\" ...) in the output")
    return rows


def _source_fields(raw: str, width):
    """One CSV row of the source page. ncu writes CUDA text with its double quotes unescaped
    (``"r"(bytes)``), which a CSV reader splits wrongly; a row that does not give ``width`` fields
    is split at the '","' between fields instead."""
    fields = next(csv.reader([raw]))
    if width is None or len(fields) == width or not raw.endswith('"'):
        return fields
    parts = raw[1:-1].split('","')
    return parts if len(parts) == width else fields


def per_line(rows: list) -> list:
    """The CUDA-line rows, summed per (file, line) where a line is listed twice, in file, line order."""
    merged = {}
    for r in rows:
        if r.address:
            continue
        key = (r.file, r.line)
        if key not in merged:
            merged[key] = SourceRow(r.file, r.line, "", r.source, {k: 0.0 for k in SOURCE_COLUMNS})
        for k in SOURCE_COLUMNS:
            merged[key].values[k] += r.values.get(k, math.nan)
    return [merged[k] for k in sorted(merged, key=lambda k: (k[0], k[1]))]


def kernel_totals(rows: list) -> dict:
    """Sums over the distinct SASS instructions (each counted once, however many lines list it)."""
    seen = {r.address: r for r in rows if r.address}
    return {k: math.fsum(v for v in (r.values[k] for r in seen.values()) if not math.isnan(v))
            for k in SOURCE_COLUMNS}


def format_lines(lines: list, totals: dict | None = None, only_shared: bool = True) -> str:
    """The per-line table: file:line, instructions executed, shared wavefronts, ideal, excessive, text.

    only_shared keeps lines with shared-memory wavefronts; ``totals`` (:func:`kernel_totals`) adds the
    kernel's row. An inlined helper's line and its call site count the same instructions.
    """
    keep = [r for r in lines if not only_shared or (r.values["wavefronts"] or 0) > 0]
    width = max([len(f"{os.path.basename(r.file)}:{r.line}") for r in keep] + [12]) + 2
    out = [f"{'file:line':<{width}}{'inst executed':>14}{'shared wavefronts':>19}{'ideal':>12}"
           f"{'excessive':>12}  source"]
    for r in keep:
        where = f"{os.path.basename(r.file) or '?'}:{r.line}"
        out.append(f"{where:<{width}}{_fmt(r.values['inst']):>14}{_fmt(r.values['wavefronts']):>19}"
                   f"{_fmt(r.values['ideal']):>12}{_fmt(r.values['excessive']):>12}  {r.source.strip()[:110]}")
    if totals:
        out.append(f"{'kernel':<{width}}{_fmt(totals['inst']):>14}{_fmt(totals['wavefronts']):>19}"
                   f"{_fmt(totals['ideal']):>12}{_fmt(totals['excessive']):>12}  (every SASS instruction once)")
    return "\n".join(out)


def fill_source(rows: list, folder=None) -> list:
    """CUDA-line rows take their text from the file of the same name in ``folder`` (default
    quickcupy.kernels.cuda_dir()) where it exists, else keep ncu's; returns the rows."""
    folder = cuda_dir() if folder is None else folder
    cache = {}
    for r in rows:
        if not r.file or r.address:
            continue
        path = os.path.join(folder, os.path.basename(r.file))
        if path not in cache:
            cache[path] = open(path).read().splitlines() if os.path.isfile(path) else []
        lines = cache[path]
        if 1 <= r.line <= len(lines):
            r.source = lines[r.line - 1]
    return rows

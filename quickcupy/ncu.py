"""``python -m quickcupy ncu``: Nsight Compute counters of the AWQ and QUICK GEMM kernels, side by side.

The tool re-runs this module as a child process under
``ncu --target-processes all --clock-control none --kernel-name regex:<filter> --metrics <METRICS>
--csv --print-units base``. The child makes each requested GEMM call (``quickcupy.gemm``) a few
times per shape and writes a manifest listing its calls in order; ncu numbers the kernel launches it
profiles in the same order. A launch whose name matches :data:`REDUCE_PATTERN` (the split-K
reduction kernel ``splitk_reduce``) is added to the GEMM call before it; any other launch starts the
next call. The default ``--kernel-regex`` (:data:`KERNEL_REGEX`) includes the reduction, so each
column is the whole GEMM call; the kernel names summed for each column are printed and saved.

Per shape, each metric is the sum over the launches of one GEMM call, the median over the repeats
(warm-up calls excluded). Results print as a table (rows: metrics; columns: awq, quick, awq/quick)
and, with ``--out PREFIX``, go to PREFIX.csv and PREFIX.json.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from .device import no_gpu_reason
from .report import jsonable, write_json

KERNELS = ("awq", "quick")                       # default; any of quickcupy.gemm.KERNELS
# The GEMM kernels and the split-K reduction (cuda/splitk_reduce.cu), which is part of a call's cost.
KERNEL_REGEX = "awq_gemm|quick_gemm|splitk_reduce"
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
)
METRIC_NAMES = tuple(name for _, name in METRICS)

# Where ncu is looked for after PATH.
NCU_FALLBACKS = ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu")

PERMISSION_HELP = ("ncu may not read the GPU performance counters here (ERR_NVGPUCTRPERM): run as root "
                   "or allow profiling by all users (NVreg_RestrictProfilingToAdminUsers=0), see "
                   "https://developer.nvidia.com/ERR_NVGPUCTRPERM")

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


# -------------------------------------------------------------------------------- running ncu
def find_ncu(explicit: str | None = None) -> str:
    """Path of the ncu executable: ``explicit``, else PATH, /usr/local/cuda/bin, /opt/nvidia/nsight-compute/*.

    Raises NcuError (one line) when none is found.
    """
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise NcuError(f"--ncu {explicit} is not an executable file")
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in NCU_FALLBACKS:
        for path in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    raise NcuError("ncu (Nsight Compute) not found on PATH, in /usr/local/cuda/bin or "
                   "/opt/nvidia/nsight-compute/*; install Nsight Compute or pass --ncu PATH")


def _version_key(path: str):
    return [int(p) if p.isdigit() else -1 for p in re.split(r"[^0-9]+", path) if p]


def ncu_version(ncu: str) -> str:
    """Last line of ``ncu --version`` ("Version 2025.x ..."), or "" if it fails."""
    try:
        out = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def ncu_command(ncu: str, child_argv: list, kernel_regex: str = KERNEL_REGEX,
                metrics=METRIC_NAMES) -> list:
    """The ncu command line that profiles ``child_argv`` (counters only, clocks left alone)."""
    return [ncu, "--target-processes", "all", "--clock-control", "none",
            "--kernel-name", f"regex:{kernel_regex}", "--metrics", ",".join(metrics),
            "--csv", "--print-units", "base", *child_argv]


def _check_output(output: str, kernel_regex: str):
    """Turns ncu's known failures into one-line NcuErrors."""
    if "ERR_NVGPUCTRPERM" in output:
        raise NcuError(PERMISSION_HELP)
    for line in output.splitlines():
        if "Failed to find metric" in line or "Failed to profile" in line:
            raise NcuError(f"ncu: {line.strip().removeprefix('==ERROR==').strip()}")
    if "No kernels were profiled" in output:
        raise NcuError(f"ncu profiled no kernel matching regex:{kernel_regex}")


def run_ncu(child_argv: list, kernel_regex: str = KERNEL_REGEX, metrics=METRIC_NAMES,
            ncu: str | None = None, timeout: float | None = None, env=None):
    """Runs ``child_argv`` under ncu; returns (launches, completed_process).

    launches: [KernelLaunch] in launch order. Raises NcuError with a one-line reason when ncu is
    missing, may not read counters, rejects a metric, profiles nothing, or the child fails.
    """
    exe = find_ncu(ncu)
    cmd = ncu_command(exe, child_argv, kernel_regex, metrics)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise NcuError(f"ncu did not finish within {timeout} s") from None
    output = proc.stdout + "\n" + proc.stderr
    _check_output(output, kernel_regex)
    if proc.returncode != 0:
        raise NcuError(f"ncu or the profiled process failed (exit status {proc.returncode}): "
                       f"{_last_message(proc.stderr) or _last_message(proc.stdout)}")
    try:
        launches = parse_ncu_csv(proc.stdout)
    except ValueError as exc:
        raise NcuError(f"could not read ncu's CSV output: {exc}") from None
    return launches, proc


def _last_message(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("==PROF==")]
    return lines[-1] if lines else ""


def child_argv(manifest: str, kernels, Ms, N: int, K: int, group_size: int, repeats: int,
               warmup: int) -> list:
    """The command line of the child process that makes the GEMM calls ncu profiles."""
    return [sys.executable, "-m", "quickcupy.ncu", "--child", "--manifest", manifest,
            "--kernels", *kernels, "--M", *map(str, Ms), "--N", str(N), "--K", str(K),
            "--group-size", str(group_size), "--repeats", str(repeats), "--warmup", str(warmup)]


def profile(kernels=KERNELS, Ms=(16, 128), N: int = 8192, K: int = 8192, group_size: int = 128,
            repeats: int = 3, warmup: int = 1, kernel_regex: str = KERNEL_REGEX, ncu: str | None = None,
            timeout: float | None = None) -> dict:
    """Profiles the GEMM kernels under ncu; returns the report (as saved to JSON).

    Keys: "ncu" (path, version, command), "device", "metrics", "kernel_regex", "results" (see
    :func:`summarize`; each entry also has "ratio" = awq/quick per metric when both ran) and
    "launches" (every profiled launch: id, name, grid, block, metrics).
    """
    exe = find_ncu(ncu)
    with tempfile.TemporaryDirectory(prefix="quickcupy-ncu-") as tmp:
        manifest_path = os.path.join(tmp, "calls.json")
        argv = child_argv(manifest_path, kernels, Ms, N, K, group_size, repeats, warmup)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        launches, proc = run_ncu(argv, kernel_regex, METRIC_NAMES, exe, timeout, env)
        if not os.path.exists(manifest_path):
            raise NcuError("the profiled process wrote no list of its calls: "
                           f"{_last_message(proc.stderr) or 'no message'}")
        with open(manifest_path) as f:
            manifest = json.load(f)
    results = summarize(group_calls(launches, manifest["calls"]))
    for entry in results:
        ks = entry["kernels"]
        if "awq" in ks and "quick" in ks:
            entry["ratio"] = {m: _ratio(ks["awq"]["metrics"][m], ks["quick"]["metrics"][m])
                              for m in METRIC_NAMES}
    return {
        "ncu": {"path": exe, "version": ncu_version(exe),
                "command": shlex.join(ncu_command(exe, argv, kernel_regex))},
        "device": manifest.get("device"),
        "versions": manifest.get("versions"),
        "metrics": dict((name, label) for label, name in METRICS),
        "kernel_regex": kernel_regex,
        "reduce_pattern": REDUCE_PATTERN.pattern,
        "results": results,
        "launches": [{"id": l.id, "name": l.name, "grid": l.grid_size, "block": l.block_size,
                      "metrics": l.metrics} for l in launches],
    }


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan if (a != 0 or b != 0) else 1.0
    return a / b


# ------------------------------------------------------------------------- predictions (hook)
# ncu label -> the smem_predict quantities that add up to it (our kernels issue no plain ld.shared;
# ldmatrix wavefronts are counted among the ld ones).
PREDICTED_FROM = {
    "shared st inst": ("st_inst",),
    "shared ld inst": (),
    "ldmatrix inst": ("ldsm_inst",),
    "cp.async inst": ("ldgsts_inst",),
    "st wavefronts": ("st_wavefronts",),
    "ld wavefronts": ("ldsm_wavefronts",),
    "cp.async wavefronts": ("ldgsts_wavefronts",),
    "st conflicts": ("st_conflicts",),
    "ld conflicts": ("ldsm_conflicts",),
    "cp.async conflicts": ("ldgsts_conflicts",),
    "all wavefronts": ("st_wavefronts", "ldsm_wavefronts", "ldgsts_wavefronts"),
}


def predicted_metrics(kernel: str, M: int, N: int, K: int, group_size: int):
    """Metric values the bank-conflict model predicts for one GEMM call (quickcupy.smem_predict,
    from the index maps the kernels are compiled with): {ncu metric name: value}, None for a
    kernel the model does not know. A dict adds a "<kernel> predicted" column."""
    from .smem_predict import predict
    try:
        p = predict(kernel, M, N, K, group_size)
    except ValueError:
        return None
    names = dict(METRICS)
    return {names[label]: sum(p[q] for q in parts) for label, parts in PREDICTED_FROM.items()}


def add_predictions(report: dict, predictor=None) -> bool:
    """Stores ``predictor``'s values (default :func:`predicted_metrics`) under
    results[i]["predicted"][kernel]; True if any exist."""
    predictor = predictor or predicted_metrics
    any_found = False
    for entry in report["results"]:
        pred = {k: predictor(k, entry["M"], entry["N"], entry["K"], entry["group_size"])
                for k in entry["kernels"]}
        pred = {k: v for k, v in pred.items() if v is not None}
        if pred:
            entry["predicted"] = pred
            any_found = True
    return any_found


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


# --------------------------------------------------------------------------------------- CLI
def add_parser(subparsers):
    """Registers ``ncu`` on the ``python -m quickcupy`` command line."""
    p = subparsers.add_parser(
        "ncu", help="Nsight Compute shared-memory counters of the AWQ and QUICK GEMM kernels",
        description=__doc__.splitlines()[0])
    _add_shape_arguments(p)
    p.add_argument("--kernel-regex", default=KERNEL_REGEX,
                   help=f"ncu kernel-name filter (default {KERNEL_REGEX!r}; a split-K reduce kernel "
                        "is counted only if it matches)")
    p.add_argument("--ncu", default=None, help="path of the ncu executable (default: found on PATH, "
                                               "in /usr/local/cuda/bin or /opt/nvidia/nsight-compute)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before giving up on ncu")
    p.add_argument("--out", default=None, help="save PREFIX.csv and PREFIX.json")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of tables")
    p.set_defaults(func=run)
    return p


def _add_shape_arguments(p):
    from .gemm import KERNELS as GEMM_KERNELS
    p.add_argument("--kernels", nargs="+", choices=tuple(GEMM_KERNELS), default=list(KERNELS),
                   help="kernels to profile (default: awq quick)")
    p.add_argument("--M", "-M", dest="M", nargs="+", type=int, default=[16, 128],
                   help="rows of x (default 16 128)")
    p.add_argument("--K", "-K", dest="K", type=int, default=8192, help="in_features (default 8192)")
    p.add_argument("--N", "-N", dest="N", type=int, default=None, help="out_features (default: K)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="profiled calls per kernel and shape (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="calls before those, left out (default 1)")


def check_args(args):
    """Validates parsed arguments in place (N defaults to K); raises UsageError with the rule."""
    from .errors import UsageError
    from .quantize import check_group_size
    if args.N is None:
        args.N = args.K
    for name in ("K", "N"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)} must be positive")
    bad = [m for m in args.M if m < 1]
    if bad:
        raise UsageError(f"--M {bad[0]} must be positive")
    try:
        check_group_size(args.group_size, args.K)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--group-size: {exc}") from None
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats} must be at least 1")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup} must not be negative")
    args.kernels = list(dict.fromkeys(args.kernels))
    args.M = list(dict.fromkeys(args.M))
    if hasattr(args, "kernel_regex"):
        if not args.kernel_regex.strip():
            raise UsageError("--kernel-regex must not be empty")
        try:
            re.compile(args.kernel_regex)
        except re.error as exc:
            raise UsageError(f"--kernel-regex {args.kernel_regex!r} is not a regular expression: {exc}")
    if getattr(args, "timeout", None) is not None and args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout} must be positive")
    if getattr(args, "ncu", None) and not os.path.isfile(args.ncu):
        raise UsageError(f"--ncu {args.ncu} does not exist")


def run(args) -> int:
    """``python -m quickcupy ncu``: profile, print the tables, save with --out."""
    check_args(args)
    prog = "python -m quickcupy ncu"
    try:
        find_ncu(args.ncu)
        reason = no_gpu_reason()
        if reason is not None:
            raise NcuError(f"no GPU: {reason}")
        report = profile(args.kernels, args.M, args.N, args.K, args.group_size, args.repeats,
                         args.warmup, args.kernel_regex, args.ncu, args.timeout)
    except NcuError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    add_predictions(report)
    if getattr(args, "command_line", None):         # started through python -m quickcupy ncu ...
        report["command"] = args.command_line
    print(json.dumps(jsonable(report), indent=2) if args.json else format_report(report))
    if args.out:
        for path in save_report(report, args.out):
            print(f"saved {path}")
    return 0


# ------------------------------------------------------------------------------ child process
def _child_main(argv) -> int:
    """Makes the GEMM calls (run under ncu) and writes the manifest of calls in order."""
    import argparse
    import numpy as np
    import cupy as cp
    import quickcupy
    from quickcupy import QuantLinear, quantize
    from .device import device_info, versions
    from .gemm import kernel_layout

    p = argparse.ArgumentParser(prog="python -m quickcupy.ncu --child")
    p.add_argument("--child", action="store_true", required=True)
    p.add_argument("--manifest", required=True)
    _add_shape_arguments(p)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.N, args.K), dtype=np.float32) * 0.02).astype(np.float16)
    q = quantize(w, args.group_size)
    layouts = {k: kernel_layout(k) for k in args.kernels}
    layers = {lay: QuantLinear.from_quantized(q, layout=lay) for lay in set(layouts.values())}
    calls = []
    for M in args.M:
        x = cp.asarray(rng.standard_normal((M, args.K), dtype=np.float32).astype(np.float16))
        for kernel in args.kernels:
            for rep in range(-args.warmup, args.repeats):
                calls.append({"kernel": kernel, "layout": layouts[kernel], "M": M, "N": args.N,
                              "K": args.K, "group_size": args.group_size, "repeat": rep,
                              "warmup": rep < 0})
                quickcupy.gemm(x, layers[layouts[kernel]], kernel=kernel)
                cp.cuda.Device().synchronize()
    tmp = args.manifest + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"calls": calls, "device": device_info(), "versions": versions()}, f)
    os.replace(tmp, args.manifest)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))

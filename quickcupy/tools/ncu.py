"""``python -m quickcupy ncu``: Nsight Compute counters of the AWQ and QUICK GEMM kernels, side by side.

The tool re-runs this module as a child process under
``ncu --target-processes all --clock-control none --nvtx --nvtx-include quickcupy_ncu/
--kernel-name regex:<filter> --metrics <METRICS> --csv --print-units base``. The child makes each
requested GEMM call (``quickcupy.gemm``) a few times per shape, each measured call inside the NVTX
push/pop ranges ``quickcupy_ncu`` and ``call_range(call)`` (e.g. "awq M=16 N=4096 K=4096 g=128 #0");
warm-up calls run outside them, so ncu does not profile them. ncu lists each launch's open ranges,
and the launches of one range (the GEMM and, with split-K, its ``splitk_reduce``) make one call.
``--no-nvtx`` attributes by launch order instead (a launch matching :data:`REDUCE_PATTERN` joins the
call before it). The default ``--kernel-regex`` (:data:`KERNEL_REGEX`) includes the reduction, so
each column is the whole GEMM call; the kernel names summed for each column are printed and saved.

Per shape, each metric is the sum over the launches of one GEMM call, the median over the repeats.
Results print as a table (rows: metrics; columns: awq, quick, awq/quick, the model's predictions)
and, with ``--out PREFIX``, go to PREFIX.csv and PREFIX.json. ``--export PATH`` keeps ncu's report
(``.ncu-rep``). ``--lineinfo`` compiles the kernels with ``-lineinfo`` (``QUICKCUPY_LINEINFO=1``),
adds ncu's SourceCounters section and prints, per CUDA source line of each kernel's first measured
call, instructions executed, shared-memory wavefronts and excessive wavefronts (from the report's
source page); with ``--out`` also PREFIX_lines_<kernel>.txt.
"""
from __future__ import annotations

import argparse
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
from dataclasses import dataclass

from .. import QuantLinear, gemm, quantize, registry
from .. import kernels as kernels_mod
from ..analysis.smem_predict import predict
from ..device import device_info, no_gpu_reason, versions
from ..gemm import kernel_layout
from .common import (UsageError, check_output_path, deprecated, jsonable, parse_group_size, parse_ms, parse_names,
                     parse_shapes)
from .ncu_report import (  # noqa: F401
    METRIC_NAMES,
    METRICS,
    REDUCE_PATTERN,
    ROOT_RANGE,
    KernelLaunch,
    NcuError,
    SourceRow,
    call_range,
    fill_source,
    format_lines,
    format_report,
    group_by_range,
    group_calls,
    kernel_totals,
    output_paths,
    parse_ncu_csv,
    parse_source_csv,
    parse_value,
    per_line,
    range_of,
    save_report,
    short_kernel_name,
    summarize,
)

KERNELS = ("awq", "quick")                   # profiled by default; any of quickcupy.registry.VARIANTS
GEMM_KERNELS = tuple(k for k, v in registry.VARIANTS.items() if v.path == "gemm")   # what --kernels takes
DEFAULT_MS, DEFAULT_SHAPE = "16,128", "8192x8192"
KERNEL_REGEX = registry.NCU_KERNEL_REGEX     # every GEMM design and the split-K reduction

# Where ncu is looked for after PATH.
NCU_FALLBACKS = ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu")

PERMISSION_HELP = ("ncu may not read the GPU performance counters here (ERR_NVGPUCTRPERM): run as root "
                   "or allow profiling by all users (NVreg_RestrictProfilingToAdminUsers=0), see "
                   "https://developer.nvidia.com/ERR_NVGPUCTRPERM")

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
                metrics=METRIC_NAMES, report: str | None = None, nvtx: bool = True,
                lineinfo: bool = False) -> list:
    """The ncu command line that profiles ``child_argv`` (clocks left alone).

    nvtx: only launches inside the child's NVTX range ROOT_RANGE are profiled (warm-up calls are
    made outside it). report: ``--export`` to that .ncu-rep (read back with :func:`import_command`);
    None prints the CSV instead. lineinfo: also the SourceCounters section (per-instruction counters
    for the source page) with the CUDA sources embedded in the report.
    """
    cmd = [ncu, "--target-processes", "all", "--clock-control", "none"]
    if nvtx:
        cmd += ["--nvtx", "--nvtx-include", f"{ROOT_RANGE}/"]
    cmd += ["--kernel-name", f"regex:{kernel_regex}", "--metrics", ",".join(metrics)]
    if lineinfo:
        cmd += ["--section", "SourceCounters", "--import-source", "yes"]
    if report:
        return cmd + ["--export", report, "--force-overwrite", *child_argv]
    return cmd + ["--csv", "--print-units", "base", *child_argv]


def import_command(ncu: str, report: str) -> list:
    """ncu reading back a saved report as the same CSV (NVTX ranges included when recorded)."""
    return [ncu, "--import", report, "--csv", "--print-units", "base", "--page", "details"]


def source_command(ncu: str, report: str, function: str, skip: int, view: str = "cuda,sass") -> list:
    """ncu's source page (CSV) of one launch in a saved report: the ``skip``-th launch (0-based)
    of kernel ``function``. View "cuda,sass": each CUDA line with its counters, then its SASS
    instructions (needs -lineinfo; the "cuda" view alone prints the text without counters); "sass"."""
    return [ncu, "--import", report, "--page", "source", "--csv", "--print-source", view,
            "--kernel-name", f"regex:^{function}", "--launch-skip", str(skip), "--launch-count", "1"]


def _check_output(output: str, kernel_regex: str):
    """Turns ncu's known failures into one-line NcuErrors."""
    if "ERR_NVGPUCTRPERM" in output:
        raise NcuError(PERMISSION_HELP)
    for line in output.splitlines():
        if "Failed to find metric" in line or "Failed to profile" in line:
            raise NcuError(f"ncu: {line.strip().removeprefix('==ERROR==').strip()}")
    if "No kernels were profiled" in output:
        child = _last_message(output.split("No kernels were profiled")[0])
        raise NcuError(f"ncu profiled no kernel matching regex:{kernel_regex} inside NVTX range "
                       f"{ROOT_RANGE} (without NVTX: --no-nvtx); last message: {child or 'none'}")


def _run(cmd: list, timeout, env=None, what="ncu"):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise NcuError(f"{what} did not finish within {timeout} s") from None
    return proc


def run_ncu(child_argv: list, kernel_regex: str = KERNEL_REGEX, metrics=METRIC_NAMES,
            ncu: str | None = None, timeout: float | None = None, env=None, report: str | None = None,
            nvtx: bool = True, lineinfo: bool = False):
    """Runs ``child_argv`` under ncu; returns (launches, completed_process).

    launches: [KernelLaunch] in launch order, with their NVTX ranges when ``nvtx``. With ``report``
    the results go to that .ncu-rep and are read back from it. Raises NcuError with a one-line reason when ncu is
    missing, may not read counters, rejects a metric, profiles nothing, or the child fails.
    """
    exe = find_ncu(ncu)
    cmd = ncu_command(exe, child_argv, kernel_regex, metrics, report, nvtx, lineinfo)
    proc = _run(cmd, timeout, env)
    output = proc.stdout + "\n" + proc.stderr
    _check_output(output, kernel_regex)
    if proc.returncode != 0:
        raise NcuError(f"ncu or the profiled process failed (exit status {proc.returncode}): "
                       f"{_last_message(proc.stderr) or _last_message(proc.stdout)}")
    text = proc.stdout
    if report:
        if not os.path.exists(report):
            raise NcuError(f"ncu wrote no report {report}: {_last_message(output) or 'no message'}")
        text = _imported(exe, report, timeout)
    try:
        launches = parse_ncu_csv(text)
    except ValueError as exc:
        raise NcuError(f"could not read ncu's CSV output: {exc}") from None
    return launches, proc


def _imported(exe: str, report: str, timeout) -> str:
    proc = _run(import_command(exe, report), timeout, what="ncu --import")
    if proc.returncode != 0:
        raise NcuError(f"ncu --import {report} failed (exit status {proc.returncode}): "
                       f"{_last_message(proc.stderr) or _last_message(proc.stdout)}")
    return proc.stdout


def source_tables(exe: str, report: str, launches: list, grouped: list, kernels, timeout=None) -> dict:
    """Per kernel (its first measured call): {"function", "launch", "range", "command", "csv",
    "rows" (:func:`per_line` of ncu's source page), "totals" (:func:`kernel_totals`), "error" if
    the page could not be read}."""
    tables = {}
    for kernel in kernels:
        call, group = next(((c, g) for c, g in grouped if c["kernel"] == kernel and not c.get("warmup")),
                           (None, None))
        if call is None:
            continue
        function = registry.variant(kernel).design.function
        first = group[0]
        skip = sum(1 for l in launches if l.process_id == first.process_id and l.id < first.id
                   and short_kernel_name(l.name).split("<")[0] == function)
        cmd = source_command(exe, report, function, skip)
        tables[kernel] = {"function": function, "launch": first.id, "range": call_range(call),
                          "command": shlex.join(cmd), "rows": [], "totals": None, "csv": ""}
        # A table that cannot be read is reported, not fatal: the counters are already measured.
        try:
            proc = _run(cmd, timeout, what="ncu --page source")
            tables[kernel]["csv"] = proc.stdout
            if proc.returncode != 0:
                raise NcuError(f"ncu --page source failed (exit status {proc.returncode}): "
                               f"{_last_message(proc.stderr) or _last_message(proc.stdout)}")
            rows = parse_source_csv(proc.stdout)
            tables[kernel]["rows"] = fill_source(per_line(rows))
            tables[kernel]["totals"] = kernel_totals(rows)
        except (NcuError, ValueError) as exc:
            tables[kernel]["error"] = f"no per-line table for {kernel}: {exc}"
    return tables


def _last_message(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("==PROF==")]
    return lines[-1] if lines else ""


def child_argv(manifest: str, kernels, Ms, N: int, K: int, group_size: int, repeats: int,
               warmup: int, nvtx: bool = True) -> list:
    """The command line of the child process that makes the GEMM calls ncu profiles."""
    return [sys.executable, "-m", "quickcupy.tools.ncu", "--child", "--manifest", manifest,
            "--kernels", *kernels, "--M", *map(str, Ms), "--N", str(N), "--K", str(K),
            "--group-size", str(group_size), "--repeats", str(repeats), "--warmup", str(warmup),
            *([] if nvtx else ["--no-nvtx"])]


def profile(kernels=KERNELS, Ms=(16, 128), N: int = 8192, K: int = 8192, group_size: int = 128,
            repeats: int = 3, warmup: int = 1, kernel_regex: str = KERNEL_REGEX, ncu: str | None = None,
            timeout: float | None = None, export: str | None = None, nvtx: bool = True,
            lineinfo: bool = False) -> dict:
    """Profiles the GEMM kernels under ncu; returns the report (as saved to JSON).

    Keys: "ncu" (path, version, command), "device", "metrics", "kernel_regex", "attribution"
    ("nvtx": launches joined to calls by NVTX range; "launch order"), "results" (see
    :func:`summarize`; each entry also has "ratio" = awq/quick per metric when both ran),
    "launches" (every profiled launch: id, name, range, grid, block, metrics) and, with lineinfo,
    "lines" ({kernel: per-source-line table of its first measured call}). export: keep the
    .ncu-rep there (else it lives in a temporary folder; lineinfo needs one either way).
    """
    exe = find_ncu(ncu)
    with tempfile.TemporaryDirectory(prefix="quickcupy-ncu-") as tmp:
        manifest_path = os.path.join(tmp, "calls.json")
        report_path = export or (os.path.join(tmp, "profile.ncu-rep") if lineinfo else None)
        argv = child_argv(manifest_path, kernels, Ms, N, K, group_size, repeats, warmup, nvtx)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        if lineinfo:
            env[kernels_mod.LINEINFO_ENV] = "1"
        launches, proc = run_ncu(argv, kernel_regex, METRIC_NAMES, exe, timeout, env,
                                        report_path, nvtx, lineinfo)
        if not os.path.exists(manifest_path):
            raise NcuError("the profiled process wrote no list of its calls: "
                           f"{_last_message(proc.stderr) or 'no message'}")
        with open(manifest_path) as f:
            manifest = json.load(f)
        if nvtx:
            grouped = group_by_range(launches, [c for c in manifest["calls"] if not c["warmup"]])
        else:
            grouped = group_calls(launches, manifest["calls"])
        lines = source_tables(exe, report_path, launches, grouped, kernels, timeout) if lineinfo else {}
    results = summarize(grouped)
    for entry in results:
        ks = entry["kernels"]
        if "awq" in ks and "quick" in ks:
            entry["ratio"] = {m: _ratio(ks["awq"]["metrics"][m], ks["quick"]["metrics"][m])
                              for m in METRIC_NAMES}
    report = {
        "ncu": {"path": exe, "version": ncu_version(exe),
                "command": shlex.join(ncu_command(exe, argv, kernel_regex, METRIC_NAMES, report_path,
                                                  nvtx, lineinfo)),
                "export": export},
        "device": manifest.get("device"),
        "versions": manifest.get("versions"),
        "metrics": dict((name, label) for label, name in METRICS),
        "kernel_regex": kernel_regex,
        "attribution": "nvtx" if nvtx else "launch order",
        "reduce_pattern": REDUCE_PATTERN.pattern,
        "results": results,
        "launches": [{"id": l.id, "name": l.name, "range": range_of(l.nvtx[-1]) if l.nvtx else None,
                      "grid": l.grid_size, "block": l.block_size, "metrics": l.metrics} for l in launches],
    }
    if lineinfo:
        report["lines"] = {k: {"function": t["function"], "launch": t["launch"], "range": t["range"],
                               "command": t["command"], "error": t.get("error"), "totals": t["totals"],
                               "rows": [{"file": r.file, "line": r.line, "source": r.source, **r.values}
                                        for r in t["rows"]]}
                           for k, t in lines.items()}
    return report


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan if (a != 0 or b != 0) else 1.0
    return a / b


# ------------------------------------------------------------------------- predictions (hook)
# ncu label -> the smem_predict quantities that add up to it (ldmatrix wavefronts are counted among
# ncu's ld ones; plain ld.shared is quick_decode's split-K sums).
PREDICTED_FROM = {
    "shared st inst": ("st_inst",),
    "shared ld inst": ("ld_inst",),
    "ldmatrix inst": ("ldsm_inst",),
    "cp.async inst": ("ldgsts_inst",),
    "st wavefronts": ("st_wavefronts",),
    "ld wavefronts": ("ldsm_wavefronts", "ld_wavefronts"),
    "cp.async wavefronts": ("ldgsts_wavefronts",),
    "st conflicts": ("st_conflicts",),
    "ld conflicts": ("ldsm_conflicts", "ld_conflicts"),
    "cp.async conflicts": ("ldgsts_conflicts",),
    "all wavefronts": ("st_wavefronts", "ld_wavefronts", "ldsm_wavefronts", "ldgsts_wavefronts"),
}


def predicted_metrics(kernel: str, M: int, N: int, K: int, group_size: int):
    """Metric values the bank-conflict model predicts for one GEMM call (quickcupy.analysis.smem_predict,
    from the index maps the kernels are compiled with): {ncu metric name: value}, None for a
    kernel the model does not know. A dict adds a "<kernel> predicted" column."""
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


# --------------------------------------------------------------------------------------- CLI
@dataclass(frozen=True)
class Settings:
    """What one ``ncu`` run profiles, parsed and checked once."""
    kernels: tuple
    M: tuple
    N: int
    K: int
    group_size: int
    repeats: int
    warmup: int
    kernel_regex: str = KERNEL_REGEX
    ncu: str | None = None
    timeout: float | None = None
    out: str | None = None
    json: bool = False
    command: str | None = None
    export: str | None = None
    nvtx: bool = True
    lineinfo: bool = False


def add_parser(subparsers):
    """Registers ``ncu`` on the ``python -m quickcupy`` command line."""
    p = subparsers.add_parser(
        "ncu", help="Nsight Compute shared-memory counters of the AWQ and QUICK GEMM kernels",
        description="Runs GEMM calls under Nsight Compute (ncu) and prints each kernel's shared-memory and DRAM "
                    "counters side by side (awq, quick, their ratio), next to the bank model's predictions. "
                    "Needs a GPU and ncu.")
    p.add_argument("--kernels", nargs="+", default=None, metavar="NAMES",
                   help=f"comma-separated kernels to profile, from {', '.join(GEMM_KERNELS)} (default: "
                        f"{','.join(KERNELS)})")
    p.add_argument("--m", default=DEFAULT_MS, help="comma-separated M values (rows of x); default: %(default)s")
    p.add_argument("--shapes", default=None,
                   help=f"the KxN weight shape (one per run; x is M x K); default: {DEFAULT_SHAPE}")
    # The old spellings of --m and --shapes: still read, with a note on stderr.
    p.add_argument("--M", "-M", dest="M", nargs="+", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--K", "-K", dest="K", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--N", "-N", dest="N", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, default=128,
                   help="quantization group size: -1 or a multiple of 32 dividing K (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="profiled calls per kernel and shape (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="calls before those, left out (default 1)")
    p.add_argument("--kernel-regex", default=KERNEL_REGEX,
                   help=f"ncu kernel-name filter (default {KERNEL_REGEX!r}; a split-K reduce kernel "
                        "is counted only if it matches)")
    p.add_argument("--ncu", default=None, help="path of the ncu executable (default: found on PATH, "
                                               "in /usr/local/cuda/bin or /opt/nvidia/nsight-compute)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before giving up on ncu")
    p.add_argument("--out", default=None, help="save PREFIX.csv and PREFIX.json")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of tables")
    p.add_argument("--export", default=None, metavar="PATH",
                   help="keep ncu's report as PATH (.ncu-rep added if missing), for the Nsight Compute GUI")
    p.add_argument("--lineinfo", action="store_true",
                   help="compile the kernels with -lineinfo and print, per CUDA source line of each "
                        "kernel's first measured call, instructions executed, shared-memory wavefronts "
                        "and excessive (conflict) wavefronts; with --out also PREFIX_lines_<kernel>.txt")
    p.add_argument("--no-nvtx", dest="nvtx", action="store_false",
                   help="attribute launches to calls by launch order instead of NVTX ranges")
    p.set_defaults(func=run)
    return p


def _add_shape_arguments(p):
    """The child process's options (what child_argv writes)."""
    p.add_argument("--kernels", nargs="+", default=list(KERNELS),
                   choices=tuple(k for k, v in registry.VARIANTS.items() if v.path == "gemm"),
                   help="kernels to profile (default: awq quick)")
    p.add_argument("--M", "-M", dest="M", nargs="+", type=int, default=[16, 128],
                   help="rows of x (default 16 128)")
    p.add_argument("--K", "-K", dest="K", type=int, default=8192, help="in_features (default 8192)")
    p.add_argument("--N", "-N", dest="N", type=int, default=None, help="out_features (default: K)")
    p.add_argument("--group-size", type=int, default=128,
                   help="quantization group size: -1 or a multiple of 32 dividing K (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="profiled calls per kernel and shape (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="calls before those, left out (default 1)")


def _kernels(tokens) -> tuple:
    """--kernels awq,quick (the old spelling --kernels awq quick still read)."""
    if tokens is None:
        return KERNELS
    if len(tokens) > 1:
        deprecated("ncu", f"--kernels {' '.join(tokens)}", f"--kernels {','.join(tokens)}")
    names = [n for token in tokens for n in parse_names("--kernels", token, GEMM_KERNELS)]
    return tuple(dict.fromkeys(names))


def _shape_options(args) -> tuple:
    """(Ms, K, N) from --m and --shapes, or from the old spellings --M 16 128, --K, --N (N defaults to K)."""
    if args.M is None:
        Ms = tuple(parse_ms(args.m))
    else:
        deprecated("ncu", f"--M {' '.join(map(str, args.M))}", f"--m {','.join(map(str, args.M))}")
        bad = [m for m in args.M if m < 1]
        if bad:
            raise UsageError(f"--M {bad[0]} must be positive")
        Ms = tuple(dict.fromkeys(args.M))
    if args.K is None and args.N is None:
        shapes = parse_shapes(DEFAULT_SHAPE if args.shapes is None else args.shapes)
        if len(shapes) != 1:
            raise UsageError(f"--shapes {args.shapes}: ncu profiles one KxN shape per run, got {len(shapes)}")
        (K, N), = shapes
        return Ms, K, N
    if args.shapes is not None:
        raise UsageError("--K/--N are the old spelling of --shapes KxN; give --shapes only")
    K = int(DEFAULT_SHAPE.split("x")[0]) if args.K is None else args.K
    N = K if args.N is None else args.N
    old = " ".join(f"--{name} {v}" for name, v in (("K", args.K), ("N", args.N)) if v is not None)
    deprecated("ncu", old, f"--shapes {K}x{N}")
    for name, value in (("K", K), ("N", N)):
        if value < 1:
            raise UsageError(f"--{name} {value} must be positive")
    return Ms, K, N


def settings(args) -> Settings:
    """Checked settings from parsed arguments; UsageError with the rule."""
    kernels = _kernels(args.kernels)
    Ms, K, N = _shape_options(args)
    group_size = parse_group_size("--group-size", args.group_size, [K])
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats} must be at least 1")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup} must not be negative")
    regex = getattr(args, "kernel_regex", KERNEL_REGEX)
    if not regex.strip():
        raise UsageError("--kernel-regex must not be empty")
    try:
        re.compile(regex)
    except re.error as exc:
        raise UsageError(f"--kernel-regex {regex!r} is not a regular expression: {exc}") from None
    timeout = getattr(args, "timeout", None)
    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout {timeout} must be positive")
    if getattr(args, "ncu", None) and not os.path.isfile(args.ncu):
        raise UsageError(f"--ncu {args.ncu} does not exist")
    out = getattr(args, "out", None)
    if out:                                  # --out PREFIX may name a new folder: made now, before the run
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot make its folder ({exc.strerror})") from None
        for path in output_paths(out) + tuple(lines_paths(out, kernels) if getattr(args, "lineinfo", False)
                                              else ()):
            check_output_path("--out", path)
    export = getattr(args, "export", None)
    if export:                               # checked now: a long run must not end unable to save
        if not export.endswith(".ncu-rep"):
            export += ".ncu-rep"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(export)), exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--export {export}: cannot make its folder ({exc.strerror})") from None
        check_output_path("--export", export)
    return Settings(kernels=kernels, M=Ms, N=N, K=K, group_size=group_size, repeats=args.repeats, warmup=args.warmup,
                    kernel_regex=regex, ncu=getattr(args, "ncu", None), timeout=timeout, out=out,
                    json=getattr(args, "json", False), command=getattr(args, "command_line", None),
                    export=export, nvtx=getattr(args, "nvtx", True), lineinfo=getattr(args, "lineinfo", False))


def run(args) -> int:
    """``python -m quickcupy ncu``: profile, print the tables, save with --out."""
    s = settings(args)
    prog = "python -m quickcupy ncu"
    try:
        reason = no_gpu_reason()
        if reason is not None:
            raise NcuError(f"no GPU: {reason}")
        find_ncu(s.ncu)
        report = profile(s.kernels, s.M, s.N, s.K, s.group_size, s.repeats, s.warmup, s.kernel_regex,
                         s.ncu, s.timeout, s.export, s.nvtx, s.lineinfo)
    except NcuError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    add_predictions(report)
    if s.command:
        report["command"] = s.command
    print(json.dumps(jsonable(report), indent=2) if s.json else format_report(report))
    tables = {k: lines_text(report, k) for k in report.get("lines", {})}
    if not s.json:
        for text in tables.values():
            print("\n" + text)
    if s.out:
        for path in save_report(report, s.out):
            print(f"saved {path}")
        for kernel, path in lines_paths(s.out, tables).items():
            with open(path, "w") as f:
                f.write(tables[kernel] + "\n")
            print(f"saved {path}")
    if s.export:
        print(f"saved {s.export}")
    return 0


def lines_paths(out: str, kernels) -> dict:
    """--out PREFIX -> {kernel: PREFIX_lines_<kernel>.txt} for the per-line tables."""
    stem = output_paths(out)[0][:-len(".csv")]
    return {k: f"{stem}_lines_{k}.txt" for k in kernels}


def lines_text(report: dict, kernel: str) -> str:
    """The per-line table of ``kernel`` with what produced it on top."""
    t = report["lines"][kernel]
    head = [f"# {kernel}: {t['function']}, ncu launch {t['launch']} (NVTX range {t['range']!r})"]
    if report.get("command"):
        head.append(f"# command: {report['command']}")
    head.append(f"# source page: {t['command']}")
    dev = report.get("device") or {}
    if dev.get("name"):
        head.append(f"# device: {dev['name']}, ncu {report['ncu']['version']}")
    head.append("# shared wavefronts = ideal + excessive; excessive wavefronts are bank conflicts "
                "(and other replays) of the line's shared-memory instructions")
    if t.get("error"):
        return "\n".join(head + [f"# error: {t['error']}"])
    rows = [SourceRow(r["file"], r["line"], "", r["source"],
                      {k: r[k] for k in ("inst", "wavefronts", "ideal", "excessive")}) for r in t["rows"]]
    return "\n".join(head) + "\n" + format_lines(rows, t.get("totals"))


# ------------------------------------------------------------------------------ child process
def _child_main(argv) -> int:
    """Makes the GEMM calls (run under ncu) and writes the manifest of calls in order."""
    import cupy as cp
    import numpy as np

    p = argparse.ArgumentParser(prog="python -m quickcupy.tools.ncu --child")
    p.add_argument("--child", action="store_true", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--no-nvtx", dest="nvtx", action="store_false")
    _add_shape_arguments(p)
    args = p.parse_args(argv)
    if args.nvtx:
        from cupyx.profiler import time_range
        if not cp.cuda.nvtx.available:
            raise RuntimeError("CuPy has no NVTX here: run python -m quickcupy ncu with --no-nvtx")
    else:
        import contextlib

        def time_range(name):
            return contextlib.nullcontext()
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
                call = {"kernel": kernel, "layout": layouts[kernel], "M": M, "N": args.N, "K": args.K,
                        "group_size": args.group_size, "repeat": rep, "warmup": rep < 0}
                calls.append(call)
                if rep < 0:                  # outside the ranges: ncu does not profile warm-ups
                    gemm(x, layers[layouts[kernel]], kernel=kernel)
                else:
                    with time_range(ROOT_RANGE), time_range(call_range(call)):
                        gemm(x, layers[layouts[kernel]], kernel=kernel)
                cp.cuda.Device().synchronize()
    tmp = args.manifest + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"calls": calls, "device": device_info(), "versions": versions()}, f)
    os.replace(tmp, args.manifest)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))

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

from .. import registry
from ..device import no_gpu_reason
from .common import UsageError, check_output_path, jsonable, parse_group_size
from .ncu_report import (METRIC_NAMES, METRICS, REDUCE_PATTERN, KernelLaunch, NcuError,  # noqa: F401
                         format_report, group_calls, output_paths, parse_ncu_csv, parse_value, save_report,
                         summarize)

KERNELS = ("awq", "quick")                   # profiled by default; any of quickcupy.registry.VARIANTS
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
    return [sys.executable, "-m", "quickcupy.tools.ncu", "--child", "--manifest", manifest,
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
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    from ..analysis.smem_predict import predict
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


def settings(args) -> Settings:
    """Checked settings from parsed arguments (N defaults to K); UsageError with the rule."""
    N = args.K if args.N is None else args.N
    for name, value in (("K", args.K), ("N", N)):
        if value < 1:
            raise UsageError(f"--{name} {value} must be positive")
    bad = [m for m in args.M if m < 1]
    if bad:
        raise UsageError(f"--M {bad[0]} must be positive")
    group_size = parse_group_size("--group-size", args.group_size, [args.K])
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
        for path in output_paths(out):
            check_output_path("--out", path)
    return Settings(kernels=tuple(dict.fromkeys(args.kernels)), M=tuple(dict.fromkeys(args.M)), N=N,
                    K=args.K, group_size=group_size, repeats=args.repeats, warmup=args.warmup,
                    kernel_regex=regex, ncu=getattr(args, "ncu", None), timeout=timeout, out=out,
                    json=getattr(args, "json", False), command=getattr(args, "command_line", None))


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
                         s.ncu, s.timeout)
    except NcuError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    add_predictions(report)
    if s.command:
        report["command"] = s.command
    print(json.dumps(jsonable(report), indent=2) if s.json else format_report(report))
    if s.out:
        for path in save_report(report, s.out):
            print(f"saved {path}")
    return 0


# ------------------------------------------------------------------------------ child process
def _child_main(argv) -> int:
    """Makes the GEMM calls (run under ncu) and writes the manifest of calls in order."""
    import argparse
    import numpy as np
    import cupy as cp
    from .. import QuantLinear, gemm, quantize
    from ..device import device_info, versions
    from ..gemm import kernel_layout

    p = argparse.ArgumentParser(prog="python -m quickcupy.tools.ncu --child")
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
                gemm(x, layers[layouts[kernel]], kernel=kernel)
                cp.cuda.Device().synchronize()
    tmp = args.manifest + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"calls": calls, "device": device_info(), "versions": versions()}, f)
    os.replace(tmp, args.manifest)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))

"""``python -m quickcupy tune``: measure the quick-layout kernels and write ``kernel="auto"``'s table.

Times every candidate kernel (the quick-layout names of quickcupy.registry except "auto") over the
bench's shapes and a sweep of M, exactly as ``bench`` does, then makes rules (quickcupy.dispatch):
for each measured shape, the fastest kernel at each M, equal neighbours merged; and over all
shapes, the kernel with the smallest geometric-mean time (the rules of a table without shapes).
It prints, per M, each candidate's time relative to the best one at every shape, and writes the
table (quickcupy.dispatch's format) to the user's tuning folder, ``<user dir>/<gpu>.json``
(dispatch.user_tuning_dir: ``$QUICKCUPY_TUNING_DIR``, else ``~/.config/quickcupy/tuning``), which
``auto`` reads before the tables shipped in the package; ``--out`` writes elsewhere, never into the
installed package (its tables are read-only data: a table measured to ship is copied there by hand
and committed). float16's rules go to the top level, another ``--dtype``'s to the file's "dtypes"
section; the other dtypes' parts of an existing file are kept, and a new file starts from the table
``auto`` used so far for the parts it does not measure. ``--points`` makes the rules from the points
of an earlier ``bench`` or ``tune --json`` run (no GPU needed), e.g. to re-derive a table from a
committed sweep.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from .. import device as _device
from .. import dispatch, kernels, registry
from . import bench
from .common import (DTYPE_HELP, UsageError, check_output_path, parse_dtype, parse_int, parse_ms, parse_names,
                     parse_shapes, table, write_json)

CANDIDATES = tuple(k for k, v in registry.VARIANTS.items()
                   if v.path != "auto" and v.layout == dispatch.LAYOUT and v.tile_m is None)
DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096, 8192)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "tune", help="measure the quick-layout kernels and write the table of kernel=\"auto\"",
        description="Times every quick-layout kernel over weight shapes and a sweep of M and writes the table "
                    "kernel=\"auto\" reads (the fastest kernel per M; default quickcupy/tuning/<gpu>.json). "
                    "With --points it makes the table from an earlier bench or tune JSON, without a GPU.")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in bench.DEFAULT_SHAPES),
                   help="comma-separated KxN shapes; default: the bench's")
    p.add_argument("--m", default=",".join(map(str, DEFAULT_MS)), help="comma-separated M values")
    p.add_argument("--kernels", default=None, help=f"candidates, from {', '.join(CANDIDATES)}; default: all")
    p.add_argument("--repeats", default="30", help="timed calls per point (median); default: %(default)s")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="where to write the table (not inside the installed package); default: "
                        "<user dir>/<gpu>.json, the user dir $QUICKCUPY_TUNING_DIR or ~/.config/quickcupy/tuning")
    p.add_argument("--json", metavar="PATH", help="also write every measured point (bench's JSON)")
    p.add_argument("--dtype", default="fp16", help=DTYPE_HELP + ", the one the rules are for; default: %(default)s")
    p.add_argument("--points", metavar="PATH",
                   help="make the rules from this bench/tune JSON's points instead of measuring")
    p.set_defaults(func=run)


def rules_from(points, candidates) -> tuple:
    """(rules, per-M rows): for each M the candidate with the least geometric-mean time over the
    shapes; equal neighbours merged; rows carry each candidate's worst ratio to the per-shape best."""
    by_m = {}
    for p in points:
        by_m.setdefault(p["M"], {}).setdefault((p["K"], p["N"]), {})[p["kernel"]] = p["time_us"]
    rows, winners = [], []
    for M in sorted(by_m):
        here = [k for k in candidates if all(k in t for t in by_m[M].values())]   # served at this M
        shapes = by_m[M].values()
        if not here:
            continue
        gmean = {k: math.exp(sum(math.log(t[k]) for t in shapes) / len(shapes)) for k in here}
        best = min(here, key=gmean.get)
        worst = {k: max(t[k] / min(t[c] for c in here) for t in shapes) for k in here}
        winners.append((M, best))
        rows.append({"M": M, "choice": best, **{f"{k} worst/best": worst.get(k) for k in candidates}})
    rules = []
    for i, (M, kernel) in enumerate(winners):
        last = i == len(winners) - 1
        if rules and rules[-1]["kernel"] == kernel:
            rules[-1]["max_m"] = None if last else M
        else:
            rules.append({"max_m": None if last else M, "kernel": kernel})
    return dispatch.check_rules(rules), rows


def run(args) -> int:
    candidates = parse_names("--kernels", args.kernels, CANDIDATES)
    dtype = parse_dtype(args.dtype)
    shapes, ms = parse_shapes(args.shapes), parse_ms(args.m)
    repeats = parse_int("--repeats", args.repeats, 1)
    if args.points:
        result = _load_points(args.points, dtype)
        name = result["device"]["name"]
        cc = str(result["device"].get("compute_capability", ""))        # "9.0"
        arch = "sm_" + cc.replace(".", "") if re.fullmatch(r"\d+\.\d+", cc) else None
    else:
        reason = _device.no_gpu_reason()
        if reason is not None:
            raise UsageError(f"tune measures kernels and needs a GPU (or --points): {reason}")
        import cupy
        device = cupy.cuda.Device().id
        for k in [k for k in candidates if kernels.unsupported_reason(k, device)]:
            print(f"tune: leaving out {k}: {kernels.unsupported_reason(k, device)}")
            candidates.remove(k)
        name, arch = _device.device_info()["name"], kernels.device_arch(device)
    out = args.out or _default_out(name)
    _refuse_package_path("--out", out)
    _refuse_package_path("--json", args.json)
    check_output_path("--out", out)
    command = getattr(args, "command_line", "python -m quickcupy tune")
    if not args.points:
        s = bench.Settings(shapes=tuple(shapes), ms=tuple(ms),
                           kernels=tuple(candidates), group_size=bench.DEFAULT_GROUP_SIZE, warmup=5,
                           repeats=repeats, seed=0, json=args.json, csv=None, plot=None, quiet=True,
                           command=command, dtype=dtype)
        check_output_path("--json", s.json)
        result = bench.measure(s, bench.new_result(s, None))
        if s.json:
            write_json(s.json, result)
    points = [p for p in result["points"] if p["kernel"] in candidates]
    rules, rows = rules_from(points, candidates)
    shapes = [{"K": K, "N": N, "rules": list(rules_from([p for p in points if (p["K"], p["N"]) == (K, N)],
                                                        candidates)[0])}
              for K, N in dict.fromkeys((p["K"], p["N"]) for p in points)]
    section = {"command": command, "rules": list(rules), "shapes": shapes,
               "group_size": result["settings"]["group_size"], "per_m": rows}
    merged = _merged(out, name, arch, dtype, section)
    dispatch.check_table(merged, out)          # never write a table that auto would refuse
    write_json(out, merged, indent=1)
    dispatch.clear_caches()
    print(table(list(rows[0]), [["-" if v is None else f"{v:.2f}" if isinstance(v, float) else v
                                 for v in r.values()] for r in rows]))
    print(f"\n{dtype} rules over all shapes: {list(rules)}")
    for e in shapes:
        print(f"rules at K={e['K']} N={e['N']}: {e['rules']}")
    print(f"wrote {out}")
    return 0


def _load_points(path: str, dtype: str) -> dict:
    """A bench/tune JSON whose points were measured with ``dtype`` activations; UsageError otherwise."""
    try:
        with open(path) as f:
            result = json.load(f)
        measured = result["settings"].get("dtype", "float16")
        missing = [k for k in ("points", "device") if k not in result] or \
            ([] if "name" in result["device"] else ["device.name"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"--points: {path} is not a readable bench JSON ({exc})") from exc
    if missing:
        raise UsageError(f"--points: {path} is not a readable bench JSON (no {', '.join(missing)})")
    if measured != dtype:
        raise UsageError(f"--points: {path} was measured with {measured} activations, not --dtype {dtype}")
    return result


def _default_out(device_name: str) -> str:
    """<user dir>/<gpu>.json, the folder made if missing."""
    folder = dispatch.user_tuning_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot make the tuning folder {folder} ({exc}); set "
                         f"{dispatch.TUNING_DIR_ENV} or pass --out") from None
    return str(folder / f"{dispatch.device_slug(device_name)}.json")


def _refuse_package_path(flag: str, path):
    """UsageError for a path inside the installed quickcupy package (its tables are read-only data)."""
    package = dispatch.TUNING_DIR.parent
    if path is not None and Path(os.path.abspath(path)).resolve().is_relative_to(package):
        raise UsageError(f"{flag} {path} is inside the installed package ({package}), whose tables are "
                         f"read-only data; write elsewhere (the default is {dispatch.user_tuning_dir()})")


def _as_json(section: dict, origin: str) -> dict:
    """A validated table section (dispatch.check_table) as it is written, saying where it came from."""
    return {"command": f"none measured: copied from the {origin}", "rules": list(section["rules"]),
            "shapes": [{"K": K, "N": N, "rules": list(rules)} for K, N, rules in section.get("shapes", ())]}


def _merged(path: str, device_name: str, arch, dtype: str, section: dict) -> dict:
    """The table file at ``path`` with ``dtype``'s part replaced by ``section`` (float16 at the top
    level, another dtype under "dtypes"); a new file starts as a copy of the table ``auto`` uses on
    this GPU model (of compute capability ``arch``, None if unknown) for the other parts."""
    if os.path.isfile(path):
        try:
            with open(path) as f:
                data = json.load(f)
            dispatch.check_table(data, path)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--out: {path} is not a table this quickcupy can extend ({exc}); "
                             f"remove it or write elsewhere") from None
        if data.get("device") != device_name:
            raise UsageError(f"--out: {path} holds the table of {data.get('device') or data.get('arch')!r}, "
                             f"not {device_name!r}")
    else:
        base = dispatch.table_for(device_name, arch)
        origin = dispatch.describe(base)
        data = {"schema": dispatch.SCHEMA, "device": device_name, **_as_json(base, origin),
                "dtypes": {d: _as_json(s, origin) for d, s in base["dtypes"].items()}}
    if dtype == "float16":
        data.update(section)
    else:
        data.setdefault("dtypes", {})[dtype] = section
    if not data.get("dtypes"):
        data.pop("dtypes", None)
    return data

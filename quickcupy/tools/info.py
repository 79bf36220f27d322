"""``python -m quickcupy info``: versions, the CUDA device and the table ``kernel="auto"`` uses on it."""
from __future__ import annotations

import json

from .. import dispatch, dtypes
from ..device import device_info, versions


def add_parser(subparsers):
    p = subparsers.add_parser("info", help="versions, the CUDA device and the table kernel='auto' uses",
                              description="Prints the versions of quickcupy and what it runs on (Python, NumPy, "
                                          "CuPy, CUDA), the CUDA device (name, driver, memory, clocks) or why "
                                          "there is none, and which tuning table kernel='auto' reads on it.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def rules_text(rules) -> str:
    """Rules in one line: "quick_decode to M=16, quick to 32, quick_sm90 to 1024, dequant beyond"."""
    parts = [f"{r['kernel']} to {'M=' if i == 0 else ''}{r['max_m']}" for i, r in enumerate(rules[:-1])]
    return ", ".join(parts + [f"{rules[-1]['kernel']} {'beyond' if parts else 'at every M'}"])


def auto_info(dev: dict) -> dict:
    """Which table auto uses on device ``dev`` (device_info's) and its rules per activation dtype:
    {"table", "source", "path", "tuning_dir", "dtypes": {dtype: {"rules", "shapes"}}}."""
    out = {"tuning_dir": str(dispatch.user_tuning_dir())}
    if not dev["available"]:
        return {**out, "table": "none (no GPU)"}
    table = dispatch.table_for(dev["name"], "sm_" + dev["compute_capability"].replace(".", ""))
    per_dtype = {}
    for dtype in dtypes.NAMES:
        section = dispatch.section_for(table, dtype)
        per_dtype[dtype] = {"rules": list(section["rules"]),
                         "shapes": [{"K": K, "N": N, "rules": list(r)} for K, N, r in section.get("shapes", ())]}
    return {**out, "table": dispatch.describe(table), "source": table["source"], "path": table["path"],
            "dtypes": per_dtype}


def run(args) -> int:
    info = {"versions": versions(), "device": device_info()}
    info["auto"] = auto_info(info["device"])
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info["versions"].items():
        print(f"{key:>14}: {value}")
    dev = info["device"]
    if not dev["available"]:
        print(f"{'device':>14}: no GPU ({dev['reason']})")
    else:
        for key, value in dev.items():
            if key != "available":
                print(f"{key:>14}: {value}")
    auto = info["auto"]
    print(f"{'auto table':>14}: {auto['table']}")
    for dtype, section in auto.get("dtypes", {}).items():
        shapes = section["shapes"]            # a call takes those of the shape nearest in N * K
        other = [e for e in shapes if e["rules"] != section["rules"]]
        note = (f" (so at {len(shapes) - len(other)} of {len(shapes)} measured shapes; the others:)" if other
                else f" (so at all {len(shapes)} measured shapes)" if shapes else "")
        print(f"{dtype:>14}: {rules_text(section['rules'])}{note}")
        for e in other:
            print(f"{'':>14}  K={e['K']} N={e['N']}: {rules_text(e['rules'])}")
    print(f"{'user tables':>14}: {auto['tuning_dir']} (written by tune; read before the shipped ones)")
    return 0

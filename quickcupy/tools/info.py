"""``python -m quickcupy info``: versions and the CUDA device."""
from __future__ import annotations

import json

from ..device import device_info, versions


def add_parser(subparsers):
    p = subparsers.add_parser("info", help="versions and the CUDA device",
                              description="Prints the versions of quickcupy and what it runs on (Python, NumPy, "
                                          "CuPy, CUDA) and the CUDA device (name, driver, memory, clocks), or why "
                                          "there is none.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    info = {"versions": versions(), "device": device_info()}
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
    return 0

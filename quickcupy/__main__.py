"""Command line: ``python -m quickcupy {info,bench,ncu,llama} ...``.

Each tool lives in its own module exposing ``add_parser(subparsers)``, which registers a
subcommand whose ``func(args) -> int`` runs it. Bad values raise ``quickcupy.errors.UsageError``
and give one line, not a traceback (it lives in its own module: under ``python -m`` this file runs
as ``__main__``, and a class defined here would exist twice).
"""
from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys

from .errors import UsageError

TOOLS = ("info", "bench", "ncu", "llama")


def _add_info(sub):
    p = sub.add_parser("info", help="versions and the CUDA device")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run_info)


def run_info(args) -> int:
    from .device import device_info, versions
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quickcupy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_info(sub)
    for name in TOOLS[1:]:
        try:
            module = importlib.import_module(f"quickcupy.{name}")
        except ImportError as exc:
            if exc.name and exc.name.startswith("quickcupy."):
                continue  # tool not written yet
            raise
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    # What the tools record as "the command that produced these results".
    args.command_line = shlex.join(["python", "-m", "quickcupy", *argv])
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

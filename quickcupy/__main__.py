"""Command line: ``python -m quickcupy {info,bench,ncu,llama,generate,tune,accuracy,warmup} ...``.

Each tool of :mod:`quickcupy.tools` exposes ``add_parser(subparsers)``, which registers a subcommand
with a plain one-line ``help`` and a ``description`` (not its reST docstring), whose ``func(args) -> int``
runs it. Bad values raise ``quickcupy.tools.common.UsageError`` and give
one line, not a traceback. ``args.command_line`` is the command the tools record with their results.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .tools import accuracy, bench, generate, info, llama_bench, ncu, tune, warmup
from .tools.common import UsageError

TOOLS = (info, bench, ncu, llama_bench, generate, tune, accuracy, warmup)


DESCRIPTION = ("The tools of quickcupy: versions and the GPU, GEMM benchmarks, Nsight Compute counters, "
               "Llama throughput, text from a checkpoint, kernel=\"auto\"'s tuning, kernel accuracy and compiling "
               "the kernels ahead.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quickcupy", description=DESCRIPTION,
                                     epilog="python -m quickcupy COMMAND --help describes a command and its options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for tool in TOOLS:
        tool.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
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

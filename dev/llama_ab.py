"""Is the whole Llama model faster or slower than at an earlier commit? Two checkouts' ``llama`` tool,
alternating on one machine.

Each round runs ``python -m quickcupy llama ARGS --json FILE`` once in each checkout, the earlier
one first in even rounds and second in odd ones, so a drift of the card's clock falls on both
sides; the table gives every run's decode tokens/s (wall clock) and the medians' ratio per backend
and batch, with the GPU-time medians beside them. The earlier checkout is a folder holding that
commit's ``quickcupy/`` and ``cuda/`` (``git archive COMMIT quickcupy cuda | tar -x -C DIR``).

From the checkout, on a GPU (arguments after ``--`` go to the llama tool)::

    python dev/llama_ab.py --old DIR [--rounds 3] -- --preset 7b --layers 32 --vocab 32000 --batch 1,256 --prompt 128 --gen 16 --backends fp16,quick,auto --check-tokens 0
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("old", "today")


def order(round_index: int) -> tuple:
    """The sides in the order round ``round_index`` runs them: the earlier checkout first in even rounds."""
    return SIDES if round_index % 2 == 0 else SIDES[::-1]


def rates(report: dict) -> dict:
    """{(backend, batch): (decode tok/s wall, decode tok/s GPU or None)} of one llama JSON report
    (its runs under "throughput", or "generation" for a whole model: ``--vocab``, ``--checkpoint``)."""
    runs = report["throughput"] if "throughput" in report else report["generation"]
    return {(t["backend"], t["batch"]): (t["decode_tokens_per_s"], t.get("decode_gpu_tokens_per_s")) for t in runs}


def common_keys(runs: dict) -> list:
    """The points of ``runs`` = {side: [{point: value}, one per round]} that every run has, in the
    first run's order."""
    return [k for k in runs["old"][0] if all(k in r for side in SIDES for r in runs[side])]


def summary(runs: dict) -> list:
    """Rows (backend, batch, old walls, today walls, old median, today median, ratio, old GPU median,
    today GPU median) from ``runs`` = {side: [rates(), one per round]}, for the keys both sides have."""
    rows = []
    for key in common_keys(runs):
        walls = {side: [r[key][0] for r in runs[side]] for side in SIDES}
        gpus = {side: [r[key][1] for r in runs[side] if r[key][1] is not None] for side in SIDES}
        med = {side: statistics.median(walls[side]) for side in SIDES}
        gmed = {side: statistics.median(gpus[side]) if gpus[side] else None for side in SIDES}
        rows.append((*key, walls["old"], walls["today"], med["old"], med["today"], med["today"] / med["old"],
                     gmed["old"], gmed["today"]))
    return rows


def table(rows: list) -> str:
    out = ["backend  batch  decode tok/s wall, each run (old | today)        median old -> today  today/old"
           "  GPU median old -> today"]
    for backend, batch, old, today, m_old, m_today, ratio, g_old, g_today in rows:
        runs = " ".join(f"{v:,.0f}" for v in old) + " | " + " ".join(f"{v:,.0f}" for v in today)
        gpu = f"{g_old:,.0f} -> {g_today:,.0f}" if g_old and g_today else "-"
        out.append(f"{backend:>7s}  {batch:5d}  {runs:45s}  {m_old:9,.0f} -> {m_today:9,.0f}  {ratio:9.3f}  {gpu}")
    return "\n".join(out)


def run_tool(checkout: Path, tool: str, tool_args: list) -> dict:
    """One run of ``python -m quickcupy TOOL`` (llama, bench) in ``checkout`` (its quickcupy first on
    the path); its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{tool}.json"
        env = dict(os.environ, PYTHONPATH=str(checkout))
        done = subprocess.run([sys.executable, "-m", "quickcupy", tool, *tool_args, "--json", str(out)],
                              cwd=checkout, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{tool} in {checkout} failed:\n{done.stderr.strip()[-2000:]}")
        return json.loads(out.read_text())


def run_llama(checkout: Path, llama_args: list) -> dict:
    """One llama run in ``checkout``; its JSON report."""
    return run_tool(checkout, "llama", llama_args)


def ab_main(argv, tool: str, description: str, extract, report, rounds: int) -> int:
    """The A/B of ``tool`` (llama, bench) between ``--old`` and this checkout: ``extract`` (a JSON
    report -> {point: value}) per run, ``report`` ({side: [extract(), one per round]} -> text) at the
    end; ``rounds``: the default of ``--rounds``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--old", required=True, type=Path, help="a folder with the earlier commit's quickcupy/ and cuda/")
    p.add_argument("--rounds", type=int, default=rounds, help=f"runs of each checkout (default {rounds})")
    p.add_argument("tool_args", nargs=argparse.REMAINDER, help=f"-- then the {tool} tool's arguments")
    args = p.parse_args(argv)
    tool_args = args.tool_args[1:] if args.tool_args[:1] == ["--"] else args.tool_args
    if not (args.old / "quickcupy").is_dir() or not (args.old / "cuda").is_dir():
        p.error(f"--old {args.old} must hold quickcupy/ and cuda/")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    checkouts = {"old": args.old.resolve(), "today": ROOT}
    runs = {side: [] for side in SIDES}
    for i in range(args.rounds):
        for side in order(i):
            runs[side].append(extract(run_tool(checkouts[side], tool, tool_args)))
            print(f"round {i + 1}: {side} done", file=sys.stderr, flush=True)
    print(f"{tool} {' '.join(tool_args)}; {args.rounds} rounds, old = {args.old}")
    print(report(runs))
    return 0


def main(argv=None) -> int:
    return ab_main(argv, "llama", __doc__.splitlines()[0], rates, lambda runs: table(summary(runs)), 3)


if __name__ == "__main__":
    sys.exit(main())

"""Is a GEMM kernel faster or slower than at an earlier commit? Two checkouts' ``bench``, alternating
on one machine.

Each round runs ``python -m quickcupy bench ARGS --json FILE`` once in each checkout, in
``llama_ab.order`` (the earlier one first in even rounds), so a drift of the card's clock falls on
both sides. The table gives, per shape, M and kernel, every run's time per call, the medians and
old / today (above 1: today is faster); cuBLAS (``fp16``) runs on both sides and shows the drift.
The earlier checkout is a folder holding that commit's ``quickcupy/`` and ``cuda/``
(``git archive COMMIT quickcupy cuda | tar -x -C DIR``).

From the checkout, on a GPU (arguments after ``--`` go to the bench tool)::

    python dev/bench_ab.py --old DIR [--rounds 2] -- --shapes 8192x8192,4096x22016 --m 64,128 --kernels fp16,quick_sm90 --repeats 30 --quiet
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_ab import SIDES, ab_main, common_keys  # noqa: E402  (dev/, beside this file)


def times(report: dict) -> dict:
    """{(K, N, M, kernel): us per call} of one bench JSON report (points a kernel could not run skipped)."""
    return {(q["K"], q["N"], q["M"], q["kernel"]): q["time_us"] for q in report["points"] if q.get("time_us")}


def summary(runs: dict) -> list:
    """Rows (K, N, M, kernel, old times, today times, old median, today median, old / today) from
    ``runs`` = {side: [times(), one per round]}, for the points every run has."""
    rows = []
    for key in common_keys(runs):
        each = {side: [r[key] for r in runs[side]] for side in SIDES}
        med = {side: statistics.median(each[side]) for side in SIDES}
        rows.append((*key, each["old"], each["today"], med["old"], med["today"], med["old"] / med["today"]))
    return rows


def table(rows: list) -> str:
    out = ["     K x N      M  kernel        us per call, each run (old | today)     median old -> today  old/today"]
    for K, N, M, kernel, old, today, m_old, m_today, ratio in rows:
        runs = " ".join(f"{v:.1f}" for v in old) + " | " + " ".join(f"{v:.1f}" for v in today)
        out.append(f"{K:>6}x{N:<6} {M:5d}  {kernel:12s}  {runs:38s}  {m_old:8.1f} -> {m_today:8.1f}  {ratio:9.3f}")
    return "\n".join(out)


def main(argv=None) -> int:
    return ab_main(argv, "bench", __doc__.splitlines()[0], times, lambda runs: table(summary(runs)), 2)


if __name__ == "__main__":
    sys.exit(main())

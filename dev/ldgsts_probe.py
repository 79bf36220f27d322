"""How does Nsight Compute count the shared-memory wavefronts of a warp's 16-byte cp.async (LDGSTS)?

    python dev/ldgsts_probe.py [--out PREFIX] [--ncu PATH]     (from the checkout; needs a GPU and ncu)

Each probe is one launch of one block (1 or 4 warps) issuing one or two 16-byte ``cp.async`` (SASS
LDGSTS) per lane (byte offsets per lane into a shared array and a global array, chosen in
:data:`CASES`; optionally a wait between the two), under its own NVTX range; ncu reads the LDGSTS
counters of each launch. The table puts them next to what the bank model
(:func:`quickcupy.analysis.banks.count_wavefronts`, 16-byte stores) predicts for the same shared
addresses: the bank model only sees the shared side, so a gap that follows the global addresses or the
shared alignment shows which rule the hardware adds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's quickcupy

from quickcupy.analysis import banks
from quickcupy.tools.ncu import ROOT_RANGE, NcuError, find_ncu, ncu_version, run_ncu

KERNEL = "ldgsts_probe"
# ca keeps the line in L1, cg bypasses it (the kernels use cg); src-size 0 zero-fills.
SOURCE = r"""
template <bool CG>
__global__ void ldgsts_probe(const char* g, const int* goff, const int* soff, int n, int bytes,
                             int wait_between, int* out) {
  __shared__ __align__(128) char s[8192];
  const int t = threadIdx.x, T = blockDim.x;
  for (int j = 0; j < n; ++j) {   // n = 1 or 2 copies per thread, j-th at goff/soff[j * T + t]
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(s + soff[j * T + t]));
    const char* src = g + goff[j * T + t];
    if (CG) asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(bytes));
    else    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(bytes));
    if (wait_between) {
      asm volatile("cp.async.commit_group;\n" ::);
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
  }
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();
  out[t] = s[soff[t]];   // keeps the copies alive
}
"""
METRICS = ("smsp__sass_inst_executed_op_ldgsts.sum",
           "smsp__sass_l1tex_data_pipe_lsu_wavefronts_mem_shared_op_ldgsts.sum",
           "smsp__sass_l1tex_data_bank_conflicts_pipe_lsu_mem_shared_op_ldgsts.sum")
LANE = np.arange(32)
ROW_K = 8192 * 2          # bytes per activation row at K = 8192


def _cases():
    """name -> (shared byte offsets, global byte offsets, cg, src bytes[, wait between]); offsets
    per thread (one copy) or [copy, thread] (two)."""
    c = {}
    for s0 in range(0, 128, 16):                      # contiguous 512 B, shared start moved by s0
        c[f"contig s+{s0} g+0"] = (s0 + 16 * LANE, 16 * LANE, True, 16)
    for g0 in (16, 32, 64):                           # global start moved, shared aligned
        c[f"contig s+0 g+{g0}"] = (16 * LANE, g0 + 16 * LANE, True, 16)
    c["contig s+16 g+16"] = (16 + 16 * LANE, 16 + 16 * LANE, True, 16)
    c["contig s+16 zero-fill"] = (16 + 16 * LANE, 16 * LANE, True, 0)
    c["contig s+0 zero-fill"] = (16 * LANE, 16 * LANE, True, 0)
    c["contig s+0 g+0 ca"] = (16 * LANE, 16 * LANE, False, 16)
    c["contig s+16 g+0 ca"] = (16 + 16 * LANE, 16 * LANE, False, 16)
    # each 8-lane phase from its own global row (aligned), then every lane from its own row
    c["phase rows s+0"] = (16 * LANE, (LANE // 8) * ROW_K + 16 * (LANE % 8), True, 16)
    c["lane rows s+0"] = (16 * LANE, LANE * ROW_K, True, 16)
    c["lane rows s+16"] = (16 + 16 * LANE, LANE * ROW_K, True, 16)
    # quick_gemm's copies: 16-row tile (rows of 256 B, pitch 272 B), 128-row tile (128 B, pitch 144 B).
    # Whole blocks: 4 warps, both passes of a K step (rows 0-7 then 8-15), back to back or with a wait.
    t = np.arange(128)
    for n_warps in (1, 4):
        for wait in (0, 1):
            tt = t[:32 * n_warps]
            rows = np.stack([(i * 128 + tt) // 16 for i in (0, 1)])
            col = 16 * (tt % 16)
            c[f"quick bm16 step {n_warps}w{' wait' if wait else ''}"] = (
                rows * 272 + col, rows * ROW_K + col, True, 16, wait)
    rows = np.stack([np.arange(32) // 16, 2 + np.arange(32) // 16])
    c["two copies rows 0-1, 2-3"] = (rows * 272 + 16 * (LANE % 16), rows * ROW_K + 16 * (LANE % 16), True, 16, 0)
    c["same copy twice"] = (np.stack([16 * LANE] * 2), np.stack([16 * LANE] * 2), True, 16, 0)
    for r0 in range(0, 8, 2):
        row = r0 + LANE // 16
        c[f"quick bm16 rows {r0},{r0 + 1}"] = (row * 272 + 16 * (LANE % 16), row * ROW_K + 16 * (LANE % 16), True, 16)
    for r0 in range(0, 8, 4):
        row = r0 + LANE // 8
        c[f"quick bm128 rows {r0}-{r0 + 3}"] = (row * 144 + 16 * (LANE % 8), row * ROW_K + 16 * (LANE % 8), True, 16)
    return {name: (np.atleast_2d(v[0]), np.atleast_2d(v[1]), v[2], v[3], v[4] if len(v) > 4 else 0)
            for name, v in c.items()}


CASES = _cases()


def predicted(case) -> int:
    """Bank-model wavefronts of the case's shared addresses (16-byte accesses, warp by warp)."""
    soff = case[0]
    return sum(banks.count_wavefronts(row[w:w + 32], 16).wavefronts
               for row in soff for w in range(0, soff.shape[1], 32))


def _child(manifest: str):
    import cupy as cp
    from cupyx.profiler import time_range
    mod = cp.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=["ldgsts_probe<true>",
                                                                               "ldgsts_probe<false>"])
    g = cp.arange(64 * ROW_K // 4, dtype=cp.int32).view(cp.int8)
    out = cp.zeros(128, cp.int32)
    for name, (soff, goff, cg, nbytes, wait) in CASES.items():
        fn = mod.get_function(f"ldgsts_probe<{'true' if cg else 'false'}>")
        so, go = cp.asarray(soff.ravel(), cp.int32), cp.asarray(goff.ravel(), cp.int32)
        args = (g, go, so, np.int32(soff.shape[0]), np.int32(nbytes), np.int32(wait), out)
        fn((1,), (soff.shape[1],), args)       # warm-up, outside the ranges
        cp.cuda.Device().synchronize()
        with time_range(ROOT_RANGE), time_range(f"probe:{name}"):
            fn((1,), (soff.shape[1],), args)
        cp.cuda.Device().synchronize()
    with open(manifest, "w") as f:
        json.dump(list(CASES), f)


def measure(ncu: str | None = None, timeout: float | None = 600) -> dict:
    """Runs every case under ncu; {"ncu": version, "cases": [{name, predicted, metrics}]}."""
    exe = find_ncu(ncu)
    with tempfile.TemporaryDirectory(prefix="quickcupy-probe-") as tmp:
        manifest = os.path.join(tmp, "cases.json")
        argv = [sys.executable, os.path.abspath(__file__), "--child", manifest]
        launches, _ = run_ncu(argv, KERNEL, METRICS, exe, timeout)
    by_case = {}
    for launch in launches:
        name = launch.nvtx[-1] if launch.nvtx else ""
        if name.startswith("probe:"):
            by_case[name[len("probe:"):]] = launch.metrics
    attribution = "nvtx"
    if not by_case and len(launches) == len(CASES):   # ncu named no ranges: one launch per case, in order
        by_case, attribution = {n: l.metrics for n, l in zip(CASES, launches)}, "launch order"
    missing = [n for n in CASES if n not in by_case]
    if missing:
        raise NcuError(f"no profiled launch for probe(s) {missing}")
    return {"ncu": ncu_version(exe), "attribution": attribution,
            "cases": [{"name": n, "predicted": predicted(CASES[n]), "metrics": by_case[n]} for n in CASES]}


def format_table(result: dict) -> str:
    out = [f"ncu: {result['ncu']}", "16-byte cp.async per lane, one block; LDGSTS counters of the launch",
           f"{'case':<30}{'model':>7}{'ncu wavefronts':>16}{'conflicts':>11}"]
    for c in result["cases"]:
        m = c["metrics"]
        out.append(f"{c['name']:<30}{c['predicted']:>7}{m.get(METRICS[1], float('nan')):>16.0f}"
                   f"{m.get(METRICS[2], float('nan')):>11.0f}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python dev/ldgsts_probe.py", description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, metavar="MANIFEST", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="save PREFIX.txt and PREFIX.json")
    p.add_argument("--ncu", default=None)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    try:
        result = measure(args.ncu)
    except NcuError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 1
    text = format_table(result)
    print(text)
    if args.out:
        with open(args.out + ".txt", "w") as f:
            f.write(f"# command: python dev/ldgsts_probe.py --out {args.out}\n" + text + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m quickcupy.tools.ldgsts_probe``: how Nsight Compute counts the shared-memory
wavefronts of one warp's 16-byte ``cp.async`` (SASS LDGSTS), for chosen shared and global addresses.

Each probe is one launch of one warp issuing ONE cp.async per lane (byte offsets per lane into a
shared array and a global array, chosen in :data:`CASES`), under its own NVTX range; ncu reads the
LDGSTS wavefront counters of each launch. The table puts them next to what the bank model
(:func:`quickcupy.analysis.banks.count_wavefronts`, 16-byte stores) predicts for the same shared
addresses: the bank model only sees the shared side, so a gap that follows the global addresses or the
shared alignment shows which rule the hardware adds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

import numpy as np

from ..analysis import banks
from .ncu import ROOT_RANGE, NcuError, find_ncu, ncu_version, run_ncu

KERNEL = "ldgsts_probe"
# ca keeps the line in L1, cg bypasses it (the kernels use cg); src-size 0 zero-fills.
SOURCE = r"""
template <bool CG>
__global__ void ldgsts_probe(const char* g, const int* goff, const int* soff, int bytes, int* out) {
  __shared__ __align__(128) char s[8192];
  const int lane = threadIdx.x;
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(s + soff[lane]));
  const char* src = g + goff[lane];
  if (CG) asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(bytes));
  else    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(bytes));
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncwarp();
  out[lane] = s[soff[lane]];   // keeps the copy alive
}
"""
METRICS = ("smsp__sass_inst_executed_op_ldgsts.sum",
           "smsp__sass_l1tex_data_pipe_lsu_wavefronts_mem_shared_op_ldgsts.sum",
           "smsp__sass_l1tex_data_bank_conflicts_pipe_lsu_mem_shared_op_ldgsts.sum",
           "l1tex__t_sectors_pipe_lsu_mem_global_op_ldgsts.sum",
           "l1tex__t_requests_pipe_lsu_mem_global_op_ldgsts.sum")
LANE = np.arange(32)
ROW_K = 8192 * 2          # bytes per activation row at K = 8192


def _cases():
    """name -> (shared byte offsets, global byte offsets, cg, src bytes) for the 32 lanes."""
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
    # quick_gemm's copies: 16-row tile (rows of 256 B, pitch 272 B), 128-row tile (128 B, pitch 144 B)
    for r0 in range(0, 8, 2):
        row = r0 + LANE // 16
        c[f"quick bm16 rows {r0},{r0 + 1}"] = (row * 272 + 16 * (LANE % 16), row * ROW_K + 16 * (LANE % 16), True, 16)
    for r0 in range(0, 8, 4):
        row = r0 + LANE // 8
        c[f"quick bm128 rows {r0}-{r0 + 3}"] = (row * 144 + 16 * (LANE % 8), row * ROW_K + 16 * (LANE % 8), True, 16)
    return c


CASES = _cases()


def predicted(case) -> int:
    """Bank-model wavefronts of the case's shared addresses (16-byte accesses)."""
    soff = case[0]
    return banks.count_wavefronts(soff, 16).wavefronts


def _child(manifest: str):
    import cupy as cp
    from cupyx.profiler import time_range
    mod = cp.RawModule(code=SOURCE, options=("-std=c++17",), name_expressions=["ldgsts_probe<true>",
                                                                               "ldgsts_probe<false>"])
    g = cp.arange(64 * ROW_K // 4, dtype=cp.int32).view(cp.int8)
    out = cp.zeros(32, cp.int32)
    for name, (soff, goff, cg, nbytes) in CASES.items():
        fn = mod.get_function(f"ldgsts_probe<{'true' if cg else 'false'}>")
        so, go = cp.asarray(soff, cp.int32), cp.asarray(goff, cp.int32)
        fn((1,), (32,), (g, go, so, np.int32(nbytes), out))       # warm-up, outside the ranges
        cp.cuda.Device().synchronize()
        with time_range(ROOT_RANGE), time_range(f"probe:{name}"):
            fn((1,), (32,), (g, go, so, np.int32(nbytes), out))
        cp.cuda.Device().synchronize()
    with open(manifest, "w") as f:
        json.dump(list(CASES), f)


def measure(ncu: str | None = None, timeout: float | None = 600) -> dict:
    """Runs every case under ncu; {"ncu": version, "cases": [{name, predicted, metrics}]}."""
    exe = find_ncu(ncu)
    with tempfile.TemporaryDirectory(prefix="quickcupy-probe-") as tmp:
        manifest = os.path.join(tmp, "cases.json")
        argv = [sys.executable, "-m", "quickcupy.tools.ldgsts_probe", "--child", manifest]
        launches, names, _ = run_ncu(argv, KERNEL, METRICS, exe, timeout,
                                     report=os.path.join(tmp, "probe.ncu-rep"))
    by_case = {}
    for launch in launches:
        m = re.search(r"probe:(.+)$", names.get((launch.process_id, launch.id), ""))
        if m:
            by_case[m.group(1).strip()] = launch.metrics
    attribution = "nvtx"
    if not by_case and len(launches) == len(CASES):   # ncu named no ranges: one launch per case, in order
        by_case, attribution = {n: l.metrics for n, l in zip(CASES, launches)}, "launch order"
    missing = [n for n in CASES if n not in by_case]
    if missing:
        raise NcuError(f"no profiled launch for probe(s) {missing}")
    return {"ncu": ncu_version(exe), "attribution": attribution,
            "cases": [{"name": n, "predicted": predicted(CASES[n]), "metrics": by_case[n]} for n in CASES]}


def format_table(result: dict) -> str:
    out = [f"ncu: {result['ncu']}", "one warp, one 16-byte cp.async per lane; wavefronts of the LDGSTS instruction",
           f"{'case':<28}{'model':>7}{'ncu wavefronts':>16}{'conflicts':>11}{'g sectors':>11}{'g requests':>12}"]
    for c in result["cases"]:
        m = c["metrics"]
        out.append(f"{c['name']:<28}{c['predicted']:>7}{m.get(METRICS[1], float('nan')):>16.0f}"
                   f"{m.get(METRICS[2], float('nan')):>11.0f}{m.get(METRICS[3], float('nan')):>11.0f}"
                   f"{m.get(METRICS[4], float('nan')):>12.0f}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quickcupy.tools.ldgsts_probe", description=__doc__.splitlines()[0])
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
            f.write(f"# command: python -m quickcupy.tools.ldgsts_probe --out {args.out}\n" + text + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Predicted shared-memory traffic of one GEMM launch, without a GPU.

Walks each kernel's shared-memory instructions as the CUDA sources issue them, with the lane
addresses taken from the index maps the sources are compiled with (:mod:`quickcupy.smem_maps`) and
the grid from the launch planner (:func:`quickcupy.kernels.plan`), and counts wavefronts and bank
conflicts with :mod:`quickcupy.analysis.banks`. The result uses Nsight Compute's categories:

    st      st.shared (STS): AWQ's activation stores and its dequantized-weight write-back
    ldsm    ldmatrix (LDSM): A fragments (both kernels) and B fragments (AWQ)
    ldgsts  cp.async (LDGSTS): QUICK's activation copies

Counts are per launch, summed over all warps of all blocks, as ncu reports them.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .. import kernels, smem_maps
from ..quantize import effective_group_size
from . import banks

OPS = ("st", "ldsm", "ldgsts")
LANES = np.arange(banks.WARP)


def _block_steps(p: kernels.LaunchPlan) -> int:
    """Main-loop steps summed over the K splits of one (M tile, N tile): the last split may be short."""
    chunks = p.K // 32
    steps = 0
    for s in range(p.split_k):
        n = min(p.chunks_per_split, chunks - s * p.chunks_per_split)
        steps += math.ceil(n / p.tile.chunks)
    return steps


def _consts(p: kernels.LaunchPlan) -> dict:
    return {"BM": p.bm, "BN": p.bn, "BK": 32 * p.tile.chunks}


def _addresses(name: str, consts: dict, pitch: int, **args) -> np.ndarray:
    """Byte addresses (32 lanes) of one instruction of map ``name`` in an fp16 array of ``pitch``."""
    row, col = smem_maps.evaluate(name, consts, lane=LANES, **args)
    return (np.broadcast_to(row, LANES.shape) * pitch + np.broadcast_to(col, LANES.shape)) * 2


def _awq_instructions(p):
    """(op, Wavefronts, count per warp per step) for one warp of awq_gemm."""
    c = _consts(p)
    bm, bn, bk = c["BM"], c["BN"], c["BK"]
    a_pitch, b_pitch = bk + smem_maps.PAD, bn + smem_maps.PAD
    b_passes = bk // (64 // (bn // 8))
    for warp in range(p.design.threads // banks.WARP):
        for i in range(bm // 16):
            yield warp, "st", banks.count_wavefronts(_addresses("AWQ_A_ST", c, a_pitch, warp=warp, i=i), 16)
        for i in range(b_passes):
            yield warp, "st", banks.count_wavefronts(_addresses("AWQ_B_ST", c, b_pitch, warp=warp, i=i), 16)
        for kk in range(bk // 16):
            for mt in range(bm // 16):
                yield warp, "ldsm", banks.count_ldmatrix(_addresses("A_LDSM", c, a_pitch, mt=mt, kk=kk), 4)
            for pair in range(bn // 2 // 16):
                yield warp, "ldsm", banks.count_ldmatrix(
                    _addresses("AWQ_B_LDSM", c, b_pitch, warp=warp, p=pair, kk=kk), 4)


def _quick_instructions(p):
    c = _consts(p)
    bm, bk = c["BM"], c["BK"]
    pitch = bk + smem_maps.PAD
    for warp in range(p.design.threads // banks.WARP):
        for i in range(bm * bk // 8 // p.design.threads):
            yield warp, "ldgsts", banks.count_wavefronts(_addresses("QUICK_A_CP", c, pitch, warp=warp, i=i), 16)
        for kk in range(bk // 16):
            for mt in range(bm // 16):
                yield warp, "ldsm", banks.count_ldmatrix(_addresses("A_LDSM", c, pitch, mt=mt, kk=kk), 4)


# Design name -> its walk of shared-memory instructions (a new design adds its walk here).
WALKS = {"awq": _awq_instructions, "quick": _quick_instructions}


def predict(kernel: str, M: int, N: int, K: int, group_size: int, sm_count: int = 132, **plan_args) -> dict:
    """Predicted per-launch shared-memory counts of ``kernel`` (a gemm kernel name, see
    :mod:`quickcupy.registry`), for x (M, K) @ W (K, N) with ``group_size`` (-1: one group per row).

    Returns {"<op>_inst", "<op>_wavefronts", "<op>_conflicts" for op in OPS} as ints, plus
    "tile_m" and "split_k" of the plan. ValueError for a design the model has no walk for.
    """
    p = kernels.plan(kernel, M, N, K, effective_group_size(group_size, K), sm_count, **plan_args)
    if p.design.name not in WALKS:
        raise ValueError(f"the bank model has no walk of the {p.design.name} design")
    tiles = p.grid[0] * p.grid[1]
    steps = tiles * _block_steps(p)
    # QUICK: warps whose 32 columns lie past N skip the ldmatrix/mma part (but copy activations).
    n_tiles_full, n_rest = divmod(N, p.bn)
    active_warps = {w: (n_tiles_full + (w * 32 < n_rest)) / p.grid[1] for w in range(4)}
    totals = defaultdict(lambda: banks.Wavefronts(0, 0))
    inst = defaultdict(int)
    for warp, op, count in WALKS[p.design.name](p):
        share = active_warps[warp] if (p.design.name == "quick" and op == "ldsm") else 1.0
        n = int(round(steps * share))
        totals[op] = totals[op] + count * n
        inst[op] += n
    out = {"tile_m": p.bm, "split_k": p.split_k}
    for op in OPS:
        out[f"{op}_inst"] = inst[op]
        out[f"{op}_wavefronts"] = int(totals[op].wavefronts)
        out[f"{op}_conflicts"] = int(totals[op].conflicts)
    return out


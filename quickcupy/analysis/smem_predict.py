"""Predicted shared-memory traffic of one GEMM launch, without a GPU.

Walks each kernel's shared-memory instructions as the CUDA sources issue them, with the lane
addresses taken from the index maps the sources are compiled with (:mod:`quickcupy.smem_maps`) and
the grid from the launch planner (:func:`quickcupy.kernels.plan`), and counts wavefronts and bank
conflicts with :mod:`quickcupy.analysis.banks`. The result uses Nsight Compute's categories:

    st      st.shared (STS): AWQ's activation stores and its dequantized-weight write-back;
            quick_decode's zero fill and its fp32 sums between the warps of a block
    ld      ld.shared (LDS): quick_decode's reads of those sums
    ldsm    ldmatrix (LDSM): A fragments (awq, quick), B fragments (awq), activations (quick_decode)
    ldgsts  cp.async (LDGSTS): the activation copies of quick and quick_decode

Counts are per launch, summed over all warps of all blocks, as ncu reports them.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .. import kernels, smem_maps
from ..quantize import effective_group_size
from . import banks

OPS = ("st", "ld", "ldsm", "ldgsts")
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


def _sm90_instructions(p):
    """quick_sm90, per K step: the activations arrive by TMA (the copy engine, not the LSU: no
    shared-memory pipe instructions); every warp copies its own tile's packed weights (one 16-byte
    cp.async per lane and chunk: 512 contiguous bytes) and, per reloaded chunk, its scales and zeros
    (lanes 0..4, 80 contiguous bytes) into the step's ring slot, then reads its weights back (one
    16-byte ld.shared per lane and chunk) and, per reloaded chunk, its scales (8 bytes at 8 g) and
    zeros (2 bytes at 64 + 2 g; lanes of one g share them). wgmma reads its B operand through the
    async proxy, outside ncu's shared-memory pipe counters."""
    warps = p.design.threads // banks.WARP
    reloads = p.tile.chunks // math.gcd(p.group_size // 32, p.tile.chunks)
    g = LANES // 4
    for warp in range(warps):
        for ch in range(p.tile.chunks):
            yield warp, "ldgsts", banks.count_wavefronts(16 * ((warp * p.tile.chunks + ch) * 32 + LANES), 16)
            yield warp, "ld", banks.count_wavefronts(16 * LANES, 16, load=True)
        for r in range(reloads):
            yield warp, "ldgsts", banks.count_wavefronts((r * warps + warp) * 80 + 16 * LANES, 16, active=LANES < 5)
            yield warp, "ld", banks.count_wavefronts(8 * g, 8, load=True)
            yield warp, "ld", banks.count_wavefronts(64 + 2 * g, 2, load=True)


def _predict_decode(p) -> dict:
    """quick_decode, block by block (its K slices differ in length): the activation copy (cp.async,
    zero-fill st.shared for chunks past the slice, one st of the zero row), one ldmatrix.x4 per chunk
    and 8-row tile of each batch a warp computes, and with KW > 1 the fp32 sums of the upper warps
    stored and read back once. Addresses from the DEC_* maps of smem_maps."""
    sh = p.shape
    M, U, KW, T = p.M, sh.chunks, sh.kw, 32 * sh.nwarps
    chunks, cps, pitch = p.K // 32, p.chunks_per_split, p.chunks_per_split * 32 + 8
    tiles_n = p.N // 32
    totals = {op: banks.Wavefronts(0, 0) for op in OPS}
    inst = dict.fromkeys(OPS, 0)

    def add(op, count, n=1):
        totals[op] = totals[op] + count * n
        inst[op] += n

    for split in range(p.grid[1]):
        nch_b = min(chunks, (split + 1) * cps) - split * cps
        vecs = -(-nch_b // U) * U * 4
        consts = {"VECS": vecs}
        blocks = p.grid[0]
        for i0 in range(0, M * vecs, T):                       # the copy loop, one pass per i0
            for w in range(sh.nwarps):
                i = i0 + 32 * w + LANES
                live = i < M * vecs
                if not live.any():
                    continue
                row, col = smem_maps.evaluate("DEC_A_CP", consts, i=i)
                addr = np.where(live, (row * pitch + col) * 2, 0)
                cp = live & (col < nch_b * 32)
                for op, mask in (("ldgsts", cp), ("st", live & ~cp)):
                    if mask.any():
                        add(op, banks.count_wavefronts(addr, 16, active=mask), blocks)
        add("st", banks.count_wavefronts(np.zeros(32, np.int64), 16, active=LANES == 0), blocks)
        nbat = -(-nch_b // U)
        for w in range(sh.nwarps):                             # warps along N x along K
            wn, wk = w % sh.columns, w // sh.columns
            active_blocks = sum(1 for cb in range(blocks) if cb * sh.columns + wn < tiles_n)
            nb = -(-(nbat - wk) // KW) if nbat > wk else 0
            rcs = np.array([(b * KW + wk) * U + c for b in range(nb) for c in range(U)], np.int64)
            for mb in range(sh.mb):
                if not len(rcs):
                    break
                row, col = smem_maps.evaluate("DEC_A_LDSM", {}, lane=LANES[None, :], mb=mb, rc=rcs[:, None])
                row = np.broadcast_to(row, col.shape)
                addr = np.where(row < M, (row * pitch + col) * 2, M * pitch * 2)   # rows >= M: zero row
                totals["ldsm"] = totals["ldsm"] + banks.count_ldmatrix_many(addr, 4).sum() * active_blocks
                inst["ldsm"] += active_blocks * len(rcs)
            if KW > 1:                                         # fp32 sums: stored by wk > 0, read by wk == 0
                words = 2 * sh.mb * 4
                for v in range(words):
                    if wk > 0:
                        r, c = smem_maps.evaluate("DEC_RED", {}, lane=LANES, w=(wk - 1) * sh.columns + wn, v=v)
                        add("st", banks.count_wavefronts((r * 256 * sh.mb + c) * 4, 4), blocks)
                    else:
                        for k2 in range(1, KW):
                            r, c = smem_maps.evaluate("DEC_RED", {}, lane=LANES, w=(k2 - 1) * sh.columns + wn, v=v)
                            add("ld", banks.count_wavefronts((r * 256 * sh.mb + c) * 4, 4, load=True), blocks)
    out = {"tile_m": p.bm, "split_k": p.grid[1]}
    for op in OPS:
        out[f"{op}_inst"] = inst[op]
        out[f"{op}_wavefronts"] = int(totals[op].wavefronts)
        out[f"{op}_conflicts"] = int(totals[op].conflicts)
    return out


# Design name -> its walk of shared-memory instructions (a new design adds its walk here).
WALKS = {"awq": _awq_instructions, "quick": _quick_instructions, "quick_sm90": _sm90_instructions}


def predict(kernel: str, M: int, N: int, K: int, group_size: int, sm_count: int = 132, **plan_args) -> dict:
    """Predicted per-launch shared-memory counts of ``kernel`` (a gemm kernel name, see
    :mod:`quickcupy.registry`), for x (M, K) @ W (K, N) with ``group_size`` (-1: one group per row).

    Returns {"<op>_inst", "<op>_wavefronts", "<op>_conflicts" for op in OPS} as ints, plus
    "tile_m" and "split_k" of the plan. ValueError for a design the model has no walk for.
    """
    p = kernels.plan(kernel, M, N, K, effective_group_size(group_size, K), sm_count, **plan_args)
    if p.design.planner == "decode":
        return _predict_decode(p)
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


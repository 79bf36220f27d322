"""Predicted shared-memory traffic of one GEMM launch, without a GPU.

Walks each kernel's shared-memory instructions as the CUDA sources issue them, with the lane
addresses taken from the index maps the sources are compiled with (:mod:`quickcupy.smem_maps`) and
the grid from the launch planner (:func:`quickcupy.kernels.plan`), and counts wavefronts and bank
conflicts with :mod:`quickcupy.analysis.banks`. The result uses Nsight Compute's categories:

    st      st.shared (STS): AWQ's activation stores and its dequantized-weight write-back;
            quick_decode's zero row and its fp32 sums between the warps of a block
    ld      ld.shared (LDS): quick_decode's reads of those sums and of its weight ring
    ldsm    ldmatrix (LDSM): A fragments (awq, quick), B fragments (awq), activations (quick_decode)
    ldgsts  cp.async (LDGSTS): the activation copies of quick and quick_decode, quick_decode's ring

Counts are per launch, summed over all warps of all blocks, as ncu reports them.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .. import kernels, smem_maps
from ..quantize import effective_group_size
from ..registry import DecodeDesign
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
    """quick_sm90, per K step: the activations, packed weights, scales and zeros arrive by TMA (the
    copy engine, not the LSU: no shared-memory pipe instructions); every warp reads its weights
    back ([tile column][chunk][lane], 16 bytes a lane) and, per reloaded chunk, its scales ([tile
    column] rows of 64 bytes, 8 at 8 g) and zeros (rows of 16 bytes, 2 at 2 g; lanes of one g share
    them). With two row blocks a warpgroup (bn = 32 x warps) warp w reads all of tile column w: one
    16-byte ld.shared per lane and chunk, 8-byte scales. With one (every tile of the plan) warp w
    reads half w % 2 of tile column w / 2: 8 bytes of each lane's 16 (at 8 (w % 2)) and 4 of the 8
    scale bytes. wgmma reads its B operand through the async proxy, outside ncu's shared-memory pipe
    counters."""
    warps = p.block[0] // banks.WARP
    whole = p.bn == 32 * warps                  # each warp a whole tile column (else half of one)
    reloads = p.tile.chunks // math.gcd(p.group_size // 32, p.tile.chunks)
    g = LANES // 4
    for warp in range(warps):
        col, half = (warp, 0) if whole else (warp // 2, warp % 2)
        w_bytes, s_bytes = (16, 8) if whole else (8, 4)
        for ch in range(p.tile.chunks):
            yield warp, "ld", banks.count_wavefronts(16 * ((col * p.tile.chunks + ch) * 32 + LANES) + 8 * half,
                                                     w_bytes, load=True)
        for r in range(reloads):
            yield warp, "ld", banks.count_wavefronts((col * reloads + r) * 64 + 8 * g + 4 * half, s_bytes, load=True)
            yield warp, "ld", banks.count_wavefronts((col * reloads + r) * 16 + 2 * g, 2, load=True)


def _predict_decode(p) -> dict:
    """quick_decode, block by block (its K slices differ in length). Shared memory: the warps' ring
    slots (stages S > 0), then the activations and 16 zero bytes. Activations by cp.async
    (zero-filling past the slice): the register pipeline (S = 0) copies the whole slice once (rows of
    32 cps + 8 halfs), the ring one round per round into slot r % S (rows of 32 KW U + 8 halfs); one
    st of the zero row. Ring, per round and warp: U weight copies and one
    scale/zero copy (5 lanes per scale block); per chunk a warp computes: one ld.shared.v4 of its
    weights, one ldmatrix.x4 per 8-row tile, and per scale block the scale (8 bytes) and zero (2 bytes)
    of column group g. With KW > 1 the fp32 sums of the upper warps stored and read back once.
    Addresses from the DEC_* maps of smem_maps."""
    sh = p.shape
    M, U, KW, S, T = p.M, sh.chunks, sh.kw, sh.stages, 32 * sh.nwarps
    rc = sh.round_chunks
    chunks, cps = p.K // 32, p.chunks_per_split
    pitch = 32 * (cps if S == 0 else rc) + 8
    tiles_n = p.N // 32
    gch = math.gcd(p.group_size // 32, U)
    slot_bytes = U * kernels.DECODE_SLOT_BYTES
    a_base = sh.nwarps * S * slot_bytes                # byte offset of the activation slots
    aslot = M * pitch                                  # halfs per activation slot
    zero_row = a_base + max(S, 1) * aslot * 2
    g = LANES // 4
    totals = {op: banks.Wavefronts(0, 0) for op in OPS}
    inst = dict.fromkeys(OPS, 0)

    def add(op, count, n=1):
        totals[op] = totals[op] + count * n
        inst[op] += n

    blocks = p.grid[0]
    for split in range(p.grid[1]):
        nch_b = min(chunks, (split + 1) * cps) - split * cps
        nrounds = -(-nch_b // rc)
        passes = [(rc * 4 * nrounds, None)] if S == 0 else [(rc * 4, r) for r in range(nrounds)]
        for vecs, r in passes:                           # the activation copy loops
            for i0 in range(0, M * vecs, T):
                for w in range(sh.nwarps):
                    i = i0 + 32 * w + LANES
                    live = i < M * vecs
                    if not live.any():
                        continue
                    row, col = smem_maps.evaluate("DEC_A_CP", {"VECS": vecs}, i=i)
                    slot = 0 if r is None else r % S
                    addr = np.where(live, a_base + (slot * aslot + row * pitch + col) * 2, 0)
                    add("ldgsts", banks.count_wavefronts(addr, 16, active=live), blocks)
        add("st", banks.count_wavefronts(np.full(32, zero_row), 16, active=LANES == 0), blocks)
        for w in range(sh.nwarps):                     # warps along N x along K
            wn, wk = w % sh.columns, w // sh.columns
            active_blocks = sum(1 for cb in range(blocks) if cb * sh.columns + wn < tiles_n)
            nb = -(-(nch_b - wk * U) // rc) if nch_b > wk * U else 0
            if S:                                      # ring copies: every warp, every round
                for r in range(nrounds):
                    base = (w * S + r % S) * slot_bytes
                    for c in range(U):
                        add("ldgsts", banks.count_wavefronts(base + c * 512 + 16 * LANES, 16), blocks)
                    q, part = LANES // 5, LANES % 5
                    addr = base + np.where(part < 4, U * 512 + q * 64 + 16 * part, U * 576 + q * 16)
                    add("ldgsts", banks.count_wavefronts(np.where(LANES < 5 * (U // gch), addr, 0), 16,
                                                         active=LANES < 5 * (U // gch)), blocks)
            rounds = np.arange(nb)
            if not len(rounds) or not active_blocks:
                continue
            if S:                                      # reads of the ring: weights, scale blocks
                for r in rounds:
                    base = (w * S + r % S) * slot_bytes
                    for c in range(U):
                        add("ld", banks.count_wavefronts(base + c * 512 + 16 * LANES, 16, load=True),
                            active_blocks)
                        if c % gch == 0:
                            q = c // gch
                            add("ld", banks.count_wavefronts(base + U * 512 + q * 64 + 8 * g, 8, load=True),
                                active_blocks)
                            add("ld", banks.count_wavefronts(base + U * 576 + q * 16 + 2 * g, 2, load=True),
                                active_blocks)
            slots = np.zeros_like(rounds) if S == 0 else rounds % S
            first = rounds * rc if S == 0 else np.zeros_like(rounds)   # chunk of round r in its row
            for mb in range(sh.mb):
                cs = np.arange(U)
                row, col = smem_maps.evaluate("DEC_A_LDSM", {}, lane=LANES[None, None, :], mb=mb,
                                              rc=(first[:, None] + wk * U + cs[None, :])[:, :, None])
                row = np.broadcast_to(row, (len(rounds), U, 32))
                col = np.broadcast_to(col, (len(rounds), U, 32))
                addr = np.where(row < M, a_base + (slots[:, None, None] * aslot + row * pitch + col) * 2, zero_row)
                totals["ldsm"] = totals["ldsm"] + banks.count_ldmatrix_many(addr.reshape(-1, 32), 4).sum() * active_blocks
                inst["ldsm"] += active_blocks * len(rounds) * U
            if KW > 1:                                 # fp32 sums: stored by wk > 0, read by wk == 0
                words = 2 * sh.mb * 4
                for v in range(words):
                    if wk > 0:
                        r_, c_ = smem_maps.evaluate("DEC_RED", {}, lane=LANES, w=(wk - 1) * sh.columns + wn, v=v)
                        add("st", banks.count_wavefronts((r_ * 256 * sh.mb + c_) * 4, 4), blocks)
                    else:
                        for k2 in range(1, KW):
                            r_, c_ = smem_maps.evaluate("DEC_RED", {}, lane=LANES, w=(k2 - 1) * sh.columns + wn, v=v)
                            add("ld", banks.count_wavefronts((r_ * 256 * sh.mb + c_) * 4, 4, load=True), blocks)
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
    if isinstance(p.design, DecodeDesign):
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


"""Shared-memory index maps of both kernels, written once.

Each map says which (row, column) of a shared fp16 array a lane touches in one instruction. The
kernel loader turns every map into a C macro prepended to the CUDA sources (``AWQ_B_ST_ROW(lane,
warp, i)`` ...), and the bank-conflict model evaluates the same expressions with NumPy, so the
prediction and the kernel cannot drift apart. Expressions use only + * / % on non-negative ints
(C's ``/`` is Python's ``//`` here) and the kernels' compile-time constants BM, BN, BK.

Shared arrays (fp16, row pitch = columns + PAD, so 8-row ldmatrix reads hit distinct banks)::

    AWQ    A_s[BM][BK + PAD]   activations       B_s[BK][BN + PAD]   dequantized weights (k, n)
    QUICK  A_s[STAGES][BM][BK + PAD]   activations only; weights never touch shared memory
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD = 8           # halfs of padding per shared row (16 bytes)
AWQ_THREADS = 64  # AutoAWQ's block: 2 warps
QUICK_THREADS = 128


@dataclass(frozen=True)
class IndexMap:
    args: tuple   # macro arguments, e.g. ("lane", "warp", "i")
    row: str
    col: str
    doc: str


MAPS = {
    # ldmatrix.x4 of a 16x16 A tile: lanes 0-15 give rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8,
    # which orders the four 8x8 matrices as the mma A registers a0..a3. mt: m16 tile, kk: k16 step.
    "A_LDSM": IndexMap(("lane", "mt", "kk"), "mt * 16 + lane % 16", "kk * 16 + (lane / 16) * 8",
                       "A fragment rows for ldmatrix.x4 (both kernels)"),
    # AutoAWQ's activation store: 4 lanes per 32-half row, 8 rows per warp, 16 rows per pass i.
    "AWQ_A_ST": IndexMap(("lane", "warp", "i"), "i * 16 + warp * 8 + lane / 4", "(lane % 4) * 8",
                         "st.shared.v4 of activations (AWQ)"),
    # AutoAWQ's dequantized-weight write-back: BN/8 lanes per row (8 halfs each), 64/(BN/8) rows per
    # pass i over the block's two warps.
    "AWQ_B_ST": IndexMap(("lane", "warp", "i"),
                         "i * (64 / (BN / 8)) + warp * (32 / (BN / 8)) + lane / (BN / 8)",
                         "(lane % (BN / 8)) * 8",
                         "st.shared.v4 of dequantized weights (AWQ write-back)"),
    # ldmatrix.x4.trans of two n8 B tiles: lanes 0-15 rows k 0-15 at n 0, lanes 16-31 at n 8.
    # p: pair of n8 tiles of the warp, kk: k16 step.
    "AWQ_B_LDSM": IndexMap(("lane", "warp", "p", "kk"), "kk * 16 + lane % 16",
                           "warp * (BN / 2) + p * 16 + (lane / 16) * 8",
                           "B fragment rows for ldmatrix.x4.trans (AWQ)"),
    # QUICK's cp.async of activations: BK/8 lanes per row, 128 threads per pass i.
    "QUICK_A_CP": IndexMap(("lane", "warp", "i"), "(i * 128 + warp * 32 + lane) / (BK / 8)",
                           "((i * 128 + warp * 32 + lane) % (BK / 8)) * 8",
                           "cp.async (16 B) of activations (QUICK)"),
}


def cuda_macros() -> str:
    """The maps as C macros ``NAME_ROW(args)`` / ``NAME_COL(args)``, prepended to the CUDA sources."""
    lines = ["// Generated from quickcupy/smem_maps.py: shared-memory index maps."]
    for name, m in MAPS.items():
        args = ", ".join(m.args)
        for part, expr in (("ROW", m.row), ("COL", m.col)):
            body = expr
            for a in m.args:
                body = _replace_word(body, a, f"({a})")
            lines.append(f"#define {name}_{part}({args}) ({body})")
    lines.append(f"#define SMEM_PAD {PAD}")
    return "\n".join(lines) + "\n"


def evaluate(name: str, consts: dict, **args):
    """(row, col) integer arrays of map ``name`` for broadcastable NumPy ``args``, given BM/BN/BK."""
    m = MAPS[name]
    missing = set(m.args) - set(args)
    if missing:
        raise ValueError(f"map {name} needs arguments {sorted(missing)}")
    env = {k: np.asarray(v, dtype=np.int64) for k, v in args.items()}
    env.update({k: int(v) for k, v in consts.items()})
    return tuple(eval(expr.replace("/", "//"), {"__builtins__": {}}, env) for expr in (m.row, m.col))


def _replace_word(text: str, word: str, repl: str) -> str:
    import re
    return re.sub(rf"\b{word}\b", repl, text)

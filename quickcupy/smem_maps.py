"""Shared-memory index maps of the kernels, written once, and the header generated from them.

Each map says which (row, column) of a shared fp16 array a lane touches in one instruction.
:func:`header_text` turns every map into a C macro (``AWQ_B_ST_ROW(lane, warp, i)`` ...) and the
thread counts of :mod:`quickcupy.registry` into constants, written to ``cuda/smem_maps.cuh`` (committed,
so nvcc, an editor or Nsight's source view find them; ``python -m quickcupy.smem_maps`` rewrites it
and a test checks it is current). The bank-conflict model evaluates the same expressions with
NumPy, so the prediction and the kernel cannot drift apart. Expressions use only + * / % on
non-negative ints (C's ``/`` is Python's ``//`` here), the kernels' compile-time constants BM, BN,
BK and the thread constants of the header.

Shared arrays (fp16, row pitch = columns + PAD, so 8-row ldmatrix reads hit distinct banks)::

    AWQ    A_s[BM][BK + PAD]   activations       B_s[BK][BN + PAD]   dequantized weights (k, n)
    QUICK  A_s[STAGES][BM][BK + PAD]   activations only; weights never touch shared memory
    SM90   ring of K steps: activations X[BM][64] in the 128-byte swizzle (written by TMA, whose
           tensor map names the swizzle; read by wgmma), then the packed weights, scales, zeros
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import registry
from .kernels import cuda_dir

PAD = registry.SMEM_PAD          # halfs of padding per shared row (16 bytes)
HEADER = "smem_maps.cuh"         # in cuda/


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
    # AutoAWQ's dequantized-weight write-back: BN/8 lanes per row (8 halfs each), AWQ_THREADS/(BN/8)
    # rows per pass i over the block's two warps.
    "AWQ_B_ST": IndexMap(("lane", "warp", "i"),
                         "i * (AWQ_THREADS / (BN / 8)) + warp * (32 / (BN / 8)) + lane / (BN / 8)",
                         "(lane % (BN / 8)) * 8",
                         "st.shared.v4 of dequantized weights (AWQ write-back)"),
    # ldmatrix.x4.trans of two n8 B tiles: lanes 0-15 rows k 0-15 at n 0, lanes 16-31 at n 8.
    # p: pair of n8 tiles of the warp, kk: k16 step.
    "AWQ_B_LDSM": IndexMap(("lane", "warp", "p", "kk"), "kk * 16 + lane % 16",
                           "warp * (BN / 2) + p * 16 + (lane / 16) * 8",
                           "B fragment rows for ldmatrix.x4.trans (AWQ)"),
    # QUICK's cp.async of activations: BK/8 lanes per row, QUICK_THREADS threads per pass i.
    "QUICK_A_CP": IndexMap(("lane", "warp", "i"), "(i * QUICK_THREADS + warp * 32 + lane) / (BK / 8)",
                           "((i * QUICK_THREADS + warp * 32 + lane) % (BK / 8)) * 8",
                           "cp.async (16 B) of activations (QUICK)"),
    # quick_decode's activations, the whole K slice once (register pipeline) or one round into a ring
    # slot: element i (of M * VECS 16-byte vectors, VECS per row) to row i / VECS.
    "DEC_A_CP": IndexMap(("i",), "i / VECS", "(i % VECS) * 8",
                         "cp.async (16 B) of activations (quick_decode)"),
    # quick_decode's ldmatrix.x4 of 8 rows x 32 k of chunk rc: lane L gives row 8 mb + L % 8 at
    # k 8 (L / 8) (rows >= M read a zero row instead).
    "DEC_A_LDSM": IndexMap(("lane", "mb", "rc"), "8 * mb + lane % 8", "32 * rc + 8 * (lane / 8)",
                           "A fragment rows for ldmatrix.x4 (quick_decode, activations as mma B)"),
    # quick_decode's fp32 sums of the upper warps of a tile column (row w), word v of a lane.
    "DEC_RED": IndexMap(("lane", "w", "v"), "w", "v * 32 + lane",
                        "st/ld.shared (4 B) of fp32 split-K sums between the warps of a block (quick_decode)"),
}


def constants() -> dict:
    """Named integer constants of the header: SMEM_PAD and every <NAME>_THREADS of the registry."""
    out = {"SMEM_PAD": PAD}
    for source in registry.SOURCES.values():
        out.update(source.threads)
    return out


def header_text() -> str:
    """The text of cuda/smem_maps.cuh: constants, then one ROW and one COL macro per map."""
    lines = ["// GENERATED from quickcupy/smem_maps.py and quickcupy/registry.py by",
             "// `python -m quickcupy.smem_maps`: do not edit (a test checks it is current).",
             "// Shared-memory index maps (which row/column of a shared fp16 array a lane touches) and",
             "// launch constants, shared by the kernels and the bank-conflict model.",
             "#pragma once", ""]
    lines += [f"constexpr int {name} = {value};" for name, value in constants().items()]
    lines.append("")
    for name, m in MAPS.items():
        lines.append(f"// {m.doc}")
        args = ", ".join(m.args)
        for part, expr in (("ROW", m.row), ("COL", m.col)):
            body = expr
            for a in m.args:
                body = _replace_word(body, a, f"({a})")
            lines.append(f"#define {name}_{part}({args}) ({body})")
    return "\n".join(lines) + "\n"


def header_path() -> Path:
    return cuda_dir() / HEADER


def evaluate(name: str, consts: dict, **args):
    """(row, col) integer arrays of map ``name`` for broadcastable NumPy ``args``, given BM/BN/BK."""
    m = MAPS[name]
    missing = set(m.args) - set(args)
    if missing:
        raise ValueError(f"map {name} needs arguments {sorted(missing)}")
    env = {k: np.asarray(v, dtype=np.int64) for k, v in args.items()}
    env.update(constants())
    env.update({k: int(v) for k, v in consts.items()})
    return tuple(eval(expr.replace("/", "//"), {"__builtins__": {}}, env) for expr in (m.row, m.col))


def _replace_word(text: str, word: str, repl: str) -> str:
    import re
    return re.sub(rf"\b{word}\b", repl, text)


def main(argv=None) -> int:
    """Writes cuda/smem_maps.cuh (``--check``: exit 1 if it is not current instead)."""
    argv = sys.argv[1:] if argv is None else argv
    path, text = header_path(), header_text()
    if "--check" in argv:
        current = path.is_file() and path.read_text() == text
        print(f"{path}: {'current' if current else 'STALE, run python -m quickcupy.smem_maps'}")
        return 0 if current else 1
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How fast is fused decode attention at large batch, today's kernel against variants of it?

The fused decode-attention kernel (cuda/decode_attention.cu, rope + cache write + attention) timed
alone, eagerly, at one shape (default: Llama-2-7B heads at batch 256 over 131 positions, where
the whole model's decode is attention-bound), as:

- ``current``: today's single-pass instance (``general`` false), launched with window 0 and one
  split, as the Llama runner launches it;
- ``general``: the instance with split-KV and the sliding window read at run time, at the same
  launch (what those features cost where they do not act);
- each edit of ``EDITS`` to the single-pass instance, compiled from an edited copy of cuda/ in a
  temporary folder: ``no-early`` (the sm_90 early tile copy off), ``no-pdl`` (no griddepcontrol)
  and ``plain`` (both: the features added since the single-pass kernel, compiled out), and
  ``no-prefetch`` (without the L2 prefetch of the next tile after each tile's copies);
- ``old``: ``--old FILE``, a decode_attention.cu of an earlier commit with that commit's launch
  arguments (``--old-args 11``: q, keys, values, out, n_heads, n_kv, max_len, length, start, cos,
  sin, as before the window and split-KV arguments; its template has no ``general``), compiled the
  same way.

From the checkout, on a GPU (the package's cuda/ is never written)::

    python dev/attention_probe.py [--batch 256] [--length 131] [--max-len 256] [--rounds 2] [--old old_attention.cu]

Each variant runs in its own process (the loader reads ``$QUICKCUPY_CUDA_DIR`` once), the list
``--rounds`` times over in the same order, so drift shows; times are medians of
``quickcupy.tools.timing.time_gpu`` in us, outputs checked against ``current``'s.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the checkout's quickcupy

import source_variants  # noqa: E402  (dev/, beside this file)

# Named edits of cuda/decode_attention.cu: (text found exactly once, its replacement). Each turns a
# run-time feature into a constant the compiler folds away, for the launch this probe makes.
EDITS = {
    "no-early": [("constexpr bool EARLY = true;", "constexpr bool EARLY = false;")],
    "no-pdl": [("  qc::pdl_trigger();\n", "\n"), ("  qc::pdl_wait();", "  ")],
}
EDITS["plain"] = EDITS["no-early"] + EDITS["no-pdl"]
# ``no-prefetch``: the L2 prefetch of the next tile after each tile's copies left out.
EDITS["no-prefetch"] = [(
    "    if (t0 + TP < span.hi) prefetch_tile<D>(K, V, max_len, t0 + TP, min(TP, span.hi - t0 - TP));\n", "")]


def edited(source: str, name: str) -> str:
    """``source`` with the edits of ``EDITS[name]`` applied in order (RuntimeError if a text is not
    there exactly once)."""
    return source_variants.edited(source, EDITS[name], f"decode_attention.cu, {name}")


def measure(args) -> dict:
    """One variant in this process: time and output checksum of the kernel the loader finds."""
    import cupy
    import numpy as np

    from quickcupy.attention import decode_heads_per_block, decode_smem_bytes
    from quickcupy.dtypes import ctype
    from quickcupy.kernels import get_function
    from quickcupy.llama import LlamaConfig
    from quickcupy.llama.model import rope_tables
    from quickcupy.registry import DECODE_ATTENTION_THREADS, decode_attention_instance
    from quickcupy.tools.timing import time_gpu

    B, nh, nkv, d, length, max_len = args.batch, 32, 32, 128, args.length, args.max_len
    rng = np.random.default_rng(0)
    f16 = lambda a: cupy.asarray(a.astype(np.float16))  # noqa: E731
    keys = f16(rng.standard_normal((B, nkv, d, max_len)).astype(np.float32))
    values = f16(rng.standard_normal((B, nkv, max_len, d)).astype(np.float32))
    qkv = f16(rng.standard_normal((B, nh + 2 * nkv, d)).astype(np.float32))
    cos, sin = (cupy.asarray(t) for t in rope_tables(
        LlamaConfig(hidden_size=nh * d, intermediate_size=64, num_attention_heads=nh, num_key_value_heads=nkv,
                    num_hidden_layers=1), np.arange(max_len)))
    heads = decode_heads_per_block(nh, nkv)
    smem = decode_smem_bytes(d, heads, 2)
    name = (f"decode_attention<{d}, {heads}, {ctype(np.float16)}>" if args.old_args == 11   # no general yet
            else decode_attention_instance(d, heads, args.general, ctype(np.float16)))
    fn = get_function(cupy.cuda.Device().id, "decode_attention.cu", name, smem)
    out = cupy.empty((B, 1, nh * d), np.float16)
    null = np.uint64(0)
    i32 = np.int32
    if args.old_args == 11:
        launch_args = (qkv, keys, values, out, i32(nh), i32(nkv), i32(max_len), i32(length), null, cos, sin)
    else:            # today's: window 0, one split (partials and counters unused)
        launch_args = (qkv, keys, values, out, i32(nh), i32(nkv), i32(max_len), i32(length), i32(0), null, cos, sin,
                       null, null)
    call = lambda: fn((B * nh // heads, 1), (DECODE_ATTENTION_THREADS,), launch_args, shared_mem=smem)  # noqa: E731
    us = time_gpu(call, warmup=10, repeats=args.repeats) * 1e6
    read = 2 * B * nkv * length * d * 2
    return {"us": us, "tb_per_s": read / us / 1e6, "checksum": float(cupy.abs(out.astype(np.float32)).sum())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--length", type=int, default=131)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2, help="times the whole list of variants runs")
    p.add_argument("--old", metavar="FILE", help="an earlier commit's decode_attention.cu")
    p.add_argument("--old-args", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--general", action="store_true", help=argparse.SUPPRESS)   # a child: the general instance
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # a child: measure and print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return 0
    base = [sys.executable, __file__, "--one", "--batch", str(args.batch), "--length", str(args.length),
            "--max-len", str(args.max_len), "--repeats", str(args.repeats)]
    source = (ROOT / "cuda" / "decode_attention.cu").read_text()
    variants = {"current": (None, []), "general": (None, ["--general"])}
    variants.update({name: (edited(source, name), []) for name in EDITS})
    if args.old:
        variants["old"] = (Path(args.old).read_text(), ["--old-args", "11"])
    results = source_variants.run(base, "decode_attention.cu", variants, args.rounds)
    ref = results["current"][0]["checksum"]
    print(f"fused decode attention, batch {args.batch}, 32 heads, head_dim 128, {args.length} positions "
          f"(max_len {args.max_len}), fp16, one split; us per call in each of {args.rounds} rounds")
    for name, runs in results.items():
        same = all(abs(r["checksum"] - ref) <= 1e-3 * abs(ref) for r in runs)
        times = "  ".join(f"{r['us']:7.1f}" for r in runs)
        print(f"  {name:10s} {times}  {runs[-1]['tb_per_s']:5.2f} TB/s of K and V  "
              f"{'output as current' if same else 'OUTPUT DIFFERS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

r"""Does a bulk L2 prefetch of quick_decode's weights, issued before it waits on the previous kernel,
make a Llama decode step faster?

Under programmatic dependent launch quick_decode already fetches its first two weight batches (the
register pipeline) or its first S - 1 rounds (the ring) while the kernel before it finishes. In a
decode step the kernels before the qkv, o and gate|up GEMMs (RMSNorm, attention) read little from
DRAM, so more of the next weight could arrive in that time. Each variant is cuda/quick_decode.cu with
one edit: before ``pdl_wait`` one lane per tile column and K split issues ``cp.async.bulk.prefetch.L2``
(sm_90) for the first part of its slice (whole chunks, then the scales and zeros of their groups),
the grid together at most BUDGET MB of weights (0: every slice whole).

Each variant runs in a process of its own (``source_variants.run``), which
- checks the output bits of quick_decode at M = 1 and 16 on four Llama shapes against the current
  kernel's (a prefetch must change nothing), and
- runs the whole Llama-2-7B model (``llama --vocab 32000``, backend auto, random weights): decode
  tokens/s on the wall clock and in GPU time at each batch, and the batch-1 step in us.

From the checkout, on an sm_90 GPU::

    python dev/decode_l2_probe.py [--budgets 8,16,32,0] [--batch 1,16] [--rounds 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                       # the checkout's quickcupy
sys.path.insert(0, str(Path(__file__).resolve().parent))

import source_variants  # noqa: E402  (dev/, beside this file)

SOURCE = "quick_decode.cu"
SHAPES = ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))   # K x N of a Llama-2-7B layer
MS = (1, 16)                                                           # the register pipeline, the ring

# The instruction (sm_90; compiled out below), put before the file.
_PREFETCH = r'''
__device__ __forceinline__ void probe_bulk_prefetch_l2(const void* p, unsigned bytes) {  // 16-byte aligned
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}
'''
# The prefetch, defined once after the slice's scale row is known, called before both pdl_waits.
# One lane per tile column and split (lane 0 of the warp with wk = 0) issues it; its share of the
# budget is BUDGET / (tile columns x splits), rounded down to whole 512-byte chunks. Scales (64-byte
# rows) and zeros (16-byte rows) of the chunks' groups follow where their rows lie on 16 bytes, as the
# instruction needs.
_HELPER = r'''
  auto probe_l2_slice = [&]() {
    if (lane != 0 || wk != 0 || !active) return;
    constexpr unsigned long long budget = PROBE_L2_MB == 0 ? ~0ull : (unsigned long long)PROBE_L2_MB << 20;
    const unsigned long long share = budget / ((unsigned long long)tiles_n * gridDim.y);
    const unsigned long long whole = (unsigned long long)nch_b * 512;
    const unsigned long long bytes = (whole < share ? whole : share) & ~511ull;
    const char* w = reinterpret_cast<const char*>(qweight + ((size_t)tn * chunks + kc0) * 32);
    for (unsigned long long o = 0; o < bytes; o += 32768)
      probe_bulk_prefetch_l2(w + o, (u32)(bytes - o < 32768 ? bytes - o : 32768));
    const int nch = (int)(bytes / 512);
    if (nch > 0) {
      const int g0 = kc0 / cpg, g1 = (kc0 + nch - 1) / cpg + 1;   // groups of the prefetched chunks
      const uint2* s = scales + (sz_row + g0) * 8;
      const unsigned short* z = qzeros + (sz_row + g0) * 8;
      if (((size_t)s & 15) == 0) probe_bulk_prefetch_l2(s, (u32)(g1 - g0) * 64);
      if (((size_t)z & 15) == 0) probe_bulk_prefetch_l2(z, (u32)(g1 - g0) * 16);
    }
  };
'''
_SZ_ROW = "  const size_t sz_row = (size_t)tn * groups;  // first scale/zero row of the tile column\n"
_WAIT_REGISTERS = "    pdl_wait();  // the activations may be the previous kernel's output\n"
_WAIT_RING = "      if (r < nrounds) issue_w(r, r * SLOT_B);\n    pdl_wait();\n"


def edited(source: str, budget_mb: int) -> str:
    """cuda/quick_decode.cu with the bulk prefetch of at most ``budget_mb`` MB (0: whole slices)."""
    what = f"l2-{budget_mb}"
    text = f"#define PROBE_L2_MB {int(budget_mb)}\n" + _PREFETCH + source
    return source_variants.edited(text, [
        (_SZ_ROW, _SZ_ROW + _HELPER),
        (_WAIT_REGISTERS, "    probe_l2_slice();\n" + _WAIT_REGISTERS),
        (_WAIT_RING, _WAIT_RING.replace("    pdl_wait();\n", "    probe_l2_slice();\n    pdl_wait();\n")),
    ], what)


def digests() -> dict:
    """{"KxN M": the first 16 hex digits of sha256 of quick_decode's output} on seeded random layers."""
    import cupy
    import numpy as np

    import quickcupy
    from decode_probe import random_layer, x_of
    out = {}
    for K, N in SHAPES:
        cupy.random.seed(1)
        layer = random_layer(K, N, 128)
        for M in MS:
            y = quickcupy.gemm(x_of(M, K), layer, kernel="quick_decode")
            assert not bool(cupy.isnan(y).any()), f"{K}x{N} M={M}: NaN in the output"
            out[f"{K}x{N} M={M}"] = hashlib.sha256(cupy.asnumpy(y).astype(np.float16).tobytes()).hexdigest()[:16]
    return out


def llama(batch: str) -> dict:
    """The whole model once with backend auto: {batch: [tok/s wall, tok/s GPU]} and the batch-1 step."""
    from llama_ab import rates, run_llama
    report = run_llama(ROOT, ["--preset", "7b", "--layers", "32", "--vocab", "32000", "--prompt", "128", "--gen", "16",
                              "--batch", batch, "--backends", "auto", "--check-tokens", "0"])
    step = report.get("decode_step_batch1", {}).get("auto", {})
    return {"rates": {str(b): list(r) for (backend, b), r in rates(report).items() if backend == "auto"},
            "step_us": step.get("full_step_us")}


def table(results: dict, batch: str) -> str:
    """Rows per variant: output bits against current's, then per batch each round's tok/s (wall), the
    median and its ratio to current's, the GPU-time median; the batch-1 step."""
    base = results["current"]
    lines = []
    med = {}
    for name, runs in results.items():
        same = all(r["digests"] == base[0]["digests"] for r in runs)
        cells = []
        for b in batch.split(","):
            walls = [r["llama"]["rates"][b][0] for r in runs]
            gpus = [r["llama"]["rates"][b][1] for r in runs if r["llama"]["rates"][b][1]]
            med[name, b] = statistics.median(walls)
            ratio = med[name, b] / med["current", b]
            gpu = f"{statistics.median(gpus):,.0f}" if gpus else "-"
            cells.append(f"b{b}: {' '.join(f'{w:,.0f}' for w in walls)} (median {med[name, b]:,.0f}, "
                         f"x{ratio:.3f}; GPU {gpu})")
        steps = [r["llama"]["step_us"] for r in runs if r["llama"]["step_us"]]
        step = f"step {statistics.median(steps):.0f} us" if steps else ""
        lines.append(f"{name:8s} {'same bits' if same else 'OUTPUT DIFFERS'}  " + "  ".join(cells) + f"  {step}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="8,16,32,0", help="MB of weights the grid prefetches (0: whole slices)")
    p.add_argument("--batch", default="1,16", help="llama batch sizes")
    p.add_argument("--rounds", type=int, default=2, help="times the whole list of variants runs")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # a child: measure and print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps({"digests": digests(), "llama": llama(args.batch)}))
        return 0
    source = (ROOT / "cuda" / SOURCE).read_text()
    variants = {"current": (None, [])}
    variants.update({f"l2-{b}": (edited(source, int(b)), []) for b in args.budgets.split(",") if b})
    base = [sys.executable, __file__, "--one", "--batch", args.batch]
    results = source_variants.run(base, SOURCE, variants, args.rounds)
    print(f"quick_decode with a bulk L2 prefetch before pdl_wait (l2-MB; 0 = whole slices); Llama-2-7B, auto, "
          f"decode tok/s wall per round ({args.rounds} rounds, variants in order each round)")
    print(table(results, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())

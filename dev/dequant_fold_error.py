"""How exact is each way of turning a 4-bit code into a weight in fp16 registers?

The kernels convert 8 codes of a word with the magic number: OR-ing nibble n into the mantissa of
fp16 1024 gives 1024 + n exactly (or 1024 + 16 n for the word's upper nibbles), one ``lop3`` a
pair. Then, per pair:

- ``sub then mul`` (quick_gemm, quick_sm90): h - (1024 + z) is the exact integer n - z, and one
  multiply by the fp16 scale rounds (n - z) s once; 3 instructions a pair with the ``lop3``
  (the upper nibbles: one ``fma(h, 1/16, -(64 + z))``, exact too, then the multiply).
- ``one fma``: fma(h, s, c) with c = -(1024 + z) s precomputed per group, which would fold the
  magic number's offset, the zero and the scale into one instruction (2 a pair). In fp16 c is
  rounded to 11 bits of a value near 1024 s, so it carries up to half a quantization step of error
  before the fma adds anything; the upper nibbles' fma(h, s / 16, -(64 + z) s) likewise, with
  s / 16 subnormal for small scales. An exact fold needs the small integer n first (the magic
  number's subtraction): lop3, sub, then fma(n, s, -z s), 3 a pair again.
- quick_decode keeps n - z exact (2 instructions a pair) and scales the fp32 sums of each group.

Prints the error of each against the float64 (n - z) s, in units of the scale, over random fp16
scales of 1e-4 ... 2e-1 and all codes and zeros. No GPU needed::

    python dev/dequant_fold_error.py [--samples 1000000]
"""
import argparse

import numpy as np


def fp16(v: np.ndarray) -> np.ndarray:
    """v rounded to fp16 (round to nearest even), back in float64."""
    return v.astype(np.float16).astype(np.float64)


def errors(samples: int, seed: int = 0) -> dict:
    """{way: (max, mean) of |weight - (n - z) s| / s} for ``samples`` random (code, zero, scale)."""
    rng = np.random.default_rng(seed)
    s = fp16(rng.uniform(1, 2, samples) * 10.0 ** rng.uniform(-4, -1, samples))
    z = rng.integers(0, 16, samples).astype(np.float64)
    n = rng.integers(0, 16, samples).astype(np.float64)
    exact = (n - z) * s
    ways = {
        "sub then mul (lower nibbles)": fp16((fp16(1024 + n) - fp16(1024 + z)) * s),
        "fma then mul (upper nibbles)": fp16(fp16(fp16(1024 + 16 * n) / 16 - fp16(64 + z)) * s),
        "one fma, lower: fma(h, s, -(1024 + z) s)": fp16((1024 + n) * s + fp16(-(1024 + z) * s)),
        "one fma, upper: fma(h, s / 16, -(64 + z) s)": fp16((1024 + 16 * n) * fp16(s / 16) + fp16(-(64 + z) * s)),
    }
    return {k: (float(np.max(np.abs(v - exact) / s)), float(np.mean(np.abs(v - exact) / s))) for k, v in ways.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1_000_000)
    args = p.parse_args(argv)
    print(f"|weight - (n - z) s| / s over {args.samples:,} random (code n, zero z, fp16 scale s of 1e-4 ... 2e-1)")
    for way, (mx, mean) in errors(args.samples).items():
        print(f"  {way:46s} max {mx:.4f}  mean {mean:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

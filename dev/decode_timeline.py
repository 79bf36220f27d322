"""Kernel-by-kernel timeline of one batch-1 decode step of a 7B-shaped Llama stack (CUDA graph replay).

Run under Nsight Systems, with graph nodes traced one by one, then summarize its GPU trace:

    nsys profile --cuda-graph-trace=node -o step python dev/decode_timeline.py [--layers 2] [--batch 1]
    nsys stats --report cuda_gpu_trace --format csv --output step step.nsys-rep
    python dev/decode_timeline.py --summarize step_cuda_gpu_trace.csv

The model is ``LlamaModel(config, layers, "auto", head=...)`` with random weights (one layer's copied
to every layer), a vocabulary of 32000 and 128 cached positions; the replays run after 5 warm-up
steps. ``QUICKCUPY_PDL=0`` in the environment captures the step without programmatic dependent
launch, so the same file gives the timeline before and after it. The summary lists the last replay's
kernels in order: start (us from the step's first kernel), duration, and the gap after the previous
kernel's end (negative: the kernels overlapped).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's quickcupy


def run(layers: int, batch: int, replays: int) -> None:
    import cupy
    import numpy as np

    from quickcupy.llama import LlamaConfig, LlamaModel, random_head, random_layers

    config = LlamaConfig.preset("7b").replace(num_hidden_layers=layers)
    layer = random_layers(config.replace(num_hidden_layers=1), seed=0)[0].quantized(128)
    head = random_head(config, 32000, seed=1)
    head.lm_head = head.lm_head.astype(np.float16)
    model = LlamaModel(config, [layer] * layers, "auto", 128, head=head)
    cache = model.new_cache(batch, 256)
    ids = cupy.asarray(np.random.default_rng(0).integers(0, 32000, (batch, 128)))
    tok = model._sample(model.prefill(ids, cache, graph=True), 0, None, None)
    for _ in range(5 + replays):
        tok = model._sample(model.decode_step(tok, cache, graph=True), 0, None, None)
    cupy.cuda.Device().synchronize()


def summarize(path: str) -> str:
    """The last decode step's kernels from an ``nsys stats --report cuda_gpu_trace`` CSV."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            name = r.get("Name", "")
            if "Start (ns)" in r and r.get("Duration (ns)") and "[CUDA mem" not in name:
                rows.append((int(r["Start (ns)"]), int(r["Duration (ns)"]), name))
    rows.sort()
    # A step begins with the embedding gather (CuPy's take) and ends with the position's advance.
    ends = [i for i, r in enumerate(rows) if "advance_position" in r[2]]
    if len(ends) < 2:
        raise SystemExit(f"{path}: fewer than two decode steps (no advance_position kernels)")
    step = rows[ends[-2] + 1:ends[-1] + 1]
    t0 = step[0][0]
    lines = [f"{'start us':>9} {'dur us':>7} {'gap us':>7}  kernel"]
    prev_end = None
    busy = 0
    for start, dur, name in step:
        gap = "" if prev_end is None else f"{(start - prev_end) / 1e3:7.2f}"
        lines.append(f"{(start - t0) / 1e3:9.2f} {dur / 1e3:7.2f} {gap:>7}  {name[:90]}")
        prev_end = max(prev_end or 0, start + dur)
        busy += dur
    span = prev_end - t0
    lines.append(f"step: {len(step)} kernels, {span / 1e3:.1f} us from the first start to the last end, "
                 f"{busy / 1e3:.1f} us of kernel time summed")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--replays", type=int, default=3)
    p.add_argument("--summarize", metavar="CSV", help="print the last step's kernels from an nsys GPU trace")
    args = p.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
    else:
        run(args.layers, args.batch, args.replays)
    return 0


if __name__ == "__main__":
    sys.exit(main())

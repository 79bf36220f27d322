"""Kernel-by-kernel timeline of one batch-1 decode step of a 7B-shaped Llama stack (CUDA graph replay).

Records the GPU activity of a few replays through CUPTI, by way of PyTorch's profiler (the GPU
machine has torch; quickcupy does not need it), writes it as a Chrome trace and prints the last
replay's kernels in order: start (us from the step's first kernel), duration, and the gap after the
previous kernel's end (negative: the kernels overlapped). From the checkout, on a GPU:

    python dev/decode_timeline.py [--layers 2] [--batch 1] [--trace step.json]

The model is ``LlamaModel(config, layers, "auto", head=...)`` with random weights (one layer's copied
to every layer), a vocabulary of 32000 and 128 cached positions; the replays run after 5 warm-up
steps. ``QUICKCUPY_PDL=0`` in the environment captures the step without programmatic dependent
launch, so the same file gives the timeline before and after it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's quickcupy


def run(layers: int, batch: int, replays: int, trace: str | None) -> str:
    import cupy
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from quickcupy.llama import LlamaConfig, LlamaModel, random_head, random_layers

    config = LlamaConfig.preset("7b").replace(num_hidden_layers=layers)
    layer = random_layers(config.replace(num_hidden_layers=1), seed=0)[0].quantized(128)
    head = random_head(config, 32000, seed=1)
    head.lm_head = head.lm_head.astype(np.float16)
    model = LlamaModel(config, [layer] * layers, "auto", 128, head=head)
    cache = model.new_cache(batch, 256)
    ids = cupy.asarray(np.random.default_rng(0).integers(0, 32000, (batch, 128)))
    tok = model._sample(model.prefill(ids, cache, graph=True), 0, None, None)
    for _ in range(5):
        tok = model._sample(model.decode_step(tok, cache, graph=True), 0, None, None)
    cupy.cuda.Device().synchronize()
    torch.cuda.init()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            tok = model._sample(model.decode_step(tok, cache, graph=True), 0, None, None)
        cupy.cuda.Device().synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name
                     and "Memset" not in e.name)
    return summarize([(int(1000 * a), int(1000 * (b - a)), name) for a, b, name in kernels])


def summarize(rows: list) -> str:
    """The last decode step of ``rows`` (start ns, duration ns, kernel name), sorted by start: from
    the kernel after the second-to-last ``advance_position`` (a step's last node) to the last one."""
    ends = [i for i, r in enumerate(rows) if "advance_position" in r[2]]
    if len(ends) < 2:
        raise SystemExit("fewer than two decode steps traced (no advance_position kernels)")
    step = rows[ends[-2] + 1:ends[-1] + 1]
    t0 = step[0][0]
    lines = [f"{'start us':>9} {'dur us':>7} {'gap us':>7}  kernel"]
    prev_end, busy = None, 0
    for start, dur, name in step:
        gap = "" if prev_end is None else f"{(start - prev_end) / 1e3:7.2f}"
        lines.append(f"{(start - t0) / 1e3:9.2f} {dur / 1e3:7.2f} {gap:>7}  {name[:90]}")
        prev_end = max(prev_end or 0, start + dur)
        busy += dur
    lines.append(f"step: {len(step)} kernels, {(prev_end - t0) / 1e3:.1f} us from the first start to the last "
                 f"end, {busy / 1e3:.1f} us of kernel time summed")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--replays", type=int, default=3)
    p.add_argument("--trace", metavar="PATH", help="also write the Chrome trace (JSON) to PATH")
    args = p.parse_args()
    print(run(args.layers, args.batch, args.replays, args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())

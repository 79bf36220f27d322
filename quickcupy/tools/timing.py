"""GPU timing without the host's launch overhead.

CUDA events bracket the work; the work is queued behind a spin kernel that keeps the stream busy
while Python launches it, so the events measure the GPU's time, not the interpreter's. This is the
time a runtime without per-launch overhead (C++, CUDA graphs) would see.
"""
from __future__ import annotations

import time

import numpy as np

from ..kernels import get_function

MAX_SPIN_S = 0.2           # longest wait queued ahead of a batch of timed calls


def spin(seconds: float):
    """Keeps the current stream busy for ``seconds`` (cuda/spin.cu) so that the calls queued after
    it run back to back."""
    import cupy
    fn = get_function(cupy.cuda.Device().id, "spin.cu", "quickcupy_spin")
    fn((1,), (1,), (np.uint64(int(seconds * 1e9)),))


def rotating(call, items):
    """A no-argument function that calls ``call(item)`` with the next of ``items`` each time
    (benchmarks rotate weights this way so each call reads its own from DRAM)."""
    state = {"i": 0}

    def fn():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return call(item)
    return fn


def _behind_spin(enqueue, host_s: float, last, queue_ahead: bool = True):
    """Runs ``enqueue()`` (work on the current stream that records the event ``last`` at its end),
    with ``queue_ahead`` queued behind a spin of about twice ``host_s``, and waits for ``last``. If
    the spin ended before the host had enqueued everything (the host fell behind), runs it once more
    behind a spin sized from the measured enqueue time."""
    import cupy
    stream = cupy.cuda.get_current_stream()
    for _ in range(2 if queue_ahead else 1):
        spin_end = None
        if queue_ahead:
            spin(min(MAX_SPIN_S, 2.0 * host_s + 50e-6))
            spin_end = cupy.cuda.Event()
            spin_end.record(stream)
        t0 = time.perf_counter()
        enqueue()
        host_s = time.perf_counter() - t0
        ahead = spin_end is None or not spin_end.done
        last.synchronize()
        if ahead:
            return


def time_gpu_samples(fn, warmup: int = 10, repeats: int = 50,
                     queue_ahead: bool = True) -> np.ndarray:
    """Seconds of GPU time of each of ``repeats`` calls of ``fn()`` (work on the current stream).

    CUDA events bracket each call. With ``queue_ahead`` the timed calls are queued behind a spin
    kernel long enough for the host to enqueue them all, so host launch overhead is not measured;
    if the spin ended before the host was done (the host fell behind), the pass runs again once
    with a spin sized from the measured enqueue time.
    """
    import cupy
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    stream = cupy.cuda.get_current_stream()
    fn()                                   # first call: compiles, allocates
    stream.synchronize()
    t0 = time.perf_counter()
    for _ in range(max(1, warmup - 1)):
        fn()
    host_s = (time.perf_counter() - t0) / max(1, warmup - 1) * repeats
    stream.synchronize()
    starts = [cupy.cuda.Event() for _ in range(repeats)]
    ends = [cupy.cuda.Event() for _ in range(repeats)]

    def enqueue():
        for start, end in zip(starts, ends):
            start.record(stream)
            fn()
            end.record(stream)
    _behind_spin(enqueue, host_s, ends[-1], queue_ahead)
    return np.array([cupy.cuda.get_elapsed_time(s, e) * 1e-3 for s, e in zip(starts, ends)])


def time_gpu_stream(fn, calls: int = 50) -> float:
    """GPU seconds per call when ``calls`` calls of ``fn()`` run back to back between ONE event
    pair, queued behind a spin kernel (as in a CUDA graph of many layers: each call still pays the
    gap between two kernels, not an event pair's). Call after :func:`time_gpu_samples` (warm).
    If the host fell behind the spin, the pass runs once more with a longer spin."""
    import cupy
    if calls < 1:
        raise ValueError(f"calls={calls} must be >= 1")
    stream = cupy.cuda.get_current_stream()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()

    def enqueue():
        start.record(stream)
        for _ in range(calls):
            fn()
        end.record(stream)
    _behind_spin(enqueue, 2e-5 * calls, end)
    return cupy.cuda.get_elapsed_time(start, end) * 1e-3 / calls


def time_gpu_graph(fn, calls: int = 50):
    """GPU seconds per call when ``calls`` calls of ``fn()`` are captured once as a CUDA graph (on
    a side stream; with programmatic dependent launch where the kernels take it, see
    :func:`quickcupy.kernels.pdl_active`) and the graph replays, as a decode step's layers run.
    None when ``fn`` cannot be captured (cuBLAS through CuPy). Call warm."""
    import cupy
    if calls < 1:
        raise ValueError(f"calls={calls} must be >= 1")
    cupy.cuda.get_current_stream().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            for _ in range(calls):
                fn()
        except Exception:
            stream.end_capture()
            return None
        graph = stream.end_capture()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        graph.launch(stream)                  # the first replay uploads the graph
        start.record(stream)
        graph.launch(stream)
        end.record(stream)
        end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) * 1e-3 / calls


def time_gpu(fn, warmup: int = 10, repeats: int = 50, queue_ahead: bool = True) -> float:
    """Median GPU seconds of one call of ``fn()``; see :func:`time_gpu_samples`."""
    return float(np.median(time_gpu_samples(fn, warmup, repeats, queue_ahead)))


def gpu_seconds_behind_spin(fn, host_s_estimate: float):
    """GPU seconds of ONE call of ``fn()`` queued behind a spin of about twice ``host_s_estimate``.

    Returns (gpu seconds, host seconds it took to launch, whether the spin outlasted the launch:
    False means the GPU may have waited for the host and the time is an upper bound)."""
    import cupy
    stream = cupy.cuda.get_current_stream()
    spin(2.0 * host_s_estimate + 50e-6)
    spin_end, start, end = cupy.cuda.Event(), cupy.cuda.Event(), cupy.cuda.Event()
    spin_end.record(stream)
    t0 = time.perf_counter()
    start.record(stream)
    fn()
    end.record(stream)
    host_s = time.perf_counter() - t0
    ahead = not spin_end.done
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) * 1e-3, host_s, ahead

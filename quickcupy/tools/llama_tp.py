"""``python -m quickcupy llama --tp N``: the whole Llama model split over N GPUs (tensor
parallelism, :mod:`quickcupy.llama.parallel`), one process per GPU, joined by NCCL
(:mod:`quickcupy.distributed`).

The launcher checks the GPUs and NCCL, makes the NCCL unique id and spawns N processes; rank r
drives GPU r. Every rank draws the same random weights (same seed) and keeps its slice, then runs
what ``--vocab`` runs on one GPU (:func:`quickcupy.tools.llama_bench.run_model`): prefill and
greedy decode per backend and batch, decode steps as CUDA graph replays on the 4-bit backends with
the all-reduces inside the graph. Rank 0 prints the report, with a batch-1 decode step's time per
layer split into GEMMs, all-reduces (a graph of the step's all-reduces alone) and the rest.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import sys

import numpy as np

from .. import device as _device
from ..distributed import Communicator, NcclUnavailable, unique_id
from ..llama.model import QUANTIZED_BACKENDS, LlamaConfig
from ..llama.parallel import rank_model, shard_config
from .common import Progress, UsageError, write_json
from .llama_bench import (_describe, _format_model_report, _non_gemm_us_per_layer, _repeat_layer, _time_generation,
                          backend_weights, random_model_weights)
from .timing import gpu_seconds_behind_spin


def visible_gpus() -> int:
    """CUDA devices this process may use (0 without a usable GPU)."""
    if _device.no_gpu_reason() is not None:
        return 0
    import cupy
    return cupy.cuda.runtime.getDeviceCount()


def run(s) -> int:
    """Checks the GPUs and NCCL, then :func:`launch` of ``s.tp`` ranks."""
    n = s.tp
    reason = _device.no_gpu_reason()
    if reason is not None:
        raise UsageError(f"--tp {n} runs one process per GPU: {reason}")
    count = visible_gpus()
    if count < n:
        where = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UsageError(f"--tp {n} needs {n} GPUs, {count} visible"
                         + (f" (CUDA_VISIBLE_DEVICES={where})" if where is not None else ""))
    try:
        uid = unique_id()
    except NcclUnavailable as exc:
        raise UsageError(f"--tp: {exc}") from None
    return launch(s, n, uid)


def launch(s, world: int, uid: bytes) -> int:
    """Spawns ``world`` processes running :func:`_worker` and waits for them. If one fails, the
    others (which would wait for it in NCCL for ever) are stopped. Returns 0, or 1 after a failure."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(rank, world, uid, s), name=f"quickcupy llama rank {rank}")
             for rank in range(world)]
    for p in procs:
        p.start()
    failed = None
    try:
        running = list(procs)
        while running and failed is None:
            multiprocessing.connection.wait([p.sentinel for p in running])
            for p in list(running):
                if p.exitcode is not None:
                    running.remove(p)
                    if p.exitcode != 0 and failed is None:
                        failed = p
    finally:
        for p in procs:              # after a failure or an interrupt: the ranks still waiting
            if p.exitcode is None:
                p.terminate()
        for p in procs:
            p.join()
    if failed is not None:
        print(f"python -m quickcupy llama: error: {failed.name} exited with status {failed.exitcode} (its "
              f"traceback is above); the other ranks were stopped", file=sys.stderr)
        return 1
    return 0


def _worker(rank: int, world: int, uid: bytes, s):
    """One rank: GPU ``rank``, its NCCL communicator, its slice of the model, the timings."""
    import cupy
    cupy.cuda.Device(rank).use()
    with Communicator(rank, world, uid, device=rank) as comm:
        report = _run_rank(comm, s)
    if rank == 0:
        print(_format_model_report(report))
        print(format_tp(report))
        if s.json:
            write_json(s.json, report, indent=2)


def _run_rank(comm, s) -> dict:
    """The body of :func:`quickcupy.tools.llama_bench.run_model` on one rank's slice."""
    import cupy
    world = comm.world
    progress = Progress("llama", enabled=comm.rank == 0, log_steps=False)
    preset = LlamaConfig.preset(s.preset)
    config = preset.replace(num_hidden_layers=s.layers or preset.num_hidden_layers)
    shard = shard_config(config, world)
    progress.note(f"random weights: one layer of {_describe(config)}, copied to {config.num_hidden_layers} layers; "
                  f"vocab {s.vocab}; split over {world} GPUs ({_describe(shard)} per rank)")
    layer, head, group_size = random_model_weights(config, s)     # the same on every rank
    results, overhead = [], {}
    for backend, weights in backend_weights(s.backends, layer, group_size, progress):
        progress.note(f"[{backend}] building {config.num_hidden_layers} blocks (rank slices)")
        model = rank_model(config.replace(num_hidden_layers=1), [weights], comm, backend, group_size, head, s.dtype)
        model = _repeat_layer(model, config.num_hidden_layers)
        for batch in s.batches:
            comm.barrier()
            results.append(_time_generation(model, backend, batch, s, progress))
        if backend in QUANTIZED_BACKENDS:
            progress.note(f"[{backend}] non-GEMM and all-reduce time per layer")
            comm.barrier()
            overhead[backend] = _non_gemm_us_per_layer(model, s)
            overhead[backend]["all_reduce_us_per_layer"] = all_reduce_us_per_layer(comm, model)
        del model
        cupy.get_default_memory_pool().free_all_blocks()
    progress.close()
    return {"command": s.command, "versions": _device.versions(), "device": _device.device_info(comm.rank),
            "config": config.to_dict(), "tp": world, "nccl_version": comm.nccl_version,
            "shard": {"num_attention_heads": shard.num_attention_heads,
                      "num_key_value_heads": shard.num_key_value_heads,
                      "intermediate_size": shard.intermediate_size, "vocab": s.vocab // world},
            "vocab": s.vocab, "group_size": group_size, "prompt": s.prompt, "gen": s.gen, "dtype": s.dtype,
            "source": f"random weights (seed {s.seed}), one layer's copied to every layer, split over {world} GPUs",
            "generation": results, "decode_step_batch1": overhead}


def all_reduce_us_per_layer(comm, model, repeats: int = 5) -> float:
    """GPU microseconds per layer of a batch-1 decode step's all-reduces alone: a CUDA graph of
    2 x layers all-reduces of (1, 1, hidden) in the model's dtype (as o_proj and down_proj give
    them), replayed behind a spin kernel after a barrier; the median of ``repeats``."""
    import cupy
    layers = model.config.num_hidden_layers
    buf = cupy.zeros((1, 1, model.config.hidden_size), model.dtype)
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.get_current_stream().synchronize()   # buf's zeros land before the side stream reads them
    with stream:
        comm.all_reduce(buf)               # NCCL sets up its connections eagerly, not under capture
        stream.synchronize()
        stream.begin_capture()
        try:
            for _ in range(2 * layers):
                comm.all_reduce(buf)
        finally:
            graph = stream.end_capture()
    times = []
    for _ in range(repeats):
        comm.barrier()
        seconds, _, _ = gpu_seconds_behind_spin(lambda: graph.launch(cupy.cuda.get_current_stream()), 1e-4)
        times.append(seconds)
    return 1e6 * float(np.median(times)) / layers


def _nccl_text(version: int) -> str:
    return f"{version // 10000}.{version // 100 % 100}.{version % 100}"


def format_tp(r: dict) -> str:
    """The lines a --tp report adds to the whole-model report: the split, and per 4-bit backend
    the batch-1 decode step's time per layer in GEMMs, all-reduces and the rest."""
    sh = r["shard"]
    lines = [f"tensor parallel: {r['tp']} GPUs, one process each, NCCL {_nccl_text(r['nccl_version'])}; each rank "
             f"holds {sh['num_attention_heads']} heads / {sh['num_key_value_heads']} KV heads, intermediate "
             f"{sh['intermediate_size']}, {sh['vocab']} LM-head rows; 2 all-reduces per layer (o_proj, down_proj "
             f"outputs) and 1 all-gather of the logits per step; times are rank 0's"]
    for backend, o in r["decode_step_batch1"].items():
        other = o["non_gemm_us_per_layer"] - o["all_reduce_us_per_layer"]
        lines.append(f"[{backend}] batch-1 decode step per layer: GEMMs {o['gemm_us_per_layer']:.1f} us, "
                     f"all-reduces {o['all_reduce_us_per_layer']:.1f} us (2, timed alone in a graph), "
                     f"other {other:.1f} us")
    return "\n".join(lines)

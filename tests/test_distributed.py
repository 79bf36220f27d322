"""quickcupy.distributed: the emulated group (rank order, one rank at a time, mismatches caught) on
NumPy; NCCL's absence named with its extra; on a GPU, a one-rank NCCL communicator, eagerly and
inside a captured CUDA graph."""
import threading

import numpy as np
import pytest

from quickcupy.distributed import NCCL_EXTRAS, Communicator, LocalGroup, NcclUnavailable, load_nccl

DTYPES = ["float16", "bfloat16"]


def _np_dtype(dtype):
    from quickcupy.dtypes import np_dtype
    return np_dtype(dtype)


# -------------------------------------------------------------------------------- emulated group
def test_all_reduce_sums_in_rank_order_rounding_each_add():
    """((2048 + 1) + 1) in float16 is 2048 (each add rounds to even), 2048 + (1 + 1) is 2050: the
    result says the order. Every rank gets the sum in its own array."""
    group = LocalGroup(3)
    xs = [np.full(4, v, np.float16) for v in (2048, 1, 1)]
    out = group.run(lambda r: group.communicator(r).all_reduce(xs[r]))
    for r in range(3):
        assert out[r] is xs[r]
        np.testing.assert_array_equal(xs[r], np.full(4, 2048, np.float16))


def test_all_reduce_float32_equals_the_sum(rng):
    group = LocalGroup(2)
    xs = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2)]
    expected = xs[0] + xs[1]
    group.run(lambda r: group.communicator(r).all_reduce(xs[r]))
    for x in xs:
        np.testing.assert_array_equal(x, expected)


def test_all_gather_stacks_by_rank(rng):
    group = LocalGroup(4)
    xs = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(4)]
    out = group.run(lambda r: group.communicator(r).all_gather(xs[r]))
    for r in range(4):
        assert out[r].shape == (4, 2, 3)
        np.testing.assert_array_equal(out[r], np.stack(xs))
    assert out[0] is not out[1]                 # each rank owns its result


def test_ranks_run_one_at_a_time_in_rank_order():
    """Between two collectives only one rank runs, rank 0 first."""
    group, log, running = LocalGroup(3), [], []
    lock = threading.Lock()

    def fn(rank):
        comm = group.communicator(rank)
        for step in range(3):
            with lock:
                running.append(rank)
                assert len(running) == 1, running
            log.append((step, rank))
            with lock:
                running.remove(rank)
            comm.all_reduce(np.zeros(1, np.float32))
        return rank
    assert group.run(fn) == [0, 1, 2]
    assert log == [(s, r) for s in range(3) for r in range(3)]


def test_a_rank_error_reaches_the_caller_and_stops_the_others():
    group = LocalGroup(2)

    def fn(rank):
        comm = group.communicator(rank)
        comm.all_reduce(np.zeros(1, np.float32))
        if rank == 1:
            raise KeyError("rank 1 broke")
        comm.all_reduce(np.zeros(1, np.float32))
    with pytest.raises(KeyError, match="rank 1 broke"):
        group.run(fn)


@pytest.mark.parametrize("case", ["count", "kind", "shape"])
def test_mismatched_collectives_are_refused(case):
    group = LocalGroup(2)

    def fn(rank):
        comm = group.communicator(rank)
        x = np.zeros(2 if case == "shape" and rank else 1, np.float32)
        if case == "kind" and rank:
            comm.all_gather(x)
        elif not (case == "count" and rank):
            comm.all_reduce(x)
    with pytest.raises(RuntimeError, match="different collectives"):
        group.run(fn)


def test_group_arguments_are_checked():
    with pytest.raises(ValueError, match="rank=0 must lie in 0..world-1 for world=0"):
        LocalGroup(0)
    with pytest.raises(ValueError, match="rank=2 must lie in 0..world-1 for world=2"):
        LocalGroup(2).communicator(2)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        LocalGroup(1).communicator(0).all_reduce(np.zeros((4, 4), np.float32).T)


# ------------------------------------------------------------------------------------------ NCCL
def _nccl_or_none():
    pytest.importorskip("cupy")
    try:
        return load_nccl()
    except NcclUnavailable:
        return None


def test_missing_nccl_names_the_extra():
    if _nccl_or_none() is not None:
        pytest.skip("NCCL loads here")
    from quickcupy._cupy import installed_wheels
    extras = [NCCL_EXTRAS[w][0] for w in installed_wheels() if w in NCCL_EXTRAS] or ["nccl13", "nccl12"]
    with pytest.raises(NcclUnavailable, match="NCCL could not be loaded") as info:
        load_nccl()
    assert all(f",{e}]" in str(info.value) for e in extras), str(info.value)
    with pytest.raises(ValueError, match="rank=1 must lie in 0..world-1 for world=1"):
        Communicator(1, 1, b"")                  # the arguments are checked before NCCL is needed


def _communicator():
    nccl = _nccl_or_none()
    if nccl is None:
        pytest.skip("NCCL does not load here (pip install the nccl13 / nccl12 extra)")
    return Communicator(0, 1, nccl.get_unique_id(), device=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_nccl_one_rank_eager(rng, dtype):
    import cupy
    nd = _np_dtype(dtype)
    with _communicator() as comm:
        assert (comm.rank, comm.world, comm.device) == (0, 1, 0) and comm.nccl_version > 20000
        host = rng.standard_normal((3, 5, 64)).astype(np.float32).astype(nd)
        x = cupy.asarray(host)
        assert comm.all_reduce(x) is x                    # one rank: the sum is x itself
        np.testing.assert_array_equal(x.get(), host)
        g = comm.all_gather(x)
        assert g.shape == (1, 3, 5, 64) and g.dtype == nd
        np.testing.assert_array_equal(g.get()[0], host)
        comm.barrier()
        with pytest.raises(ValueError, match="C-contiguous"):
            comm.all_reduce(x[:, :, ::2])
        with pytest.raises(ValueError, match="NCCL collectives here take float16, bfloat16, float32 arrays, got int32"):
            comm.all_reduce(cupy.zeros(4, np.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_nccl_one_rank_in_a_captured_graph(rng, dtype):
    """The collectives queue on the current stream, so a capture holds them: replays after the
    source changes give the new values."""
    import cupy
    nd = _np_dtype(dtype)
    with _communicator() as comm:
        src = cupy.asarray(rng.standard_normal((2, 256)).astype(np.float32).astype(nd))
        # Its own stream and memory pool, as DecodeGraph: no later allocation takes the graph's memory.
        stream, pool = cupy.cuda.Stream(non_blocking=True), cupy.cuda.MemoryPool()
        cupy.cuda.get_current_stream().synchronize()       # src is ready before the side stream reads it
        with cupy.cuda.using_allocator(pool.malloc), stream:
            comm.all_reduce(src.copy())            # NCCL connects eagerly first
            stream.synchronize()
            stream.begin_capture()
            try:
                y = src.astype(np.float32).astype(nd)
                comm.all_reduce(y)
                gathered = comm.all_gather(y)
            finally:
                graph = stream.end_capture()
        with stream:
            for _ in range(3):
                host = rng.standard_normal((2, 256)).astype(np.float32).astype(nd)
                src[...] = cupy.asarray(host)
                gathered[...] = cupy.full(gathered.shape, np.nan, np.float32).astype(nd)
                graph.launch(stream)
                stream.synchronize()
                np.testing.assert_array_equal(gathered.get()[0], host)

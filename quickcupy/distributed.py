"""Collectives for tensor parallelism: the sum (all-reduce) and the concatenation (all-gather) of
the ranks' partial results, behind one small interface that :mod:`quickcupy.llama.parallel` uses.

Two groups implement it:

- :class:`Communicator`: NCCL through CuPy (``cupy.cuda.nccl``), one process per GPU. Every call
  is queued on the current CuPy stream, so inside a stream capture (the Llama decode graph) the
  NCCL kernels become nodes of the graph. float16, bfloat16 and float32 arrays.
- :class:`LocalGroup`: ``world`` ranks emulated in one process, without NCCL (tests, a CPU). Each
  rank runs in its own thread, one at a time, in rank order from one collective to the next; the
  last rank to arrive sums the partials in rank order. On NumPy or on one GPU.

A communicator ``comm`` of either kind has ``comm.rank``, ``comm.world`` and::

    comm.all_reduce(x)   # x (...) C-contiguous, summed over the ranks in place; returns x
    comm.all_gather(x)   # x (...) C-contiguous -> (world, ...): rank r's x at [r], on every rank

NCCL comes from NVIDIA's wheel through the extra of the CUDA major (``quickcupy[cuda13,nccl13]``
or ``[cuda12,nccl12]``): CuPy loads ``nvidia/nccl/lib/libnccl.so.2`` from the installed
``nvidia-nccl-cu13`` (``-cu12``) distribution, else the system's ``libnccl.so.2``. Nothing here
imports CuPy until a :class:`Communicator` is made.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np

from ._cupy import WHEELS, installed_wheels

# The NCCL extra of each CuPy wheel's CUDA major (setup.cfg), and the NVIDIA wheel it installs.
NCCL_EXTRAS = {"cupy-cuda13x": ("nccl13", "nvidia-nccl-cu13"), "cupy-cuda12x": ("nccl12", "nvidia-nccl-cu12")}
# ncclDataType_t of the dtypes the collectives take (CuPy names NCCL_BFLOAT16 from NCCL 2.10 on).
NCCL_DTYPES = {"float16": "NCCL_FLOAT16", "bfloat16": "NCCL_BFLOAT16", "float32": "NCCL_FLOAT32"}
NCCL_BFLOAT16 = 9


class NcclUnavailable(RuntimeError):
    """NCCL cannot be loaded: the message names the extra that installs it."""


def load_nccl():
    """``cupy.cuda.nccl`` with its library loaded; :class:`NcclUnavailable` naming the extra otherwise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # CuPy warns when the library is missing; the error says it
        from cupy.cuda import nccl
    if nccl.available:
        return nccl
    try:                                        # the import CuPy tried: its error says why it failed
        import cupy_backends.cuda.libs.nccl  # noqa: F401
        reason = "unknown reason"
    except ImportError as exc:
        reason = str(exc)
    wheels = [w for w in installed_wheels() if w in NCCL_EXTRAS] or list(NCCL_EXTRAS)
    how = " or ".join(f'pip install "quickcupy[{WHEELS[w]},{NCCL_EXTRAS[w][0]}]" ({NCCL_EXTRAS[w][1]})'
                      for w in wheels)
    raise NcclUnavailable(f"NCCL could not be loaded ({reason}); tensor parallelism needs NVIDIA's NCCL "
                          f"wheel: {how}")


def unique_id() -> bytes:
    """A new NCCL unique id (128 bytes) for :class:`Communicator`: made by one process (the
    launcher) and handed to every rank."""
    return load_nccl().get_unique_id()


def _nccl_dtype(nccl, dtype) -> int:
    name = np.dtype(dtype).name
    if name not in NCCL_DTYPES:
        raise ValueError(f"NCCL collectives here take {', '.join(NCCL_DTYPES)} arrays, got {name}")
    return getattr(nccl, NCCL_DTYPES[name], NCCL_BFLOAT16)     # only NCCL_BFLOAT16 may be missing


class Communicator:
    """One rank of an NCCL group: this process drives GPU ``device`` (default: ``rank``).

    All ``world`` processes construct it with the same ``unique_id`` (:func:`unique_id`); the
    constructor returns once every rank has joined. Collectives run on the current CuPy stream.
    """

    def __init__(self, rank: int, world: int, unique_id: bytes, device: int | None = None):
        _check_rank(rank, world)
        import cupy
        self._nccl = load_nccl()
        self.rank, self.world = int(rank), int(world)
        self.device = self.rank if device is None else int(device)
        cupy.cuda.Device(self.device).use()          # NCCL binds the communicator to the current device
        self._comm = self._nccl.NcclCommunicator(self.world, unique_id, self.rank)
        self._flag = cupy.zeros(1, np.float32)

    @property
    def nccl_version(self) -> int:
        return self._nccl.get_version()

    def _args(self, name: str, x):
        if x.device.id != self.device:
            raise ValueError(f"{name} is on device {x.device.id}, this rank's communicator on {self.device}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        import cupy
        return _nccl_dtype(self._nccl, x.dtype), cupy.cuda.get_current_stream().ptr

    def all_reduce(self, x):
        """x summed over the ranks, in place (NCCL's sum: each add rounded to x's dtype); returns x."""
        dtype, stream = self._args("x", x)
        self._comm.allReduce(x.data.ptr, x.data.ptr, x.size, dtype, self._nccl.NCCL_SUM, stream)
        return x

    def all_gather(self, x):
        """(world, *x.shape) of x's dtype, a new array: rank r's x at [r]."""
        import cupy
        dtype, stream = self._args("x", x)
        out = cupy.empty((self.world,) + x.shape, x.dtype)
        self._comm.allGather(x.data.ptr, out.data.ptr, x.size, dtype, stream)
        return out

    def barrier(self):
        """Returns when every rank has called it and this rank's current stream is idle."""
        import cupy
        self.all_reduce(self._flag)
        cupy.cuda.get_current_stream().synchronize()

    def close(self):
        if self._comm is not None:
            self._comm.destroy()
            self._comm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_rank(rank, world):
    for name, value in (("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank} must lie in 0..world-1 for world={world} >= 1")


# ------------------------------------------------------------------------------ emulated group
class _Aborted(Exception):
    """Another rank failed: this rank's thread stops."""


class LocalGroup:
    """``world`` ranks emulated in one process: :meth:`run` calls ``fn(rank)`` for every rank, each
    in its own thread, one thread at a time: rank 0 runs to its first collective, then rank 1 to
    its first, ..., and the last one to arrive completes the collective for all; then rank 0 goes
    on to its next, and so on. The ranks must call the same collectives in the same order.

    all_reduce sums the partials in rank order, ``((x0 + x1) + x2) + ...``, each add computed in
    float32 and rounded to x's dtype. NCCL rounds each add the same way; the order of its ring
    differs from chunk to chunk, so for two ranks (one add, commutative) the result is NCCL's bit
    for bit. NumPy or CuPy arrays; on the GPU every rank must launch on one stream: the threads
    start on CUDA's defaults (device 0, its legacy stream), so ``fn`` enters another device or
    stream itself, every rank the same one (checked at each collective).
    """

    def __init__(self, world: int):
        _check_rank(0, world)
        self.world = int(world)
        self._cond = threading.Condition()

    def communicator(self, rank: int) -> "LocalCommunicator":
        _check_rank(rank, self.world)
        return LocalCommunicator(self, rank)

    def run(self, fn) -> list:
        """[fn(0), ..., fn(world - 1)], run as the class says; the first exception of a rank is
        raised here (the other ranks stop at their next collective)."""
        self._turn, self._parts, self._done = 0, [None] * self.world, set()
        self._error, self._results = None, [None] * self.world
        outputs = [None] * self.world

        def body(rank):
            try:
                with self._cond:
                    self._wait(lambda: self._turn == rank)
                outputs[rank] = fn(rank)
                self._finish(rank)
            except _Aborted:
                pass
            except BaseException as exc:        # handed to the caller of run()
                with self._cond:
                    if self._error is None:
                        self._error = exc
                    self._cond.notify_all()

        threads = [threading.Thread(target=body, args=(r,), name=f"rank {r}", daemon=True)
                   for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self._error is not None:
            raise self._error
        return outputs

    def _wait(self, ready):
        self._cond.wait_for(lambda: self._error is not None or ready())
        if self._error is not None:
            raise _Aborted

    def _finish(self, rank):
        with self._cond:
            waiting = [r for r, p in enumerate(self._parts) if p is not None]
            if waiting:
                raise RuntimeError(f"rank {rank} returned while rank(s) {waiting} wait in "
                                   f"{self._parts[waiting[0]][0]}: the ranks called different collectives")
            self._done.add(rank)
            self._turn = rank + 1
            self._cond.notify_all()

    def _collective(self, rank: int, kind: str, x):
        """Rank ``rank`` enters collective ``kind`` with x; returns its result once all have."""
        with self._cond:
            if self._error is not None:
                raise _Aborted
            if self._done:
                raise RuntimeError(f"rank {rank} called {kind} after rank(s) {sorted(self._done)} returned: "
                                   f"the ranks called different collectives")
            self._parts[rank] = (kind, x, _stream_of(x))
            if rank < self.world - 1:
                self._turn = rank + 1
            else:
                parts, self._parts = self._parts, [None] * self.world
                self._results = self._complete(parts)
                self._turn = 0
            self._cond.notify_all()
            self._wait(lambda: self._turn == rank)
            return self._results[rank]

    def _complete(self, parts) -> list:
        if len({(k, x.shape, x.dtype, type(x)) for k, x, _ in parts}) != 1:
            raise RuntimeError("the ranks entered different collectives (kind, shape, dtype by rank): "
                               f"{[(k, x.shape, str(x.dtype)) for k, x, _ in parts]}")
        if len({s for _, _, s in parts}) != 1:
            raise RuntimeError(f"the ranks launched on different CUDA streams {[s for _, _, s in parts]}: the "
                               f"emulated collectives run on one stream, which every rank must enter (a decode "
                               f"graph per rank needs NCCL: Communicator)")
        kind = parts[0][0]
        xs = [x for _, x, _ in parts]
        if kind == "all_gather":
            return [_xp(xs[0]).stack(xs) for _ in xs]
        total = xs[0]
        for x in xs[1:]:
            total = (total.astype(np.float32) + x.astype(np.float32)).astype(x.dtype)
        for x in xs:
            x[...] = total
        return xs


class LocalCommunicator:
    """Rank ``rank`` of a :class:`LocalGroup` (the module's communicator interface)."""

    def __init__(self, group: LocalGroup, rank: int):
        self.group, self.rank, self.world = group, rank, group.world

    def all_reduce(self, x):
        _contiguous(x)
        return self.group._collective(self.rank, "all_reduce", x)

    def all_gather(self, x):
        _contiguous(x)
        return self.group._collective(self.rank, "all_gather", x)


def _contiguous(x):
    if not x.flags.c_contiguous:
        raise ValueError("x must be C-contiguous")


def _xp(a):
    import sys
    return np if isinstance(a, np.ndarray) else sys.modules["cupy"]


def _stream_of(x):
    """The stream a rank launched on (CuPy arrays; None for NumPy): all ranks must share it."""
    if isinstance(x, np.ndarray):
        return None
    import cupy
    return cupy.cuda.get_current_stream().ptr

"""The CPU compile test's builds: every template instance of a registry source compiled once per
test run with NVRTC, as at run time plus ptxas's report (``--ptxas-options=-v``), in worker processes.

A (source, arch) is split into consecutive chunks of its instance list, one NVRTC program each, so
the largest sources spread over the workers. ptxas reports every entry function of a program: the
chunk's instances, plus the source's non-template (extern "C") kernels, which every chunk builds.
NVRTC runs in spawned processes, one compile per process at a time."""
import concurrent.futures
import multiprocessing
import os
import re

from quickcupy import kernels, registry

PTXAS_VERBOSE = "--ptxas-options=-v"
# Instances a chunk holds at least: NVRTC's front end costs each program about a quarter second for
# the larger sources (ptxas about as much per instance), so one-instance programs would double the work.
MIN_CHUNK = 4
# kernels.nvrtc_compile reads these at compile time: workers use the values the pool started with.
_ENV = (kernels.CUDA_DIR_ENV, kernels.LINEINFO_ENV)

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def target_arch(source: str, arch: str):
    """The NVRTC target a source builds for when the test asks for ``arch`` ("sm_80", "sm_90"): its
    own fixed target where it has one (quick_sm90.cu: sm_90a), None where that is another arch."""
    fixed = registry.SOURCES[source].arch
    if fixed and fixed.rstrip("a") != arch:
        return None
    return fixed or arch


def workers() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split(names, parts: int) -> list:
    """``names`` as ``parts`` consecutive tuples whose lengths differ by at most one."""
    size, extra = divmod(len(names), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [tuple(names[a:b]) for a, b in zip(bounds, bounds[1:])]


def ptxas_reports(log: str) -> dict:
    """{entry function: (arch, stack frame bytes, spill store bytes, spill load bytes)} of a ptxas
    -v log: each "Compiling entry function" line with the usage line of its "Function properties"."""
    arch_of, reports, function = {}, {}, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            arch_of[m[1]] = m[2]
        elif m := _PROPERTIES.search(line):
            function = m[1]
        elif (m := _USAGE.search(line)) and function in arch_of:
            reports[function] = (arch_of[function],) + tuple(int(n) for n in m.groups())
            function = None
    return reports


def _set_env(values):
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _compile(source: str, arch: str, names: tuple):
    return (names,) + kernels.nvrtc_compile(source, arch, list(names), [PTXAS_VERBOSE])


class CompilePool:
    """Chunked NVRTC builds of registry sources, each (source, arch) submitted once; :meth:`result`
    waits for one (source, arch)."""

    def __init__(self, processes: int):
        self.processes = processes
        self._pool = None
        self._chunks = {}          # (source, arch) -> [future of (names, cubin, lowered, log)]

    def submit(self, pairs):
        """Queues the (source, target arch) pairs not queued yet, each split into up to ``processes``
        chunks of at least MIN_CHUNK instances, the chunks with the most instances first (the slowest
        start first)."""
        jobs = []
        for source, arch in dict.fromkeys(pairs):
            if (source, arch) not in self._chunks:
                names = registry.SOURCES[source].instances
                chunks = split(names, max(1, min(self.processes, len(names) // MIN_CHUNK)))
                jobs += [(source, arch, i, chunk) for i, chunk in enumerate(chunks)]
        if jobs and self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_set_env, initargs=({key: os.environ.get(key) for key in _ENV},))
        futures = {}
        for source, arch, i, chunk in sorted(jobs, key=lambda job: -len(job[3])):
            futures[source, arch, i] = self._pool.submit(_compile, source, arch, chunk)
        for source, arch, i, _ in jobs:
            self._chunks.setdefault((source, arch), []).append(futures[source, arch, i])

    def result(self, source: str, arch: str) -> list:
        """[(names, cubin, {name: lowered name}, log)] of every chunk of ``source`` for ``arch``, in
        instance order; raises the chunk's RuntimeError (with NVRTC's log) where one failed."""
        self.submit([(source, arch)])
        return [future.result() for future in self._chunks[source, arch]]

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

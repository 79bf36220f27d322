"""Every CUDA kernel of quickcupy, described once.

A :class:`Design` is one GEMM kernel source, ``cuda/<source>``: the weight layout it reads, its
threads per block and its template instances. It is of one of two kinds, each with its own
planner in :func:`quickcupy.kernels.plan`: a :class:`GemmDesign` (tiles of M x N, split-K summed
by a second kernel) or a :class:`DecodeDesign` (block shapes for few rows, split-K summed inside).
A :class:`Variant` is a name users pass as ``quickcupy.gemm(..., kernel=NAME)``: a design record
plus fixed choices (``quick_m16`` = the quick design held at 16-row tiles). A :class:`Source` lists the
instances of one ``.cu`` file that the loader may compile, for the helper kernels too
(split-K reduction, decode attention, spin).

Everything else is derived from these records: the loader's list of sources, the template
instances CI compiles and spill-checks, ``gemm``'s kernel names and shape rules, the ``ncu``
kernel-name filter, the bank model's per-design walk, and the thread-count constants of the
generated ``cuda/smem_maps.cuh`` (which ``__launch_bounds__`` uses).

Adding a design: write ``cuda/<name>.cu`` (same argument list as the others, see
:func:`quickcupy.kernels.launch`), add one :class:`GemmDesign` to :data:`DESIGNS` and one
:class:`Variant` to :data:`VARIANTS`; run ``python -m quickcupy.smem_maps`` to regenerate the header
if it names a new thread count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# A design lists the activation dtypes it has instances for in Design.dtypes and puts "{ctype}" in
# its template; instances() covers every (tile, dtype), so CI compiles them all.
from .dtypes import CTYPES, NAMES

# Shared-memory row padding in halfs (16 bytes): 8-row ldmatrix reads of a padded tile hit 8
# distinct 16-byte bank groups. Used by the kernels' shared arrays and the bank model.
SMEM_PAD = 8



@dataclass(frozen=True)
class Tile:
    """Compile-time shape of one GEMM instance, for ``bm`` rows of C per block."""
    chunks: int = 1          # 32-deep K chunks per main-loop step (BK = 32 * chunks)
    stages: int = 1          # cp.async ring depth for activations
    wstages: int = 1         # register sets of weights in flight (loaded wstages - 1 steps ahead)
    blocks_per_sm: int = 1   # resident blocks per SM (registers allow): sets the split-K target
    bn: int = 0              # columns of C per block when the kernel fixes them for this bm (0: tile_n)
    threads: int = 0         # threads per block where the instance takes them as a template parameter (0: the design's)


@dataclass(frozen=True, kw_only=True, eq=False)
class Design:
    """What every GEMM kernel design (one ``.cu`` file) has; a design is a :class:`GemmDesign`
    (grid of M tiles x N tiles x K splits, split-K reduced by a second kernel) or a
    :class:`DecodeDesign` (block shapes for small M, split-K reduced inside the kernel)."""
    name: str                # "awq", "quick"
    source: str              # file in cuda/
    function: str            # kernel template name in the source (also the ncu filter)
    layout: str              # packed weight layout it reads (quickcupy.layouts): "awq" or "quick"
    threads: int             # threads per block (of a GemmDesign: generated into cuda/smem_maps.cuh)
    n_multiple: int          # out_features must be a multiple of this
    description: str
    k_multiple: int = 32     # in_features must be a multiple of this
    max_m: int | None = None     # most rows of x the design serves (None: any)
    arch: str | None = None  # the one NVRTC target it builds for (e.g. "sm_90a": wgmma), else the device's
    dtypes: tuple = NAMES    # activation dtypes (quickcupy.dtypes) it has instances for

    def check_dtype(self, dtype: str):
        if dtype not in self.dtypes:
            raise ValueError(f"kernel {self.name} runs {' or '.join(self.dtypes)} activations, got {dtype}")

    def check_m(self, M: int):
        if self.max_m is not None and M > self.max_m:
            raise ValueError(f"kernel {self.name} serves M <= {self.max_m} rows, got M={M}")

    def instances(self) -> list:
        """Every template instance the planner can ask for (what CI compiles)."""
        raise NotImplementedError

    def thread_constants(self) -> dict:
        """Constant name -> threads, for the generated cuda/smem_maps.cuh."""
        return {}


@dataclass(frozen=True, kw_only=True, eq=False)
class GemmDesign(Design):
    """A design launched on a grid of (M tiles, N tiles, K splits); with splits, its fp32
    partials are summed by cuda/splitk_reduce.cu."""
    tile_n: tuple            # columns per block, first that divides N wins (the last if none does)
    tiles: dict              # rows per block (bm) -> Tile
    template: str            # instance name, formatted with bm, bn, chunks, gch, stages, wstages, threads, ctype
    smem_bytes: Callable     # (bm, bn, Tile) -> dynamic shared memory bytes of a block
    split_rule: str = "nearest"  # split-K by M tiles: "nearest" one wave, or "fill": most splits within one wave
    tensor_maps: bool = False    # takes TMA tensor maps of x, qweight, scales, qzeros first (kernels.gemm_tensor_maps)

    def tile_m(self, M: int) -> int:
        """Rows per block chosen for M: the smallest tile that covers M, else the largest."""
        for bm in sorted(self.tiles):
            if M <= bm:
                return bm
        return max(self.tiles)

    def instance(self, bm: int, bn: int, gch: int, tile: Tile | None = None, dtype: str = "float16") -> str:
        """Template instance for ``bm`` rows (with ``tile`` instead of the design's own, for tuning)
        and ``dtype`` activations."""
        t = self.tiles[bm] if tile is None else tile
        return self.template.format(bm=bm, bn=bn, chunks=t.chunks, gch=gch, stages=t.stages,
                                    wstages=t.wstages, threads=t.threads or self.threads, ctype=CTYPES[dtype])

    def instances(self) -> list:
        out = []
        for dt in self.dtypes:
            for bm, t in self.tiles.items():
                for bn in (t.bn,) if t.bn else self.tile_n:
                    for gch in divisors(t.chunks):
                        name = self.instance(bm, bn, gch, dtype=dt)
                        if name not in out:
                            out.append(name)
        return out

    def thread_constants(self) -> dict:
        if any(t.threads for t in self.tiles.values()):   # the instances carry their block size
            return {}
        return {f"{self.name.upper()}_THREADS": self.threads}


@dataclass(frozen=True, kw_only=True, eq=False)
class DecodeDesign(Design):
    """A design for few rows (cuda/quick_decode.cu): one of several block shapes, chosen by the
    decode launch rule (:func:`quickcupy.kernels.plan`), split-K across blocks summed in the kernel
    by the last block to arrive (arrival counters in the per-stream workspace)."""
    shapes: tuple            # the DecodeShapes it may launch; each sets its threads (nwarps * 32)

    @staticmethod
    def fusions(shape: "DecodeShape") -> tuple:
        """The fused variants (prologue, epilogue) instantiated for ``shape`` besides the plain one:
        the RMSNorm and the SiLU * up prologues (PRO_NORM, PRO_SILU_MUL) on the register pipeline
        (stages 0, where the batch-1 decode step runs; the ring streams its activations by rounds and
        has none), the residual epilogue on every shape (the same code on both pipelines). Never a
        prologue and the epilogue at once: no Llama GEMM needs both, and each instance costs CI a
        compile."""
        if shape.stages == 0:
            return ((PRO_NORM, False), (PRO_SILU_MUL, False), (0, True))
        return ((0, True),)

    def instances(self) -> list:
        return [sh.instance(gch, dt, *fused) for dt in self.dtypes for sh in self.shapes
                for fused in ((False, False),) + self.fusions(sh) for gch in divisors(sh.chunks)]


# quick_decode's prologues (its template parameter PRO; 0: none): what quickcupy.gemm's norm= and
# silu_mul= run inside the GEMM's launch where the plan's instance has them.
PRO_NORM = 1          # RMSNorm of x's rows
PRO_SILU_MUL = 2      # x is (M, 2K) gate | up; the GEMM reads T(silu(gate) * up)


@dataclass(frozen=True)
class DecodeShape:
    """A block shape of cuda/quick_decode.cu (template <NWARPS, KW, MB, U, S, GCH, MINB, T, PRO, EPI>)."""
    nwarps: int              # warps per block
    kw: int                  # warps along K per 32-column tile (nwarps / kw tile columns per block)
    mb: int                  # 8-row tiles of x: serves M <= 8 * mb
    minb: int                # blocks per SM the registers must allow (__launch_bounds__)
    chunks: int = 4          # U: 32-deep K chunks per warp and batch (round)
    stages: int = 0          # S: 0 = two register batches, >= 2 = shared-memory ring of S slots

    @property
    def columns(self) -> int:        # 32-column tiles per block
        return self.nwarps // self.kw

    @property
    def round_chunks(self) -> int:   # chunks of a tile column per round (KW warps x U)
        return self.kw * self.chunks

    def instance(self, gch: int, dtype: str = "float16", prologue: int = 0, epilogue: bool = False) -> str:
        """The template instance; ``prologue``: 0, PRO_NORM or PRO_SILU_MUL (template PRO),
        ``epilogue``: the residual epilogue (EPI) switched on (the plain instance leaves both
        template defaults, 0)."""
        fused = f", {int(prologue)}, {int(epilogue)}" if prologue or epilogue else ""
        return (f"quick_decode<{self.nwarps}, {self.kw}, {self.mb}, {self.chunks}, {self.stages}, {gch}, "
                f"{self.minb}, {CTYPES[dtype]}{fused}>")


@dataclass(frozen=True)
class Variant:
    """A kernel name of ``quickcupy.gemm``: a design with fixed plan choices, or (path "dequant")
    the weight dequantized by cuda/dequant.cu and multiplied by cuBLAS, or (path "auto") the
    choice of a measured table (:mod:`quickcupy.dispatch`) among the others of its layout."""
    name: str
    design: Design           # the kernel that runs, or whose layout is dequantized
    description: str
    tile_m: int | None = None   # rows per block, None = chosen by M
    path: str = "gemm"       # "gemm", "dequant", or "auto"

    @property
    def layout(self) -> str:
        return self.design.layout


@dataclass(frozen=True)
class Source:
    """A ``.cu`` file and the instances of it the loader may compile."""
    filename: str
    instances: tuple
    threads: dict = field(default_factory=dict)   # constant name -> threads, for the generated header
    arch: str | None = None  # the one NVRTC target it builds for, else the device's (see Design.arch)


def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------------------- designs
DESIGNS = {
    "awq": GemmDesign(
        name="awq", source="awq_gemm.cu", function="awq_gemm", layout="awq", threads=64,
        n_multiple=64, tile_n=(128, 64),
        # One 32-deep K step per iteration, AutoAWQ's tiles; 64-thread blocks, 8 per SM (as many
        # threads in flight as 2 quick blocks).
        tiles={bm: Tile(blocks_per_sm=8) for bm in (16, 32, 64)},
        template="awq_gemm<{bm}, {bn}, {ctype}>",
        smem_bytes=lambda bm, bn, t: 0,       # static __shared__ arrays
        description="AutoAWQ design: dequantized weights written back to shared memory"),
    "quick": GemmDesign(
        name="quick", source="quick_gemm.cu", function="quick_gemm", layout="quick", threads=128,
        n_multiple=32, tile_n=(128,),
        # Chosen from a sweep on the H100 at K = N = 8192 (docs/gemm.md, "QUICK's tiles"); blocks_per_sm
        # is what the register count allows.
        tiles={16: Tile(chunks=4, stages=2, wstages=2, blocks_per_sm=4),
               32: Tile(chunks=4, stages=3, wstages=2, blocks_per_sm=3),
               64: Tile(chunks=4, stages=3, wstages=2, blocks_per_sm=2),
               128: Tile(chunks=2, stages=3, wstages=3, blocks_per_sm=2)},
        template="quick_gemm<{bm}, {chunks}, {gch}, {stages}, {wstages}, {ctype}>",
        smem_bytes=lambda bm, bn, t: t.stages * bm * (32 * t.chunks + SMEM_PAD) * 2,   # activation ring
        description="QUICK interleaved weights loaded straight into mma registers"),
}

DESIGNS["quick_decode"] = DecodeDesign(
    name="quick_decode", source="quick_decode.cu", function="quick_decode", layout="quick",
    threads=256,             # of the first shape; each DecodeShape launches nwarps * 32 threads
    n_multiple=32,
    description="QUICK for M <= 16: packed weights streamed global -> registers (or through a "
                "cp.async ring in shared memory) as the mma A operand (C^T = W^T x^T), split-K reduced "
                "in the kernel by the last block",
    max_m=16,
    # Register pipeline (stages 0; M <= 8): the six shapes of the first decode design, 16 warps per
    # SM at <= 128 registers. Shared ring (M >= kernels.RING_MIN_M = 2; 16-row tiles for M 9..16 at
    # 107-113 registers): the shapes that were best at some point of the H100 sweep
    # (results/h100/bench_decode_sweep.json).
    shapes=(DecodeShape(8, 1, 1, 2), DecodeShape(8, 2, 1, 2), DecodeShape(8, 4, 1, 2),
            DecodeShape(8, 8, 1, 2), DecodeShape(16, 8, 1, 1), DecodeShape(16, 16, 1, 1),
            DecodeShape(16, 8, 1, 1, stages=3), DecodeShape(16, 4, 1, 1, stages=3),
            DecodeShape(8, 8, 1, 2, stages=3), DecodeShape(8, 2, 1, 2, stages=4),
            DecodeShape(8, 1, 1, 2, stages=3),
            DecodeShape(16, 2, 2, 1, stages=3), DecodeShape(16, 4, 2, 1, stages=3),
            DecodeShape(8, 2, 2, 2, stages=4), DecodeShape(8, 4, 2, 2, stages=3),
            DecodeShape(8, 1, 2, 2, stages=3)))

DESIGNS["quick_sm90"] = GemmDesign(
    name="quick_sm90", source="quick_sm90.cu", function="quick_sm90", layout="quick", threads=256,
    n_multiple=32, tile_n=(256,),
    # Warpgroups of one m64 row block each share the activation tile, K steps of 64 (chunks=2), one
    # block per SM: 256 features in 4 warpgroups x 64 or 128 tokens (bm / 2 fp32 accumulators a
    # thread, 90-125 registers of the 128 that 512 threads allow), or 128 features in 2 x 256
    # tokens (128 accumulators): each warp dequantizes half a QUICK tile column. Against two
    # warpgroups of two row blocks each (the whole column) at 64 and 128 tokens, 1.07-1.14x at
    # M = 16-128: results/h100/sm90_four_warpgroups_ab.txt; 128-feature tiles there lose
    # (results/h100/sm90_warpgroups_probe.txt); 256 tokens against 128 from M = 192:
    # results/h100/sm90_rowblock.txt (slower below: a 256-token tile mostly empty).
    tiles={64: Tile(chunks=2, stages=8, blocks_per_sm=1, threads=512),
           128: Tile(chunks=2, stages=8, blocks_per_sm=1, threads=512),
           256: Tile(chunks=2, stages=5, blocks_per_sm=1, bn=128, threads=256)},
    template="quick_sm90<{bm}, {bn}, {threads}, {stages}, {gch}, {ctype}>",
    # a ring of K steps on a 1024-byte boundary after 2 mbarriers (8 bytes) per stage; a slot holds
    # the swizzled activations (bm x 128 bytes), the packed weights (bn x 32 bytes) and scales/zeros
    # (2 KB), each a TMA box
    smem_bytes=lambda bm, bn, t: t.stages * (bm * 128 + bn * 32 + 2048 + 16) + 1024,
    # Split-K never past one wave: a second, partly filled wave cost up to 1.3x (H100 sweep of tile
    # and split at M = 64..512 on four bench shapes, results/h100/sm90_plan_sweep.txt).
    split_rule="fill",
    tensor_maps=True,
    description="QUICK for Hopper: weights dequantized in registers as the wgmma A operand, "
                "activations in a swizzled shared-memory ring (sm_90a only)",
    arch="sm_90a")

VARIANTS = {v.name: v for v in (
    Variant("awq", DESIGNS["awq"], "AutoAWQ design: dequantized weights written back to shared memory, 16-row tiles",
            tile_m=16),
    Variant("quick", DESIGNS["quick"], "QUICK interleaved weights loaded straight into mma registers; tile rows by M"),
    Variant("quick_m16", DESIGNS["quick"], "QUICK with AutoAWQ's 16-row tile (like-for-like with awq)", tile_m=16),
    Variant("quick_decode", DESIGNS["quick_decode"], "QUICK decode kernel for M <= 16 (weights as the mma A "
            "operand, in-kernel split-K)"),
    Variant("quick_sm90", DESIGNS["quick_sm90"], "QUICK for Hopper (sm_90a): wgmma with the weights as the "
            "register A operand; tile rows by M"),
    Variant("dequant", DESIGNS["quick"], "QUICK weights dequantized to an fp16/bf16 scratch buffer (x's dtype), "
            "then cuBLAS (cupy.matmul): the large-M path", path="dequant"),
    Variant("auto", DESIGNS["quick"], "the fastest quick-layout kernel for M on this GPU, from a measured table "
            "(quickcupy.dispatch)", path="auto"),
)}

# Layout name -> what it needs of (in_features, out_features): the loosest design reading it.
LAYOUTS = tuple(dict.fromkeys(d.layout for d in DESIGNS.values()))

# ---------------------------------------------------------------------------------- helper kernels
SPLITK_REDUCE_THREADS = 128
DECODE_ATTENTION_THREADS = 128
DEQUANT_THREADS = 128
# decode_attention<head_dim, heads per block, general, T>: a block takes the largest of these that
# divides the GQA group; head_dim a multiple of 32 (a warp spans it) between the least and greatest of
# these; general: split-KV and a sliding window (the instance without them is the single pass).
DECODE_HEAD_DIMS = (64, 96, 128, 256)
DECODE_HEADS_PER_BLOCK = (8, 4, 2, 1)
# Most KV splits of one (sequence, head group) (quickcupy/attention.py's decode_splits): the kernel's
# combining block keeps each split's max and sum in its probability tile (2 x splits <= the threads).
DECODE_MAX_SPLITS = 64


def decode_attention_instance(d: int, heads: int, general: bool, ctype: str) -> str:
    """The name of one instance of cuda/decode_attention.cu's kernel (ctype: a value of CTYPES)."""
    return f"decode_attention<{d}, {heads}, {'true' if general else 'false'}, {ctype}>"


# cuda/llama_ops.cu: the Llama layer's small ops (quickcupy/llama/ops.py), one instance per activation dtype.
LLAMA_OPS_THREADS = 256
LLAMA_OPS = tuple(f"{op}<{c}>" for op in ("add_rms_norm", "rope_cache", "silu_mul", "argmax_rows")
                  for c in CTYPES.values()) + ("advance_position",)

SOURCES = {s.filename: s for s in (
    *(Source(d.source, tuple(d.instances()), d.thread_constants(), d.arch) for d in DESIGNS.values()),
    Source("splitk_reduce.cu", tuple(f"splitk_reduce<{c}>" for c in CTYPES.values()),
           {"SPLITK_REDUCE_THREADS": SPLITK_REDUCE_THREADS}),
    Source("decode_attention.cu", tuple(decode_attention_instance(d, g, general, c) for c in CTYPES.values()
                                        for d in DECODE_HEAD_DIMS for g in DECODE_HEADS_PER_BLOCK
                                        for general in (False, True)),
           {"DECODE_ATTENTION_THREADS": DECODE_ATTENTION_THREADS}),
    Source("dequant.cu", tuple(f"dequant_quick<{c}>" for c in CTYPES.values()),
           {"DEQUANT_THREADS": DEQUANT_THREADS}),
    Source("spin.cu", ("quickcupy_spin",)),
    Source("llama_ops.cu", LLAMA_OPS, {"LLAMA_OPS_THREADS": LLAMA_OPS_THREADS}),
)}

# ncu --kernel-name filter: every GEMM design and the split-K reduction (part of a call's cost).
NCU_KERNEL_REGEX = "|".join([d.function for d in DESIGNS.values()] + ["splitk_reduce"])


def variant(kernel) -> Variant:
    """The record of gemm kernel ``kernel`` (a name, or a :class:`Variant`, returned as it is):
    where a name becomes its record, once per call at the API boundary; ValueError listing the
    names otherwise."""
    if isinstance(kernel, Variant):
        return kernel
    try:
        return VARIANTS[kernel]
    except (KeyError, TypeError):
        raise ValueError(f"kernel={kernel!r} is unknown; available: {', '.join(VARIANTS)}") from None


def design_of(kernel) -> Design:
    """The design that runs gemm kernel ``kernel`` (a variant name or record, a design name or record)."""
    if isinstance(kernel, Design):
        return kernel
    if isinstance(kernel, str) and kernel in DESIGNS:
        return DESIGNS[kernel]
    return variant(kernel).design


def layout_rules(layout: str) -> tuple:
    """(in_features multiple, out_features multiple) of ``layout``: what every design reading it
    can run."""
    designs = [d for d in DESIGNS.values() if d.layout == layout]
    if not designs:
        raise ValueError(f"layout={layout!r} is unknown; use one of {LAYOUTS}")
    return max(d.k_multiple for d in designs), max(d.n_multiple for d in designs)

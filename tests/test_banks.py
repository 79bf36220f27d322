"""The shared-memory bank-conflict model (quickcupy.analysis.banks): textbook patterns, AutoAWQ's stores,
properties, and (GPU + ncu) agreement with the hardware counters."""
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from quickcupy.analysis.banks import (WIDTHS, Wavefronts, bank_of, count_ldmatrix, count_ldmatrix_many,
                             count_wavefronts, count_wavefronts_many, lanes_per_phase, total)

LANE = np.arange(32)


# ------------------------------------------------------------------------------ textbook patterns
def test_stride_one_words_is_one_wavefront():
    assert count_wavefronts(4 * LANE, 4) == Wavefronts(1, 1)


def test_all_lanes_one_word_is_a_broadcast():
    assert tuple(count_wavefronts(np.full(32, 256), 4)) == (1, 1, 0)


def test_lanes_reading_bytes_of_one_word_do_not_conflict():
    assert tuple(count_wavefronts(LANE // 4 * 4 + LANE % 4, 1)) == (1, 1, 0)
    assert tuple(count_wavefronts(2 * LANE, 2)) == (1, 1, 0)          # 64 bytes, 16 words


@pytest.mark.parametrize("stride_words, ways", [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32),
                                                (3, 1), (33, 1)])
def test_strided_words(stride_words, ways):
    count = count_wavefronts(4 * stride_words * LANE, 4)
    assert tuple(count) == (ways, 1, ways - 1)


def test_16_byte_contiguous_is_four_quarter_warp_wavefronts():
    assert tuple(count_wavefronts(16 * LANE, 16)) == (4, 4, 0)


@pytest.mark.parametrize("row_stride, wavefronts", [(64, 4), (192, 4), (128, 8), (80, 8), (96, 8)])
def test_16_byte_rows_of_four_lanes(row_stride, wavefronts):
    # Lane l stores 16 bytes at row l // 4, chunk l % 4 (64 bytes per row); a quarter-warp covers
    # 2 rows, which share no bank only if the second starts 64 bytes (16 banks) after the first.
    addr = row_stride * (LANE // 4) + 16 * (LANE % 4)
    assert tuple(count_wavefronts(addr, 16)) == (wavefronts, 4, wavefronts - 4)


def test_16_byte_row_stride_conflicts():
    # 8 lanes of a quarter-warp each at the start of a row of 128 bytes: all in banks 0-3.
    assert tuple(count_wavefronts(128 * LANE, 16)) == (32, 4, 28)
    # Row stride 144 bytes (128 + 16 padding): rows rotate by 4 banks, conflict-free.
    assert tuple(count_wavefronts(144 * LANE, 16)) == (4, 4, 0)
    # Row stride 64 bytes: lanes 0, 2, 4, 6 of a quarter-warp share banks 0-3 -> 4-way.
    assert tuple(count_wavefronts(64 * LANE, 16)) == (16, 4, 12)
    # Row stride 32 bytes: lanes l and l + 4 share banks -> 2-way.
    assert tuple(count_wavefronts(32 * LANE, 16)) == (8, 4, 4)


def test_8_byte_patterns():
    assert tuple(count_wavefronts(8 * LANE, 8)) == (2, 2, 0)          # 256 contiguous bytes
    assert tuple(count_wavefronts(16 * LANE, 8)) == (4, 2, 2)         # every other 8 bytes: 2-way
    assert tuple(count_wavefronts(np.zeros(32, int), 8)) == (2, 2, 0)  # broadcast in each half
    # Lanes l and l + 16 at the same address are in different half-warps: no effect on each other.
    assert tuple(count_wavefronts(8 * (LANE % 16), 8)) == (2, 2, 0)
    # Half-warp lanes 0 and 8 hit banks 0-1 with distinct words: 2-way in each half-warp.
    assert tuple(count_wavefronts(8 * (LANE % 8) + 128 * (LANE // 8), 8)) == (4, 2, 2)


def test_loads_merge_lane_pairs_on_one_address():
    # Measured on H100: 8/16-byte loads whose lanes 2k, 2k + 1 share an address count per pair.
    assert tuple(count_wavefronts(np.full(32, 64), 16, load=True)) == (2, 2, 0)
    assert tuple(count_wavefronts(np.full(32, 64), 16)) == (4, 4, 0)          # the store
    assert tuple(count_wavefronts(np.full(32, 64), 8, load=True)) == (1, 1, 0)
    assert tuple(count_wavefronts(8 * (LANE // 2), 8, load=True)) == (1, 1, 0)
    assert tuple(count_wavefronts(16 * (LANE // 4), 16, load=True)) == (2, 2, 0)
    # Merged into one phase, two distinct words of bank 0 now conflict.
    assert tuple(count_wavefronts(128 * (LANE // 16), 8, load=True)) == (2, 1, 1)
    # An inactive lane does not break its pair; one differing pair stops the merge.
    addr, active = np.full(32, 64), LANE != 5
    assert tuple(count_wavefronts(addr, 16, active, load=True)) == (2, 2, 0)
    addr[5] = 80
    assert tuple(count_wavefronts(addr, 16, load=True)) == (4, 4, 0)
    # Repeats that are not in adjacent pairs (lane l and l + 8) do not merge; narrow loads never do.
    assert tuple(count_wavefronts(8 * (LANE % 8), 8, load=True)) == (2, 2, 0)
    assert count_wavefronts(4 * (LANE // 2), 4, load=True) == count_wavefronts(4 * (LANE // 2), 4)


def test_phases_without_active_lanes_are_not_counted():
    active = LANE < 8
    assert tuple(count_wavefronts(16 * LANE, 16, active)) == (1, 1, 0)
    assert tuple(count_wavefronts(8 * LANE, 8, LANE >= 16)) == (1, 1, 0)
    assert tuple(count_wavefronts(4 * LANE, 4, np.zeros(32, bool))) == (0, 0, 0)
    # An inactive lane's address is ignored, even if it would conflict or be misaligned.
    addr = 4 * LANE
    addr[5] = 128 + 2
    mask = LANE != 5
    assert tuple(count_wavefronts(addr, 4, mask)) == (1, 1, 0)


# --------------------------------------------------------------------------- AutoAWQ data points
def awq_activation_store(warp):
    """AutoAWQ: 64 threads store a 16x32 fp16 tile into A_shared[16][40] (row stride 80 bytes);
    thread tid stores 16 bytes at row tid // 4, column (tid % 4) * 8."""
    tid = 32 * warp + LANE
    return (tid // 4) * 80 + (tid % 4) * 8 * 2


def awq_weight_store(warp, iteration):
    """AutoAWQ: B_shared[32][136] halfs (row stride 272 bytes); warp w, lane l stores 16 bytes at
    row l // 16 + 2 w + 4 iteration, column (l % 16) * 8."""
    row = LANE // 16 + 2 * warp + 4 * iteration
    return row * 272 + (LANE % 16) * 8 * 2


@pytest.mark.parametrize("warp", [0, 1])
def test_awq_activation_store_matches_nsight(warp):
    # Nsight Compute on H100, M = 16: 32,768 such instructions, 131 k conflicts = 4 per instruction.
    assert tuple(count_wavefronts(awq_activation_store(warp), 16)) == (8, 4, 4)


@pytest.mark.parametrize("warp", [0, 1])
@pytest.mark.parametrize("iteration", range(8))
def test_awq_weight_store_is_conflict_free(warp, iteration):
    assert tuple(count_wavefronts(awq_weight_store(warp, iteration), 16)) == (4, 4, 0)


def test_awq_stores_totals_scale_with_executions():
    # The M = 16 launch: 32,768 activation-store and 262,144 weight-store instructions.
    act = count_wavefronts(awq_activation_store(0), 16)
    wgt = count_wavefronts(awq_weight_store(0, 0), 16)
    launch = total([(act, 32_768), (wgt, 262_144)])
    assert tuple(launch) == (32_768 * 8 + 262_144 * 4, (32_768 + 262_144) * 4, 131_072)


# ------------------------------------------------------------------------------------ ldmatrix
def ldmatrix_rows(row_stride, num=4):
    """Row addresses of an ldmatrix.x{num} over a tile whose rows are row_stride bytes apart:
    matrix i = rows 8i..8i+7 of one 16-byte column chunk."""
    lane = np.arange(8 * num)
    return row_stride * lane


@pytest.mark.parametrize("num", [1, 2, 4])
def test_ldmatrix_padded_rows_are_conflict_free(num):
    # 80-byte rows (32 halfs + 8 halfs padding, as AutoAWQ's A_shared): banks rotate by 20.
    assert tuple(count_ldmatrix(ldmatrix_rows(80, num), num)) == (num, num, 0)


def test_ldmatrix_unpadded_rows_conflict():
    # 64-byte rows (32 halfs, no padding): rows r and r + 2 share banks -> 4-way per matrix.
    assert tuple(count_ldmatrix(ldmatrix_rows(64), 4)) == (16, 4, 12)
    # 32-byte rows (16 halfs): rows r and r + 4 share banks -> 2-way per matrix.
    assert tuple(count_ldmatrix(ldmatrix_rows(32), 4)) == (8, 4, 4)
    # 128-byte rows: all 8 rows of a matrix in banks 0-3 -> 8-way.
    assert tuple(count_ldmatrix(ldmatrix_rows(128), 4)) == (32, 4, 28)


def test_ldmatrix_accepts_32_lanes_and_ignores_unused_ones():
    rows = np.full(32, 3)               # lanes 8.. unused for .x1: their values do not matter
    rows[:8] = 80 * np.arange(8)
    assert tuple(count_ldmatrix(rows, 1)) == (1, 1, 0)
    full = np.concatenate([ldmatrix_rows(80, 2), np.zeros(16, int)])
    assert count_ldmatrix(full, 2) == count_ldmatrix(ldmatrix_rows(80, 2), 2)


def test_ldmatrix_equals_16_byte_access_per_matrix():
    rng = np.random.default_rng(1)
    rows = 16 * rng.integers(0, 64, size=(50, 32))
    assert count_ldmatrix_many(rows, 4) == count_wavefronts_many(rows, 16)


# ---------------------------------------------------------------------------------- vectorised
def test_many_matches_one_at_a_time():
    rng = np.random.default_rng(0)
    for width in WIDTHS:
        addr = width * rng.integers(0, 1024 // width, size=(200, 32))
        active = rng.random((200, 32)) < 0.8
        many = count_wavefronts_many(addr, width, active)
        assert many.wavefronts.shape == (200,)
        for i in range(0, 200, 17):
            assert tuple(count_wavefronts(addr[i], width, active[i])) == (
                many.wavefronts[i], many.ideal[i], many.conflicts[i])
        assert many.sum() == Wavefronts(int(many.wavefronts.sum()), int(many.ideal.sum()))


def test_many_accepts_one_mask_for_all_instructions():
    addr = np.stack([4 * LANE, 128 * LANE])
    counts = count_wavefronts_many(addr, 4, LANE < 16)
    assert counts.wavefronts.tolist() == [1, 16]
    assert counts.ideal.tolist() == [1, 1]


def test_wavefronts_arithmetic():
    a, b = Wavefronts(8, 4), Wavefronts(4, 4)
    assert a + b == Wavefronts(12, 8)
    assert 3 * a == a * 3 == Wavefronts(24, 12)
    assert sum([a, b]) == a + b
    w, ideal, conflicts = a
    assert (w, ideal, conflicts) == (8, 4, 4)
    assert a.as_dict() == {"wavefronts": 8, "ideal": 4, "conflicts": 4}
    many = count_wavefronts_many(np.stack([4 * LANE, 8 * LANE]), 4)
    assert total([(many, np.array([10, 1]))]) == Wavefronts(10 * 1 + 1 * 2, 11)
    assert "conflicts=4" in repr(a)


def test_helpers():
    assert [lanes_per_phase(w) for w in WIDTHS] == [32, 32, 32, 16, 8]
    assert bank_of([0, 4, 128, 132, 127]).tolist() == [0, 1, 0, 1, 31]


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("width", [0, 3, 32, 4.0, True, "4"])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width="):
        count_wavefronts(4 * LANE, width)


@pytest.mark.parametrize("addresses, match", [
    (np.arange(31) * 4, "32 lanes"),
    (np.zeros((2, 32), int), r"shape \(32,\)"),
    (np.arange(32) * 4.0, "integers"),
])
def test_bad_addresses(addresses, match):
    with pytest.raises(ValueError, match=match):
        count_wavefronts(addresses, 4)


def test_misaligned_and_negative_addresses_name_the_lane():
    addr = 16 * LANE
    addr[7] += 8
    with pytest.raises(ValueError, match="lane 7: address 120 is not aligned to width=16 bytes"):
        count_wavefronts(addr, 16)
    addr = 4 * LANE
    addr[3] = -4
    with pytest.raises(ValueError, match="lane 3: address -4 is negative"):
        count_wavefronts(addr, 4)
    many = np.stack([4 * LANE, 4 * LANE + 2])
    with pytest.raises(ValueError, match="instruction 1, lane 0"):
        count_wavefronts_many(many, 4)


def test_bad_active_mask():
    with pytest.raises(ValueError, match="boolean"):
        count_wavefronts(4 * LANE, 4, active=np.ones(32, int))
    with pytest.raises(ValueError, match="32 lanes"):
        count_wavefronts(4 * LANE, 4, active=np.ones(16, bool))
    with pytest.raises(ValueError, match="does not match"):
        count_wavefronts_many(np.zeros((3, 32), int), 4, active=np.ones((2, 32), bool))


def test_bad_ldmatrix_arguments():
    with pytest.raises(ValueError, match="num=3"):
        count_ldmatrix(16 * LANE, 3)
    with pytest.raises(ValueError, match="16 row addresses"):
        count_ldmatrix(16 * np.arange(12), 2)
    with pytest.raises(ValueError, match="not aligned to the row size=16 bytes"):
        count_ldmatrix(8 * np.arange(8), 1)


# ---------------------------------------------------------------------------------- properties
@st.composite
def instructions(draw):
    width = draw(st.sampled_from(WIDTHS))
    # Few distinct slots make broadcasts and conflicts likely.
    slots = draw(st.integers(1, 4096 // width))
    addr = width * np.array(draw(st.lists(st.integers(0, slots - 1), min_size=32, max_size=32)))
    active = np.array(draw(st.lists(st.booleans(), min_size=32, max_size=32)))
    return addr, width, active


@settings(max_examples=300, deadline=None)
@given(instructions(), st.randoms(use_true_random=False))
def test_properties(inst, rnd):
    addr, width, active = inst
    count = count_wavefronts(addr, width, active)
    lanes = lanes_per_phase(width)
    phases_active = active.reshape(-1, lanes).any(axis=1)
    assert count.ideal == phases_active.sum()
    assert count.wavefronts >= count.ideal >= 0
    assert count.conflicts >= 0
    # No phase needs more wavefronts than it has words to move.
    assert count.wavefronts <= active.sum() * max(width // 4, 1)
    # Permuting lanes within each phase changes nothing.
    perm = np.concatenate([p * lanes + np.array(rnd.sample(range(lanes), lanes))
                           for p in range(32 // lanes)])
    assert count_wavefronts(addr[perm], width, active[perm]) == count
    # Shifting every address by a multiple of 128 bytes changes nothing.
    assert count_wavefronts(addr + 128 * rnd.randint(1, 100), width, active) == count
    # Narrow accesses count by the 4-byte words they touch.
    if width <= 4:
        words = addr // 4 * 4
        assert count_wavefronts(words, 4, active) == count
    # A load never takes more wavefronts than the same store (merging only joins phases).
    load = count_wavefronts(addr, width, active, load=True)
    assert count.ideal >= load.ideal and count.wavefronts >= load.wavefronts >= load.ideal


# ------------------------------------------------------------------------ against the hardware
PROBE_SOURCE = r"""
// One warp executes ONE shared-memory instruction; lane l uses byte offset off[l] (-1: inactive).
#define PROBE(NAME, INSN)                                                                    \
extern "C" __global__ void NAME(const int* off, int* sink) {                                 \
    __shared__ __align__(128) unsigned char smem[8192];                                      \
    unsigned a = (unsigned)__cvta_generic_to_shared(smem);                                   \
    int o = off[threadIdx.x];                                                                \
    unsigned r0 = threadIdx.x, r1 = 0, r2 = 0, r3 = 0;                                       \
    a += o < 0 ? 0 : o;                                                                      \
    if (o >= 0) { INSN; }                                                                    \
    sink[threadIdx.x] = r0 + r1 + r2 + r3;                                                   \
}
PROBE(bank_probe_st1, asm volatile("st.shared.u8 [%0], %1;" :: "r"(a), "r"(r0) : "memory"))
PROBE(bank_probe_st2, asm volatile("st.shared.u16 [%0], %1;" :: "r"(a), "h"((unsigned short)r0) : "memory"))
PROBE(bank_probe_st4, asm volatile("st.shared.u32 [%0], %1;" :: "r"(a), "r"(r0) : "memory"))
PROBE(bank_probe_st8, asm volatile("st.shared.v2.u32 [%0], {%1, %2};" :: "r"(a), "r"(r0), "r"(r1) : "memory"))
PROBE(bank_probe_st16, asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};"
                                    :: "r"(a), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory"))
PROBE(bank_probe_ld1, { unsigned short v; asm volatile("ld.shared.u8 %0, [%1];" : "=h"(v) : "r"(a)); r1 = v; })
PROBE(bank_probe_ld2, { unsigned short v; asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(a)); r1 = v; })
PROBE(bank_probe_ld4, asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r1) : "r"(a)))
PROBE(bank_probe_ld8, asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(r1), "=r"(r2) : "r"(a)))
PROBE(bank_probe_ld16, asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                                    : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a)))
PROBE(bank_probe_ldsm1, asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];"
                                     : "=r"(r1) : "r"(a)))
PROBE(bank_probe_ldsm2, asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                                     : "=r"(r1), "=r"(r2) : "r"(a)))
PROBE(bank_probe_ldsm4, asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a)))
"""

PROBE_SCRIPT = """
import sys, numpy as np, cupy as cp
data = np.load(sys.argv[1])
source = open(sys.argv[2]).read()
module = cp.RawModule(code=source, options=("-std=c++17",))
sink = cp.zeros(32, cp.int32)
for name, off in zip(data["names"], data["offsets"]):
    module.get_function(str(name))((1,), (32,), (cp.asarray(off, dtype=cp.int32), sink))
cp.cuda.Device().synchronize()
"""


def probe_patterns(seed=0, random_per_kind=12):
    """(kernel name, (32,) offsets with -1 = inactive lane, model's Wavefronts) to run on the GPU."""
    rng = np.random.default_rng(seed)
    out = []
    for width in WIDTHS:
        fixed = [4 * LANE, np.full(32, 64), 128 * LANE, 2 * width * LANE, width * LANE,
                 awq_activation_store(0), awq_weight_store(1, 2), width * (LANE // 2),
                 width * (LANE // 8), width * (LANE % 8), 128 * (LANE // 16)]
        fixed = [f // width * width % 8192 for f in fixed]
        pair_with_hole = fixed[7].copy()
        pair_with_hole[5] = -1
        randoms = []
        for i in range(random_per_kind):
            slots = int(rng.choice([1, 2, 8, 32, 256, 8192 // width]))
            offs = width * rng.integers(0, slots, size=32)
            offs[rng.random(32) < 0.2 * (i % 2)] = -1
            randoms.append(offs)
        for offs in fixed + [pair_with_hole] + randoms:
            active = offs >= 0
            for op in ("st", "ld"):
                model = count_wavefronts(np.where(active, offs, 0), width, active, load=op == "ld")
                out.append((f"bank_probe_{op}{width}", offs, model))
    for num in (1, 2, 4):
        rows = [80 * LANE, 64 * LANE, 32 * LANE, 128 * LANE, 16 * LANE]
        rows += [16 * rng.integers(0, int(rng.choice([4, 16, 512])), size=32) for _ in range(6)]
        for offs in rows:
            offs = offs % 8192
            out.append((f"bank_probe_ldsm{num}", offs, count_ldmatrix(offs, num)))
    return out


def run_probes(patterns, tmp_path):
    """Runs every pattern under ncu; returns [(name, offsets, model, measured Wavefronts)].

    Stores are read from the op_st counters, loads and ldmatrix from op_ld."""
    from quickcupy.tools.ncu import run_ncu
    data = tmp_path / "probes.npz"
    np.savez(data, names=np.array([p[0] for p in patterns]),
             offsets=np.stack([p[1] for p in patterns]).astype(np.int32))
    (tmp_path / "probe.cu").write_text(PROBE_SOURCE)
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE_SCRIPT))
    metrics = {op: (f"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_{op}.sum",
                    f"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_{op}.sum") for op in ("st", "ld")}
    launches, _ = run_ncu([sys.executable, str(tmp_path / "probe.py"), str(data),
                           str(tmp_path / "probe.cu")], kernel_regex="bank_probe",
                          metrics=metrics["st"] + metrics["ld"], timeout=540, nvtx=False)   # launch order
    assert len(launches) == len(patterns)
    out = []
    for (name, offs, model), launch in zip(patterns, launches):
        assert launch.name == name
        wf, bc = (launch.metrics[m] for m in metrics["st" if "_st" in name else "ld"])
        out.append((name, offs, model, Wavefronts(int(wf), int(wf - bc))))
    return out


def _skip_without_ncu():
    from quickcupy.device import no_gpu_reason
    from quickcupy.tools.ncu import NcuError, find_ncu
    reason = no_gpu_reason()
    if reason:
        pytest.skip(f"no GPU: {reason}")
    try:
        find_ncu()
    except NcuError as exc:
        pytest.skip(str(exc))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.ncu
def test_model_matches_nsight_compute(tmp_path):
    _skip_without_ncu()
    results = run_probes(probe_patterns(), tmp_path)
    bad = [(name, offs.tolist(), tuple(model), tuple(measured))
           for name, offs, model, measured in results if tuple(model) != tuple(measured)]
    assert not bad, f"{len(bad)} of {len(results)} patterns differ (name, offsets, model, ncu): {bad[:5]}"

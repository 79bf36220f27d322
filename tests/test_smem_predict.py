"""quickcupy.analysis.smem_predict: per-launch shared-memory counts from the kernels' own index maps."""
import pytest

from quickcupy.analysis.smem_predict import OPS, predict


def test_awq_matches_autoawq_measured_on_h100():
    """AutoAWQ's own kernel at M = 16, K = N = 8192 executed 294,912 shared stores, 1.31 M store
    wavefronts and 131 k conflicts (Nsight Compute, H100, 2026-11-24; BENCHMARKS.md, "Shared
    memory"). Our awq kernel keeps AutoAWQ's tiles and index maps, so the model must give exactly
    that."""
    p = predict("awq", 16, 8192, 8192, 128)
    assert p["st_inst"] == 294_912
    assert p["st_wavefronts"] == 1_310_720
    assert p["st_conflicts"] == 131_072
    assert p["ldsm_conflicts"] == 0                    # padded rows: ldmatrix is conflict-free


@pytest.mark.parametrize("M", (1, 16, 100, 1024))
def test_quick_has_no_shared_stores(M):
    p = predict("quick", M, 8192, 8192, 128)
    assert p["st_inst"] == p["st_wavefronts"] == 0
    assert p["ldgsts_conflicts"] == p["ldsm_conflicts"] == 0
    assert p["ldgsts_inst"] > 0 and p["ldsm_inst"] > 0


@pytest.mark.parametrize("M", (16, 128, 1024))
def test_awq_store_traffic_grows_with_m_tiles(M):
    """AWQ re-dequantizes and re-writes the whole weight for every 16 rows of M."""
    p = predict("awq", M, 4096, 4096, 128)
    weight_stores = 4096 * 4096 // 8 // 32                # one 16-byte store per 8 weights, per warp
    a_stores = (M // 16) * (4096 // 32) * (4096 // 128) * 2  # one per 16 rows, per K step, per warp
    assert p["st_inst"] == (M // 16) * weight_stores + a_stores


def test_ldmatrix_reads_same_a_bytes_in_both_designs():
    """Both read each A fragment once per 32-column warp tile: same ldmatrix count for A."""
    q = predict("quick_m16", 64, 4096, 4096, 128)
    a = predict("awq", 64, 4096, 4096, 128)
    a_ldsm_awq = a["ldsm_inst"] - (64 // 16) * (4096 // 16) * (4096 // 16)  # B: one x4 per 16x16
    assert a_ldsm_awq * 2 == q["ldsm_inst"]  # awq warps own 64 columns, quick warps 32


def test_counts_are_ints_for_every_op():
    p = predict("quick", 33, 1024, 640, 64)
    for op in OPS:
        for what in ("inst", "wavefronts", "conflicts"):
            assert isinstance(p[f"{op}_{what}"], int) and p[f"{op}_{what}"] >= 0


@pytest.mark.parametrize("M,expected", [
    (1, dict(st_inst=14_464, ld_inst=14_336, ldsm_inst=65_536, ldgsts_inst=4_096)),
    (4, dict(st_inst=14_464, ld_inst=112_640, ldsm_inst=65_536, ldgsts_inst=98_304)),
    (16, dict(st_inst=16_512, ld_inst=114_688, ldsm_inst=131_072, ldgsts_inst=98_304)),
])
def test_quick_decode_instructions_match_nsight_compute(M, expected):
    """Counts measured by ncu on the H100 at K = N = 8192, group 128 (results/h100/ncu_decode.txt:
    M = 1 the register pipeline, M = 4 and 16 the shared ring)."""
    p = predict("quick_decode", M, 8192, 8192, 128)
    assert {k: p[k] for k in expected} == expected


@pytest.mark.parametrize("M,G", [(16, 128), (100, 32), (200, 32), (4096, 128)])
def test_quick_sm90_reads_its_packed_weights_back(M, G):
    """quick_sm90 per 64-deep step and warp: everything arrives by TMA (no LSU copies). Every tile
    gives a warpgroup one m64 row block, so a warp reads half a tile column back: 8 bytes of each
    lane's 16, still 4 wavefronts a chunk, 2 of them excess (lanes 8 apart share banks), and 4-byte
    scales (1 wavefront) and zeros (1) per reloaded chunk. 64- and 128-token tiles: 256 features in
    16 warps; 256-token tiles (from M = 129): 128 features in 8. No stores."""
    p = predict("quick_sm90", M, 8192, 8192, G)
    bn, warps = (128, 8) if p["tile_m"] == 256 else (256, 16)
    warp_steps = -(-M // p["tile_m"]) * (8192 // bn) * (8192 // 64) * warps
    reloads = 2 if G == 32 else 1
    assert p.get("ldgsts_inst", 0) == 0
    assert p["ld_inst"] == warp_steps * (2 + 2 * reloads)
    assert p["ld_wavefronts"] == warp_steps * (2 * 4 + 2 * reloads)
    assert p["ld_conflicts"] == warp_steps * 2 * 2
    assert p.get("st_inst", 0) == p.get("ldsm_inst", 0) == 0

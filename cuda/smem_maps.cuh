// GENERATED from quickcupy/smem_maps.py and quickcupy/registry.py by
// `python -m quickcupy.smem_maps`: do not edit (a test checks it is current).
// Shared-memory index maps (which row/column of a shared fp16 array a lane touches) and
// launch constants, shared by the kernels and the bank-conflict model.
#pragma once

constexpr int SMEM_PAD = 8;
constexpr int AWQ_THREADS = 64;
constexpr int QUICK_THREADS = 128;
constexpr int SPLITK_REDUCE_THREADS = 128;
constexpr int DECODE_ATTENTION_THREADS = 128;
constexpr int DEQUANT_THREADS = 128;
constexpr int LLAMA_OPS_THREADS = 256;

// A fragment rows for ldmatrix.x4 (both kernels)
#define A_LDSM_ROW(lane, mt, kk) ((mt) * 16 + (lane) % 16)
#define A_LDSM_COL(lane, mt, kk) ((kk) * 16 + ((lane) / 16) * 8)
// st.shared.v4 of activations (AWQ)
#define AWQ_A_ST_ROW(lane, warp, i) ((i) * 16 + (warp) * 8 + (lane) / 4)
#define AWQ_A_ST_COL(lane, warp, i) (((lane) % 4) * 8)
// st.shared.v4 of dequantized weights (AWQ write-back)
#define AWQ_B_ST_ROW(lane, warp, i) ((i) * (AWQ_THREADS / (BN / 8)) + (warp) * (32 / (BN / 8)) + (lane) / (BN / 8))
#define AWQ_B_ST_COL(lane, warp, i) (((lane) % (BN / 8)) * 8)
// B fragment rows for ldmatrix.x4.trans (AWQ)
#define AWQ_B_LDSM_ROW(lane, warp, p, kk) ((kk) * 16 + (lane) % 16)
#define AWQ_B_LDSM_COL(lane, warp, p, kk) ((warp) * (BN / 2) + (p) * 16 + ((lane) / 16) * 8)
// cp.async (16 B) of activations (QUICK)
#define QUICK_A_CP_ROW(lane, warp, i) (((i) * QUICK_THREADS + (warp) * 32 + (lane)) / (BK / 8))
#define QUICK_A_CP_COL(lane, warp, i) ((((i) * QUICK_THREADS + (warp) * 32 + (lane)) % (BK / 8)) * 8)
// cp.async (16 B) of activations (quick_decode)
#define DEC_A_CP_ROW(i) ((i) / VECS)
#define DEC_A_CP_COL(i) (((i) % VECS) * 8)
// A fragment rows for ldmatrix.x4 (quick_decode, activations as mma B)
#define DEC_A_LDSM_ROW(lane, mb, rc) (8 * (mb) + (lane) % 8)
#define DEC_A_LDSM_COL(lane, mb, rc) (32 * (rc) + 8 * ((lane) / 8))
// st/ld.shared (4 B) of fp32 split-K sums between the warps of a block (quick_decode)
#define DEC_RED_ROW(lane, w, v) ((w))
#define DEC_RED_COL(lane, w, v) ((v) * 32 + (lane))

// QUICK decode: small-M (1..16) GEMM C = A x W (+ bias) on the packed QUICK layout (pack_quick),
// optionally with the RMSNorm or SiLU * up before it and the residual add after it fused in (PRO,
// EPI below),
// built to stream the weights at memory speed. No dequantized weight is ever written to shared
// memory: the packed words go global -> registers (S = 0) or global -> a cp.async ring in shared
// memory, still packed (S >= 2) -> registers, and are dequantized into mma fragments there.
//
// Roles are swapped against quick_gemm.cu: the mma computes C^T = W^T A^T, so the dequantized
// weights are the mma A operand (16 output columns) and the activations the B operand (8 rows of
// M). In the QUICK layout the B fragments of n8 sub-tiles 2i and 2i+1 of a lane are exactly the A
// fragment of the 16-column tile i (a0 = word 2i reg 0, a1 = word 2i+1 reg 0, a2 = word 2i reg 1,
// a3 = word 2i+1 reg 1), so the same packed words feed it and M <= 8 costs half the mma of the
// normal orientation (8 instead of 16 rows computed per mma).
//
// Rounds: a block's K slice is cut into rounds of KW * U chunks (32 k each); in round r warp (wn, wk)
// takes the U chunks r * KW * U + wk * U .. of its tile column.
//
// S = 0, register pipeline (the first decode design; M <= 8): the block's activations (M rows x its
// K slice) go to shared memory once, by cp.async, while the first batch of weights flies; after that
// one __syncthreads the main loop has no barrier. Two register batches: batch b + 1 is issued as
// soon as batch b has arrived (a fake data dependency: ptxas waits for all of a warp's global loads
// on one scoreboard, so an earlier prefetch would be waited for with the batch in use), U * 512
// bytes per warp in flight; occupancy (16 warps/SM at <= 128 registers) supplies the rest.
//
// S >= 2, shared ring (M >= 2 where measured faster; M 9..16 always): each warp owns S slots of U
// chunks (packed words: one 16-byte cp.async per lane and chunk, with the L2 evict-first policy;
// scales and zeros: 5 lanes x 16 bytes per scale block), the block S slots of activations (M rows
// x the round's chunks). The copies' addresses are computed once, a round only adds offsets. Round
// r + S - 1 is issued (one commit group per thread) while round r is computed, so S - 1 rounds of
// weights are in flight at all times and the activations stream with them instead of arriving in
// one piece before the first mma (what made M = 4..16 slow in the register pipeline: up to 200 KB
// of activations per block at M = 8). One __syncthreads per round makes round r's activations
// (copied by every thread) visible and frees slot (r - 1) % S for reuse. Registers stay <= 128
// at M 9..16 too (no register batches), so 16 warps per SM.
//
// K is split twice. Inside a block, KW warps share a tile column (neighbouring addresses at any
// time); at the end they add their fp32 sums through shared memory in warp order (two
// __syncthreads). Across blocks (gridDim.y = splits > 1), each block's sums go to
// partial[split][M][N] and counters[tile column] counts the arrivals; the warp that arrives last sums
// all splits in split order (deterministic), adds bias, writes T and resets the counter to 0
// (splitk_warp_arrive / splitk_reduce_strip32 in quant_common.cuh): one launch, CUDA-graph safe,
// bit-identical from run to run.
//
// Fused neighbours (a Llama layer's RMSNorm before its qkv and gate|up GEMMs, SiLU * up before down,
// its residual adds after o and down; quickcupy.gemm's norm=, silu_mul= and residual=), as template
// switches:
// - PRO = 1, the RMSNorm prologue (register pipeline only: the ring streams its activations round by
//   round). A is the residual stream x. After pdl_wait (x is the previous kernel's output; the
//   weight prefetch stays before it) every thread sums the squares of its 16-byte vectors of the M
//   whole rows (from L2: a split's slice is not the row) while the slice and norm_w's slice arrive by
//   cp.async; the warps' sums meet in shared memory at the barrier the slice needs anyway, each warp
//   adds them by one fixed xor tree (deterministic; not add_rms_norm's order, so inv_rms may differ
//   from it in the last bit), and the block rewrites the slice in place as T(T(x * inv_rms) * w)
//   (llama_ops' roundings, quant_common.cuh's norm8) before one more barrier and the main loop.
// - PRO = 2, the SiLU * up prologue (register pipeline only). A is the gate|up GEMM's output (M, 2K),
//   gate then up. Each thread copies the gate and the up vector of each slice position it owns by
//   cp.async (gate into the slice, up beside it), and once its own copies have landed rewrites its
//   slice vectors as T(silu(gate) * up) (silu_mul8: llama_ops' silu_mul bit for bit), before the
//   barrier the slice needs anyway: no launch, no barrier and no pass over (M, K) in memory more.
// - EPI, the residual epilogue (every shape): C = T(residual + T(sum + bias)), the rounding of the
//   GEMM then add_rms_norm's add, in both epilogues (splits == 1, and the split-K sum of the last
//   warp). Each residual element is read once, by the lane that then writes that element of C, so C
//   may be the residual itself (the layer's o and down projections add into x in place).
//
// Launch (quickcupy.kernels._plan_decode): grid (ceil(N / 32 / (NWARPS / KW)), splits), block
// NWARPS * 32 threads, dynamic shared memory (kernels._decode_smem) max(NWARPS * S *
// sizeof(DecodeSlot<U>) + M * pitch * 2 * max(S, 1) + 16 [+ pitch * 2 + 32 * NWARPS with PRO = 1: norm_w's
// slice, the warps' row sums; + M * pitch * 2 with PRO = 2: up's slice], (KW - 1) * (NWARPS / KW) * MB * 1024)
// bytes,
// pitch = 32 * chunks_per_split + 8 (S = 0) or 32 * KW * U + 8 (S >= 2); chunks_per_split a multiple
// of KW * U; M <= 8 * MB; K % 32 == 0, N % 32 == 0, group_size % 32 == 0, K % group_size == 0;
// counters: N / 32 uint32 zeroed once by the host; partial: splits * M * N fp32 (unused, may be
// null, when splits == 1); norm_w (K,) and eps read with PRO = 1, residual (M, N) with EPI (else null);
// with PRO = 2, A's rows are 2K long.
#include "quant_common.cuh"

using namespace qc;

// NVRTC 12 (12.9, the last CUDA 12 release) gives ptxas PTX of the register pipeline (S = 0) at one
// scale block per batch (GCH = U = 4, group size 128) that does not fit the 128 registers of 16 warps
// per SM: 1-3 loop-invariant integers (the group-index multiplier, the round count) spill, 8-16 bytes
// on sm_80. ptxas 13 spills that PTX too and not NVRTC 13's, so the front end makes the difference.
// With NVRTC 12 only (NVRTC12_REGS), the register pipeline folds its block sums every two chunks and
// bounds its batch loop by the warp's chunks left, and the norm prologue (PRO = 1) sums its rows before
// batch 0 takes its registers: no spills, the same sums up to fp32 rounding order. NVRTC 13
// compiles the code as measured.

// One warp's slot of the weight ring: U chunks of packed codes and the scale blocks they need. Lane
// L writes (cp.async) and reads back w[c][L] only; the scale/zero rows are read by every lane after
// a barrier.
template <int U>
struct DecodeSlot {
  uint4 w[U][32];            // packed codes: chunk c of the slot, lane L (columns 8 j + L / 4 of word j)
  uint2 s[U][8];             // scales (fp16 x 4, sub-tiles j = 0..3) of scale block q, column group g
  unsigned short z[U][8];    // zero points (nibbles j = 0..3) of scale block q, column group g
};
static_assert(sizeof(DecodeSlot<4>) == 4 * 592, "kernels.DECODE_SLOT_BYTES per chunk");

// One warp's batch in registers (S = 0): U chunks of packed codes, one 16-byte load per lane and
// chunk, and the scales/zeros lane t loads for chunks t * U / 4 + i (traded by shuffles).
template <int U>
struct DecodeBatch {
  uint4 w[U];
  uint2 s[U / 4];
  u32 z[U / 4];
};

// Block: 32 * NWARPS / KW output columns x all M rows over one K slice (split blockIdx.y). Warp w
// owns QUICK tile column blockIdx.x * (NWARPS / KW) + w % (NWARPS / KW) (32 columns) and chunk
// w / (NWARPS / KW) of each round; lane (g = lane / 4, t = lane % 4) holds the 16 bytes of a chunk
// for columns 8 j + g, k rows 2t + {0,1,8,9,16,17,24,25}, and sums
// C[m = 8 mb + 2t + {0,1}][n = 16 i + g + {0,8}].
template <int NWARPS,   // warps per block; block = 32 * NWARPS threads
          int KW,       // warps along K per tile column (divides NWARPS): NWARPS / KW tile columns per block
          int MB,       // 8-row tiles of activations (mma n8 tiles): the kernel serves M <= 8 * MB
          int U,        // 32-deep K chunks per warp and round (2 or 4): U 16-byte cp.async per lane
          int S,        // weight pipeline: 0 = two register batches (below), >= 2 = shared ring of S slots,
                        // S - 1 rounds in flight while one is computed
          int GCH,      // chunks per scale/zero change = gcd(group_size / 32, U): divides U
          int MINB,     // blocks per SM the registers must allow (__launch_bounds__): 16 / NWARPS -> <= 128 regs
          typename T,   // activations, bias and C: half or __nv_bfloat16 (Dt<T>); scales are fp16
          int PRO = 0,  // 1: RMSNorm prologue (S = 0): A is the residual stream x, the mma reads
                        // T(T(x * inv_rms) * norm_w) of its rows (norm_w (K,), eps);
                        // 2: SiLU * up prologue (S = 0): A is (M, 2K) gate | up, the mma reads
                        // T(silu(gate) * up)
          int EPI = 0>  // 1: residual epilogue: C = T(residual + T(A W^T + bias)); residual (M, N) may be C
__global__ void __launch_bounds__(NWARPS * 32, MINB)
quick_decode(const T* __restrict__ A, const uint4* __restrict__ qweight,
             const unsigned short* __restrict__ qzeros, const uint2* __restrict__ scales,
             const T* __restrict__ bias, T* __restrict__ C, float* __restrict__ partial,
             unsigned int* __restrict__ counters, int M, int N, int K, int group_size,
             int chunks_per_split, const T* __restrict__ norm_w, float eps, const T* residual) {
  static_assert(U % GCH == 0, "GCH must divide U");
  static_assert(NWARPS % KW == 0, "KW must divide NWARPS");
  static_assert(S == 0 || S >= 2, "registers (S = 0) or a ring of at least 2 slots");
  static_assert(S > 0 || U == 4 || U == 8, "a register batch is 4 or 8 chunks (each lane holds U / 4 scales)");
  static_assert(S == 0 || 5 * (U / GCH) <= 32, "5 lanes copy the scales and zeros of one scale block");
  static_assert(PRO == 0 || (S == 0 && MB == 1), "the prologues run in the register pipeline (M <= 8)");
  static_assert(PRO >= 0 && PRO <= 2, "PRO: 0 none, 1 RMSNorm, 2 SiLU * up");
  constexpr int NWN = NWARPS / KW;             // tile columns per block
  constexpr int RC = KW * U;                   // chunks per round (of each tile column)
  constexpr int VECS = RC * 4;                 // 16-byte activation vectors per row and round (DEC_A_CP map)
  constexpr int SR = S > 0 ? S : 1;            // ring slots, for slot arithmetic
  constexpr bool NVRTC12_REGS = __CUDACC_VER_MAJOR__ < 13;  // see the note on NVRTC 12 at the top
  using D = Dt<T>;
  using Slot = DecodeSlot<U>;
  // one untyped extern array for every instance (extern __shared__ arrays of different types clash)
  extern __shared__ __align__(16) unsigned char smem_raw[];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int wn = warp % NWN, wk = warp / NWN;
  const int tiles_n = N / 32, chunks = K / 32, groups = K / group_size, cpg = group_size / 32;
  const int tn = blockIdx.x * NWN + wn;  // this warp's QUICK tile column
  const bool active = tn < tiles_n;      // N % 32 == 0: a tile column is all in or all out
  const int kc0 = blockIdx.y * chunks_per_split;
  const int nch_b = min(chunks, kc0 + chunks_per_split) - kc0;  // chunks of the block's slice (>= 1)
  const int nrounds = (nch_b + RC - 1) / RC;                    // block-uniform
  const int nb = active && nch_b > wk * U ? (nch_b - wk * U + RC - 1) / RC : 0;  // rounds with chunks of this warp
  // activations: S = 0, the whole slice [M][pitch] (copied once); S > 0, a ring of S slots [M][pitch]
  // of one round each. Rows end in a 16-byte pad: ldmatrix conflict-free.
  const int pitch = (S == 0 ? chunks_per_split : RC) * 32 + 8;
  const int aslot = M * pitch;            // halfs per activation slot

  Slot* ring = reinterpret_cast<Slot*>(smem_raw) + warp * S;          // this warp's S slots
  T* A_s = reinterpret_cast<T*>(smem_raw + NWARPS * S * sizeof(Slot));  // activation slot(s), then 8 zeros
  T* zero_row = A_s + SR * aslot;         // the 16 zero bytes that rows >= M of an ldmatrix point at
  T* w_s = zero_row + 8;                  // PRO = 1: norm_w of the slice [pitch]; PRO = 2: up's slice [M][pitch]
  float* row_ss = reinterpret_cast<float*>(w_s + pitch);  // PRO = 1: [8][NWARPS] the warps' sums of squares

  const uint4* wq = qweight + ((size_t)tn * chunks + kc0) * 32 + lane;
  const size_t sz_row = (size_t)tn * groups;  // first scale/zero row of the tile column
  // group of chunk kc = kc / cpg by multiply-high: exact for kc * cpg < 2^32
  const u32 gmagic = cpg == 1 ? 0u : 0xffffffffu / (u32)cpg + 1u;

  // the whole slice (S = 0): the block's rounds, zeros past the slice; PRO = 1: norm_w's slice too;
  // PRO = 2: the gate's slice, and up's beside it (the same thread copies both of a position)
  auto issue_a_whole = [&]() {
    const int VECS = RC * 4 * nrounds;    // a row of the slice's rounds, read by the DEC_A_CP map
    if constexpr (PRO == 2) {
      for (int i = threadIdx.x; i < M * VECS; i += NWARPS * 32) {
        const int row = DEC_A_CP_ROW(i), col = DEC_A_CP_COL(i);
        const bool ok = col / 32 < nch_b;
        const T* gate = A + (size_t)row * 2 * K + (size_t)kc0 * 32 + col;
        cp_async16(A_s + row * pitch + col, ok ? gate : A, ok);
        cp_async16(w_s + row * pitch + col, ok ? gate + K : A, ok);
      }
      return;
    }
    for (int i = threadIdx.x; i < (M + PRO) * VECS; i += NWARPS * 32) {
      const int row = DEC_A_CP_ROW(i), col = DEC_A_CP_COL(i);  // col: halfs into the slice
      const bool ok = col / 32 < nch_b;
      if (PRO && row == M)
        cp_async16(w_s + col, ok ? norm_w + (size_t)kc0 * 32 + col : norm_w, ok);
      else
        cp_async16(A_s + row * pitch + col, ok ? A + (size_t)row * K + (size_t)kc0 * 32 + col : A, ok);
    }
  };
  // PRO = 1, part 1 (every thread, after pdl_wait): the sums of squares of the M whole rows of x (read
  // from L2: a split's slice is not the row), per thread over 16-byte vectors tid, tid + NT, ..., then
  // over the warp (xor tree); lane 0 leaves warp w's sum of row m in row_ss[m][w]. A fixed order:
  // deterministic, but not add_rms_norm's, so the last bit of inv_rms may differ from it.
  auto row_sums = [&]() {
    float ss[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) ss[m] = 0.f;
    const uint4* xv = reinterpret_cast<const uint4*>(A);
    const int kv = K / 8;                 // 16-byte vectors per row
#pragma unroll 2
    for (int v = threadIdx.x; v < kv; v += NWARPS * 32)
#pragma unroll
      for (int m = 0; m < 8; ++m)
        if (m < M) ss[m] = sum_sq8<T>(__ldcg(xv + (size_t)m * kv + v), ss[m]);
#pragma unroll
    for (int m = 0; m < 8; ++m)
      if (m < M) {
#pragma unroll
        for (int o = 16; o > 0; o /= 2) ss[m] += __shfl_xor_sync(0xffffffffu, ss[m], o);
        if (lane == 0) row_ss[m * NWARPS + warp] = ss[m];
      }
  };
  // PRO = 1, part 2 (after a barrier and the slice's arrival): every warp adds the NWARPS sums of each
  // row by the same xor tree (the same bits in every lane and warp), and the block normalizes the
  // slice in place, T(T(x * inv_rms) * w) (norm8), each thread the vectors it copied; zeros past the
  // slice stay zero. A barrier must follow.
  auto normalize_slice = [&]() {
    float inv[8];
#pragma unroll
    for (int m = 0; m < 8; ++m) {
      float v = 0.f;
      if (m < M) {
        v = lane < NWARPS ? row_ss[m * NWARPS + lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
      }
      inv[m] = rms_inv(v, K, eps);
    }
    const int VECS = RC * 4 * nrounds;
    for (int i = threadIdx.x; i < M * VECS; i += NWARPS * 32) {
      const int row = DEC_A_CP_ROW(i), col = DEC_A_CP_COL(i);
      if (col / 32 < nch_b) {
        float f = inv[0];
#pragma unroll
        for (int m = 1; m < 8; ++m) f = row == m ? inv[m] : f;   // no indexed register array
        uint4* a = reinterpret_cast<uint4*>(A_s + row * pitch + col);
        *a = norm8<T>(*a, *reinterpret_cast<const uint4*>(w_s + col), f);
      }
    }
  };

  // PRO = 2 (after this thread's copies have landed: its own cp.async writes are visible to it):
  // the slice vectors it copied become T(silu(gate) * up); zeros past the slice stay zero. The
  // barrier after it makes the slice visible to every warp.
  auto silu_mul_slice = [&]() {
    const int VECS = RC * 4 * nrounds;
    for (int i = threadIdx.x; i < M * VECS; i += NWARPS * 32) {
      const int row = DEC_A_CP_ROW(i), col = DEC_A_CP_COL(i);
      if (col / 32 < nch_b) {
        uint4* a = reinterpret_cast<uint4*>(A_s + row * pitch + col);
        *a = silu_mul8<T>(*a, *reinterpret_cast<const uint4*>(w_s + row * pitch + col));
      }
    }
  };

  pdl_trigger();  // the next kernel's blocks may take the SMs this grid's blocks leave
  if (threadIdx.x == 0) *reinterpret_cast<uint4*>(zero_row) = make_uint4(0, 0, 0, 0);

  float acc[2][MB][4];   // acc[i][mb][e]: C[m = 8 mb + 2t + e % 2][n = 32 tn + 16 i + g + 8 (e / 2)]
  float accg[2][MB][4];  // the same, over the current scale block, unscaled
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][mb][e] = accg[i][mb][e] = 0.f;

  // ldmatrix.x4 (non-transposed) of 8 rows x 32 k of A: lane L gives row 8 mb + L % 8 at k 8 (L / 8)
  // of the chunk, so register q = (k-step q / 2, B register q % 2). Rows >= M read the zero vector.
  u32 a_addr[MB];  // shared address of the lane's row at the warp's first chunk (of slot 0)
  u32 a_live[MB];  // S = 0: bytes per chunk (64, 0 for the zero vector); S > 0: ~0 or 0, an offset mask
  auto point_a = [&]() {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
      const int row = DEC_A_LDSM_ROW(lane, mb, 0);
      a_addr[mb] = smem_addr(row < M ? A_s + row * pitch + wk * U * 32 + DEC_A_LDSM_COL(lane, mb, 0) : zero_row);
      a_live[mb] = row >= M ? 0u : S == 0 ? 64u : 0xffffffffu;
    }
  };
  if constexpr (PRO != 1) point_a();  // PRO = 1: after the prologue (fewer registers live across it: no spills)

  // The mma multiplies exact (code - zero) values (fp16 or bf16 alike); the fp32 sums of each scale
  // block (GCH chunks, one group) are scaled into acc at its end: one multiply per weight pair less
  // than scaling the weights, and no rounding of code * scale to T, so bf16 loses nothing here but
  // the output rounding.
  half2 sc[4];  // fp16 scales of the current scale block: only widened to fp32 (exact) for its sums
  typename D::Zero zp[4];
  // a scale block starts: column 8 j + g of the tile has zero nibble j of zw, scale j of s01 / s23
  auto set_group = [&](u32 s01, u32 s23, u32 zw) {
    typename D::T2 z[4];
    D::codes8(zw, z);  // pair j = (zero of sub-tile j, 0)
    sc[0] = __low2half2(as_half2(s01)); sc[1] = __high2half2(as_half2(s01));
    sc[2] = __low2half2(as_half2(s23)); sc[3] = __high2half2(as_half2(s23));
#pragma unroll
    for (int j = 0; j < 4; ++j) zp[j] = D::make_zero(D::low2(z[j]));
  };
  // chunk c of a batch: packed words wv; activations at a_off, the chunk's index in the slice (S = 0)
  // or its bytes past the warp's first chunk of slot 0 (S > 0)
  auto mma_chunk = [&](const uint4 wv, int c, u32 a_off) {
    u32 act[MB][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
      ldmatrix_x4_addr(act[mb], a_addr[mb] + (S == 0 ? a_off * a_live[mb] : a_live[mb] & a_off));
    const u32 words[4] = {wv.x, wv.y, wv.z, wv.w};
    // 16-column tile i takes words 2i, 2i + 1. The ring dequantizes one tile at a time (fewer
    // registers live: what lets 16-row tiles fit 128); the register pipeline keeps the first decode
    // design's order, all four words first (its measured speed at M = 1, 2).
    constexpr int TILES = S == 0 ? 2 : 1;   // 16-column tiles dequantized together
#pragma unroll
    for (int i0 = 0; i0 < 2; i0 += TILES) {
      u32 b[2 * TILES][4];  // b[h][2 s + q]: register q of k16 step s for n8 sub-tile 2 i0 + h
#pragma unroll
      for (int h = 0; h < 2 * TILES; ++h) {
        const typename D::Zero zj[4] = {zp[2 * i0 + h], zp[2 * i0 + h], zp[2 * i0 + h], zp[2 * i0 + h]};
        D::dequant8_unscaled(words[2 * i0 + h], zj, b[h]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int i = i0; i < i0 + TILES; ++i) {
          const int h = 2 * (i - i0);
          const u32 wa[4] = {b[h][2 * s], b[h + 1][2 * s], b[h][2 * s + 1], b[h + 1][2 * s + 1]};
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) D::mma(accg[i][mb], wa, act[mb][2 * s], act[mb][2 * s + 1]);
        }
    }
    constexpr int FOLD = NVRTC12_REGS && S == 0 && GCH > 2 ? 2 : GCH;  // chunks per fold (divides GCH)
    if (c % FOLD == FOLD - 1) {  // end of a scale block (or half of one): acc += scale * block sums
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float s_lo = __low2float(sc[2 * i]), s_hi = __low2float(sc[2 * i + 1]);  // rows g, g + 8
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            acc[i][mb][e] = fmaf(accg[i][mb][e], e < 2 ? s_lo : s_hi, acc[i][mb][e]);
            accg[i][mb][e] = 0.f;
          }
      }
    }
  };

  if constexpr (S == 0) {
    // ---- register pipeline: batch b + 1 is issued once batch b has arrived (a fake data
    // dependency: address + (last word & 0)), then flies while batch b is computed. ptxas tracks all
    // global loads of a warp on one scoreboard, so an earlier prefetch would be waited for together
    // with the batch in use. U * 512 bytes in flight per warp; occupancy supplies the rest.
    const uint2* sq = scales + sz_row * 8 + g;
    const unsigned short* zq = qzeros + sz_row * 8 + g;
    const u32 zero_rt = (u32)M >> 31;  // 0 at run time, unknown to the compiler
    const int left = active ? nch_b - wk * U : 0;  // NVRTC12_REGS: batch b is computed if b RC < left
    auto load_batch = [&](int b, DecodeBatch<U>& rb, u32 dep) {  // predicated per chunk, no branch
      const int rcb = b * RC + wk * U;
      const uint4* wb = wq + (size_t)rcb * 32 + dep;
#pragma unroll
      for (int c = 0; c < U; ++c) rb.w[c] = ld_stream16<1>(wb + c * 32, active && rcb + c < nch_b);
#pragma unroll
      for (int i = 0; i < U / 4; ++i) {
        const int rc = rcb + t * (U / 4) + i;
        const bool ok = active && rc < nch_b;
        const u32 kc = (u32)(kc0 + rc);
        const u32 grp = cpg == 1 ? kc : __umulhi(kc, gmagic);
        rb.s[i] = ok ? __ldg(sq + (size_t)grp * 8) : make_uint2(0, 0);
        rb.z[i] = ok ? (u32)__ldg(zq + (size_t)grp * 8) : 0u;
      }
    };
    auto compute = [&](int b, const DecodeBatch<U>& rb) {
#pragma unroll
      for (int c = 0; c < U; ++c) {
        if (c % GCH == 0) {  // lane 4 g + c / (U / 4) loaded this chunk's scales for column group g
          const int src = (lane & ~3) | (c / (U / 4));
          const u32 s01 = __shfl_sync(0xffffffffu, rb.s[c % (U / 4)].x, src);
          const u32 s23 = __shfl_sync(0xffffffffu, rb.s[c % (U / 4)].y, src);
          set_group(s01, s23, __shfl_sync(0xffffffffu, rb.z[c % (U / 4)], src));
        }
        mma_chunk(rb.w[c], c, (u32)(b * RC + c));
      }
    };
    DecodeBatch<U> buf[2];  // indexed only by unrolled constants: stays in registers
    // The weights depend on no earlier kernel: the first two batches are fetched into L2 while the
    // previous kernel finishes (a prefetch holds no registers; loading them here spills the bf16
    // instances). Lane l < 8 U: 128-byte line l % 4 of chunk l / 4 of batch 0 or 1 (512 bytes a chunk).
    if (lane < 8 * U) {
      const int c = lane / 4 % U, b = lane / (4 * U), rc = b * RC + wk * U + c;
      if (active && rc < nch_b) prefetch_l2(wq - lane + (size_t)rc * 32 + (lane % 4) * 8);
    }
    pdl_wait();  // the activations may be the previous kernel's output
    issue_a_whole();
    cp_async_commit();
    if constexpr (PRO == 1 && NVRTC12_REGS) row_sums();  // NVRTC 12: before batch 0 holds registers (no spills)
    load_batch(0, buf[0], 0u);
    if constexpr (PRO == 1 && !NVRTC12_REGS) row_sums(); // its loads fly with batch 0's
    cp_async_wait<0>();
    if constexpr (PRO == 2) silu_mul_slice();
    __syncthreads();  // activations are in shared memory; no barrier in the main loop
    if constexpr (PRO == 1) {
      normalize_slice();
      __syncthreads();
      point_a();
    }
    // no branch between a wait and the next loads
    for (int b = 0; NVRTC12_REGS ? b * RC < left : b < nb; b += 2) {
      load_batch(b + 1, buf[1], buf[0].w[U - 1].w & zero_rt);
      compute(b, buf[0]);
      load_batch(b + 2, buf[0], buf[1].w[U - 1].w & zero_rt);
      if (NVRTC12_REGS ? (b + 1) * RC < left : b + 1 < nb) compute(b + 1, buf[1]);
    }
  } else {
    // ---- shared ring. Everything a round's copies share is computed once here; a round adds only
    // its offsets (r RC chunks in global memory, its slot's bytes in shared memory), and slots
    // advance by wrap-around adds, not r % S.
    constexpr int NT = NWARPS * 32;               // threads per block
    constexpr int IA = (8 * MB * VECS + NT - 1) / NT;  // activation copies per thread and round, at most
    constexpr int AROWS = NT / VECS;              // rows between a thread's activation copies j and j + 1
    static_assert(NT % VECS == 0 && DEC_A_CP_ROW(NT) == AROWS && DEC_A_CP_COL(NT) == 0,
                  "activation copy j of a thread is copy 0 moved AROWS rows down (the DEC_A_CP map)");
    constexpr u32 SLOT_B = sizeof(Slot);          // bytes per warp slot
    // weights: lane's word of chunk c of a slot at w_dst + c * 512; its source of round r at
    // w_src + r * RC * 32 + c * 32
    const u32 w_dst = smem_addr(&ring[0].w[0][lane]);
    const uint4* w_src = wq + wk * U * 32;
    const unsigned long long w_policy = l2_evict_first_policy();  // weights are read once: evict them first
    // scales and zeros: lane 5 q + p (< 5 U / GCH) copies 16 bytes p of scale block q (p = 4: zeros)
    const int sq = lane / 5, sp = lane % 5;
    const bool s_lane = lane < 5 * (U / GCH);
    const u32 s_dst = smem_addr(sp < 4 ? (void*)&ring[0].s[sq % U][2 * sp] : (void*)&ring[0].z[sq % U][0]);
    const char* s_src = sp < 4 ? (const char*)(scales + sz_row * 8 + 2 * sp) : (const char*)(qzeros + sz_row * 8);
    const u32 s_pitch = sp < 4 ? 8 * sizeof(uint2) : 8 * sizeof(unsigned short);  // bytes per scale / zero row
    // activations: copy j of this thread is DEC_A_CP(threadIdx.x + j NT), row a_row + j AROWS
    const int a_row = DEC_A_CP_ROW((int)threadIdx.x), a_col = DEC_A_CP_COL((int)threadIdx.x);
    const T* a_src = A + (size_t)a_row * K + (size_t)kc0 * 32 + a_col;
    const size_t a_step = (size_t)AROWS * K;      // elements between copies j and j + 1
    const u32 a_dst = smem_addr(A_s + a_row * pitch + a_col);
    const u32 aslot_b = (u32)aslot * sizeof(T);   // bytes per activation slot

    // round r's weights, scales and zeros into this warp's slot at byte offset wo
    auto issue_w = [&](int r, u32 wo) {
      const int rcb = r * RC + wk * U;            // first chunk of this warp's batch in the slice
      const int left = active ? nch_b - rcb : 0;  // its chunks in the slice (the batch is whole if >= U)
      const uint4* ws = w_src + (size_t)r * RC * 32;
#pragma unroll
      for (int c = 0; c < U; ++c) cp_async16(w_dst + wo + c * 512, c < left ? ws + c * 32 : qweight, c < left, w_policy);
      if (s_lane) {
        const int rc = rcb + sq * GCH;
        const u32 kc = (u32)(kc0 + rc);
        const u32 row = cpg == 1 ? kc : __umulhi(kc, gmagic);
        const bool ok = active && rc < nch_b;
        cp_async16(s_dst + wo, ok ? (const void*)(s_src + (size_t)row * s_pitch) : (const void*)qweight, ok);
      }
    };
    // round r's activations into the activation slot at byte offset ao
    auto issue_a = [&](int r, u32 ao) {
      const bool a_ok = r * RC + a_col / 32 < nch_b;
      const T* as = a_src + (size_t)r * RC * 32;
#pragma unroll
      for (int j = 0; j < IA; ++j)
        if (a_row + j * AROWS < M) cp_async16(a_dst + ao + j * AROWS * pitch * (int)sizeof(T), a_ok ? as + j * a_step : A, a_ok);
    };
    // round of slot s: the slot's U chunks (scale blocks from the slot's rows)
    auto compute = [&](int slot) {
      const Slot& sl = ring[slot];
#pragma unroll
      for (int c = 0; c < U; ++c) {
        if (c % GCH == 0) set_group(sl.s[c / GCH][g].x, sl.s[c / GCH][g].y, (u32)sl.z[c / GCH][g]);
        mma_chunk(sl.w[c][lane], c, (u32)slot * aslot_b + c * 64);
      }
    };
    // slot s's bytes: s SLOT_B (weights), s aslot_b (activations). The first S - 1 rounds' weights
    // depend on no earlier kernel: they fly while the previous kernel finishes, the activations
    // after it. (Commit group r then holds rounds 0 .. S - 2's weights and round r's activations:
    // waiting for group r waits for round r's copies and more.)
#pragma unroll
    for (int r = 0; r < S - 1; ++r)
      if (r < nrounds) issue_w(r, r * SLOT_B);
    pdl_wait();
#pragma unroll
    for (int r = 0; r < S - 1; ++r) {
      if (r < nrounds) issue_a(r, r * aslot_b);
      cp_async_commit();
    }
    int cs = 0, is = S - 1;                      // slots of rounds r and r + S - 1
    for (int r = 0; r < nrounds; ++r) {
      cp_async_wait<(S > 1 ? S - 2 : 0)>();  // this thread's copies of round r have landed
      __syncthreads();         // everyone's: round r's activations are visible, slot (r - 1) % S is free
      if (r + S - 1 < nrounds) {
        issue_w(r + S - 1, is * SLOT_B);
        issue_a(r + S - 1, (u32)is * aslot_b);
      }
      cp_async_commit();
      if (r < nb) compute(cs);
      cs = cs + 1 == S ? 0 : cs + 1;
      is = is + 1 == S ? 0 : is + 1;
    }
    cp_async_wait<0>();
  }

  // ---- the KW warps of a tile column add their sums in warp order (fixed: deterministic)
  if constexpr (KW > 1) {
    float* red = reinterpret_cast<float*>(smem_raw);  // reuses the rings' space
    __syncthreads();                                 // every warp is done with the rings
    if (wk > 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            red[DEC_RED_ROW(lane, (wk - 1) * NWN + wn, (i * MB + mb) * 4 + e) * 256 * MB +  // rows of 256 MB floats
                DEC_RED_COL(lane, (wk - 1) * NWN + wn, (i * MB + mb) * 4 + e)] = acc[i][mb][e];
    }
    __syncthreads();
    if (wk > 0) return;
    for (int k2 = 1; k2 < KW; ++k2) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc[i][mb][e] += red[DEC_RED_ROW(lane, (k2 - 1) * NWN + wn, (i * MB + mb) * 4 + e) * 256 * MB +
                                 DEC_RED_COL(lane, (k2 - 1) * NWN + wn, (i * MB + mb) * 4 + e)];
    }
  }
  if (!active) return;

  // ---- epilogue (EPI: C = T(residual + T(sum + bias)), the residual read once per element by the
  // lane that writes it, so C may be the residual itself)
  const int splits = gridDim.y;
  if (splits == 1) {
    T res[2][2][MB][2];  // EPI: the lane's residual, all loaded before any store (one latency, not one each)
    if constexpr (EPI) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int m = 8 * mb + 2 * t + e, n = 32 * tn + 16 * i + g + 8 * h;
              res[i][h][mb][e] = m < M ? __ldcg(residual + (size_t)m * N + n) : D::from_float(0.f);
            }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = 32 * tn + 16 * i + g + 8 * h;
        const float bn = bias != nullptr ? D::to_float(bias[n]) : 0.f;
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int m = 8 * mb + 2 * t + e;
            if (m < M) {
              T y = D::from_float(acc[i][mb][2 * h + e] + bn);
              if constexpr (EPI) y = D::from_float(D::to_float(res[i][h][mb][e]) + D::to_float(y));
              C[(size_t)m * N + n] = y;
            }
          }
      }
    return;
  }
  float* part = partial + (size_t)blockIdx.y * M * N;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = 32 * tn + 16 * i + g + 8 * h;
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = 8 * mb + 2 * t + e;
          if (m < M) part[(size_t)m * N + n] = acc[i][mb][2 * h + e];
        }
    }
  if (splitk_warp_arrive(counters + tn, splits))
    splitk_reduce_strip32<4, EPI == 1>(partial, splits, M, N, 32 * tn, bias, residual, C);
}

// Baseline: AutoAWQ's GEMM design (gemm_forward_4bit_cuda_m16nXk32), with the shared-memory
// write-back the QUICK paper studies. Weights in the AutoAWQ checkpoint layout (pack_awq).
//
// Block: AWQ_THREADS = 64 threads (2 warps), tile BM x BN of C, K in steps of BK = 32.
// Per K step every thread loads packed int32 words (8 columns of one k row), dequantizes them in
// registers, WRITES the fp16/bf16 values back to B_s, and after a barrier each warp reads its BN/2
// columns again with ldmatrix.trans for mma. Activations: plain 16-byte loads + st.shared, ldmatrix.
// Warp w owns columns [w * BN/2, (w+1) * BN/2) and all BM rows.
#include "quant_common.cuh"

using namespace qc;

template <int BM,        // rows of C per block: 16 (AutoAWQ's), 32 or 64
          int BN,        // columns of C per block: 128, or 64 when N is not a multiple of 128
          typename T>    // activations, bias and C: half or __nv_bfloat16 (Dt<T>); scales are fp16
__global__ void __launch_bounds__(AWQ_THREADS, 1)
awq_gemm(const T* __restrict__ A, const int* __restrict__ qweight, const int* __restrict__ qzeros,
         const half* __restrict__ scales, const T* __restrict__ bias, T* __restrict__ C,
         float* __restrict__ partial, int M, int N, int K, int group_size, int chunks_per_split) {
  using D = Dt<T>;
  constexpr int BK = 32, MT = BM / 16, NT = BN / 2 / 8;
  constexpr int B_PASSES = BK / (AWQ_THREADS / (BN / 8));  // rows of B_s written per thread per K step
  __shared__ __align__(16) T A_s[BM][BK + SMEM_PAD];
  __shared__ __align__(16) T B_s[BK][BN + SMEM_PAD];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int kc0 = blockIdx.z * chunks_per_split;
  const int kc1 = min(K / BK, kc0 + chunks_per_split);
  const int ncol = AWQ_B_ST_COL(lane, warp, 0);  // this thread's 8 weight columns within the tile
  const int words_per_row = N / 8;

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

  for (int kc = kc0; kc < kc1; ++kc) {
    const int k0 = kc * BK;
    __syncthreads();
    // Activations: BM x 32 halfs, 16 bytes per thread per pass; rows past M are zero.
#pragma unroll
    for (int i = 0; i < BM / 16; ++i) {
      const int r = AWQ_A_ST_ROW(lane, warp, i), c = AWQ_A_ST_COL(lane, warp, i);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m0 + r < M) v = *reinterpret_cast<const uint4*>(A + (size_t)(m0 + r) * K + k0 + c);
      *reinterpret_cast<uint4*>(&A_s[r][c]) = v;
    }
    // Zero points and scales of this thread's 8 columns for the group of this K step.
    const int grp = k0 / group_size;
    typename D::T2 z[4];
    D::codes8(static_cast<u32>(qzeros[(size_t)grp * words_per_row + (n0 + ncol) / 8]), z);
    const uint4 s8 = *reinterpret_cast<const uint4*>(scales + (size_t)grp * N + n0 + ncol);
    const typename D::Scale s[4] = {D::make_scale(as_half2(s8.x)), D::make_scale(as_half2(s8.y)),
                                    D::make_scale(as_half2(s8.z)), D::make_scale(as_half2(s8.w))};
    typename D::Zero zp[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) zp[e] = D::make_zero(z[e]);
    // Weights: load, dequantize, write back to shared memory (the step QUICK removes).
#pragma unroll
    for (int i = 0; i < B_PASSES; ++i) {
      const int r = AWQ_B_ST_ROW(lane, warp, i);
      const u32 w = static_cast<u32>(qweight[(size_t)(k0 + r) * words_per_row + (n0 + ncol) / 8]);
      u32 h[4];
      D::dequant8(w, zp, s, h);
      *reinterpret_cast<uint4*>(&B_s[r][ncol]) = make_uint4(h[0], h[1], h[2], h[3]);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      u32 a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], &A_s[A_LDSM_ROW(lane, mt, kk)][A_LDSM_COL(lane, mt, kk)]);
#pragma unroll
      for (int p = 0; p < NT / 2; ++p) {
        u32 b[4];
        ldmatrix_x4_trans(b, &B_s[AWQ_B_LDSM_ROW(lane, warp, p, kk)][AWQ_B_LDSM_COL(lane, warp, p, kk)]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          D::mma(acc[mt][2 * p], a[mt], b[0], b[1]);
          D::mma(acc[mt][2 * p + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
  store_tiles<MT, NT>(acc, m0, n0 + warp * (BN / 2), M, N, bias, C, partial);
}

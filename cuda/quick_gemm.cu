// QUICK: weights in the interleaved layout (pack_quick) go straight from global memory into the
// registers that mma consumes; shared memory holds activations only, so the dequantized-weight
// write-back of awq_gemm.cu (and its bank conflicts and barriers) disappears.
//
// Block: QUICK_THREADS = 128 threads (4 warps), tile BM x 128 of C, K in steps of BK = 32 * U.
// Warp w owns columns [32 w, 32 w + 32) = one QUICK tile column and all BM rows. Per 32-deep chunk
// each lane issues ONE 16-byte load of its 4 words; word j dequantizes to the lane's B fragments of
// n8 sub-tile j for the chunk's two k16 steps (see quickcupy/layouts.py for the drawing).
// Pipelines: activations through a STAGES-deep cp.async ring; weights through a ring of WSTAGES
// register sets, loaded WSTAGES - 1 K steps ahead of their use.
#include "quant_common.cuh"

using namespace qc;

template <int U, int GCH>
struct WeightRegs {
  uint4 w[U];                 // packed codes, one 16-byte load per chunk
  uint2 s[U / GCH];           // scales of the 4 sub-tiles (fp16 x 4)
  u32 z[U / GCH];             // zero points of the 4 sub-tiles (nibbles 0..3)
};

template <int BM, int U>
struct QuickTile {
  static constexpr int BK = 32 * U, BN = 128, MT = BM / 16, PITCH = BK + SMEM_PAD;
  static constexpr int A_PASSES = BM * BK / 8 / QUICK_THREADS;
};

template <int BM,       // rows of C per block: 16, 32, 64 or 128 (MT = BM / 16 mma row tiles per warp)
          int U,        // 32-deep K chunks per main-loop step (BK = 32 U); one 16-byte weight load each
          int GCH,      // chunks per scale/zero reload = gcd(group_size / 32, U): divides U
          int STAGES,   // depth of the cp.async ring of activation tiles in shared memory
          int WSTAGES,  // register sets of weights: loads run WSTAGES - 1 steps ahead of their use
          typename T>   // activations, bias and C: half or __nv_bfloat16 (Dt<T>); scales are fp16
__global__ void __launch_bounds__(QUICK_THREADS)
quick_gemm(const T* __restrict__ A, const uint4* __restrict__ qweight,
           const unsigned short* __restrict__ qzeros, const uint2* __restrict__ scales,
           const T* __restrict__ bias, T* __restrict__ C, float* __restrict__ partial,
           int M, int N, int K, int group_size, int chunks_per_split) {
  using Q = QuickTile<BM, U>;
  using D = Dt<T>;
  constexpr int BK = Q::BK, MT = Q::MT, PITCH = Q::PITCH;
  // one untyped extern array for every instance (extern __shared__ arrays of different types clash)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* A_s = reinterpret_cast<T*>(smem_raw);  // [STAGES][BM][PITCH]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * Q::BN, col0 = n0 + 32 * warp;
  const bool warp_active = col0 < N;  // N % 32 == 0, so a warp's tile is all in or all out
  const int chunks = K / 32, groups = K / group_size;
  const int kc0 = blockIdx.z * chunks_per_split;
  const int kc1 = min(chunks, kc0 + chunks_per_split);
  const int iters = (kc1 - kc0 + U - 1) / U;

  // This warp's streams: tile column col0 / 32 of each packed tensor.
  const uint4* wq = qweight + (size_t)(col0 / 32) * chunks * 32 + lane;
  const uint2* sq = scales + (size_t)(col0 / 32) * groups * 8 + g;
  const unsigned short* zq = qzeros + (size_t)(col0 / 32) * groups * 8 + g;

  auto load_a = [&](int it) {  // cp.async of activations for K step `it` into its ring slot
    T* dst = A_s + (it % STAGES) * BM * PITCH;
    const int kbase = (kc0 + it * U) * 32;
#pragma unroll
    for (int i = 0; i < Q::A_PASSES; ++i) {
      const int r = QUICK_A_CP_ROW(lane, warp, i), c = QUICK_A_CP_COL(lane, warp, i);
      const bool ok = (m0 + r < M) && (kbase + c < kc1 * 32);
      const T* src = ok ? A + (size_t)(m0 + r) * K + kbase + c : A;
      cp_async16(dst + r * PITCH + c, src, ok);
    }
  };
  auto load_w = [&](int it, WeightRegs<U, GCH>& regs) {
#pragma unroll
    for (int c = 0; c < U; ++c) {
      const int kc = kc0 + it * U + c;
      const bool ok = warp_active && kc < kc1;
      regs.w[c] = ok ? __ldg(wq + (size_t)kc * 32) : make_uint4(0, 0, 0, 0);
      if (c % GCH == 0) {
        const int grp = kc * 32 / group_size;
        regs.s[c / GCH] = ok ? __ldg(sq + (size_t)grp * 8) : make_uint2(0, 0);
        regs.z[c / GCH] = ok ? __ldg(zq + (size_t)grp * 8) : 0u;
      }
    }
  };

  float acc[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = 0.f;

  auto compute = [&](int it, const WeightRegs<U, GCH>& regs) {
    const T* a_s = A_s + (it % STAGES) * BM * PITCH;
    typename D::Zero zp[4];
    typename D::Scale sc[4];
#pragma unroll
    for (int c = 0; c < U; ++c) {
      if (c % GCH == 0) {  // sub-tile j of this lane: column col0 + 8 j + g
        typename D::T2 z[4];
        D::codes8(regs.z[c / GCH], z);  // pair j = (zero of sub-tile j, 0)
        const u32 s01 = regs.s[c / GCH].x, s23 = regs.s[c / GCH].y;
        sc[0] = D::make_scale(__low2half2(as_half2(s01))); sc[1] = D::make_scale(__high2half2(as_half2(s01)));
        sc[2] = D::make_scale(__low2half2(as_half2(s23))); sc[3] = D::make_scale(__high2half2(as_half2(s23)));
#pragma unroll
        for (int j = 0; j < 4; ++j) zp[j] = D::make_zero(D::low2(z[j]));
      }
      const u32 words[4] = {regs.w[c].x, regs.w[c].y, regs.w[c].z, regs.w[c].w};
      u32 b[4][4];  // b[j][2 s + r]: B register r of k16 step s, sub-tile j
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const typename D::Zero zj[4] = {zp[j], zp[j], zp[j], zp[j]};
        const typename D::Scale sj[4] = {sc[j], sc[j], sc[j], sc[j]};
        D::dequant8(words[j], zj, sj, b[j]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldmatrix_x4(a[mt], a_s + A_LDSM_ROW(lane, mt, 2 * c + s) * PITCH + A_LDSM_COL(lane, mt, 2 * c + s));
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) D::mma(acc[mt][j], a[mt], b[j][2 * s], b[j][2 * s + 1]);
      }
    }
  };

  // One K step: prefetch weights WSTAGES - 1 steps ahead, wait for this step's activations,
  // refill the activation ring, compute.
  auto step = [&](int it, const WeightRegs<U, GCH>& cur, WeightRegs<U, GCH>& ahead) {
    if (it + WSTAGES - 1 < iters) load_w(it + WSTAGES - 1, ahead);
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (it + STAGES - 1 < iters) load_a(it + STAGES - 1);
    cp_async_commit();
    if (warp_active) compute(it, cur);
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < iters) load_a(s);
    cp_async_commit();
  }
  WeightRegs<U, GCH> regs[WSTAGES];  // indexed only by unrolled constants: stays in registers
#pragma unroll
  for (int s = 0; s < WSTAGES - 1; ++s) load_w(s, regs[s]);
  for (int it = 0; it < iters; it += WSTAGES) {
#pragma unroll
    for (int u = 0; u < WSTAGES; ++u)
      if (it + u < iters) step(it + u, regs[u], regs[(u + WSTAGES - 1) % WSTAGES]);
  }
  if (warp_active) store_tiles<MT, 4>(acc, m0, col0, M, N, bias, C, partial);
}

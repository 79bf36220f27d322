// QUICK for Hopper: the same interleaved weights (pack_quick) as quick_gemm.cu, but multiplied with
// wgmma. The product is computed transposed, C^T (N x M) = W (N x K) . x^T (K x M), so the 4-bit
// weights are the wgmma A operand, which may live in registers: each lane loads its packed weights
// from global memory with ONE 16-byte load per 32-deep chunk and dequantizes them in registers into
// exactly the A fragments wgmma reads. No dequantized weight is written to shared memory; shared
// memory holds only the activations (the B operand, N = tokens), in the 128-byte swizzle that the
// wgmma descriptor reads without bank conflicts.
//
// Block: one warpgroup (QUICK_SM90_THREADS = 128); tile 128 output features x BT tokens, K in steps
// of 64. Warp w owns the QUICK tile column of 32 features at 32 w, and the 4 words of a lane's
// 16-byte load are the A fragments of two wgmma row blocks: words (0, 1) -> rows 16 w .. +15 of
// block 0 (features 32 w + 0..15), words (2, 3) -> the same rows of block 1 (features 32 w + 16..31);
// half2 2s + r of a word is register r of k16 step s (quickcupy/layouts.py draws it). So per
// 64-deep step the warpgroup issues 2 blocks x 4 k16 steps = 8 wgmma.m64nBTk16, 64 x BT each.
// Pipelines: activations through a STAGES-deep cp.async ring; weights two K steps ahead in
// registers. A step waits for its own wgmmas before the next dequantizes (ptxas serializes every
// wgmma if registers they read are written while an earlier group is in flight: warning C7513), so
// two blocks share an SM and fill each other's gaps.
#include "wgmma.cuh"

using namespace qc;

constexpr int SM90_BK = 64;                      // K per main-loop step: one 128-byte swizzle row
constexpr int SM90_U = SM90_BK / 32;             // 32-deep QUICK chunks per step

struct Sm90Weights {
  uint4 w[SM90_U];           // packed codes, one 16-byte load per chunk
  uint2 s[SM90_U];           // scales of the lane's 4 sub-tiles, per chunk (reloaded every GCH)
  u32 z[SM90_U];             // zero points of the 4 sub-tiles (nibbles 0..3)
};

template <int BT,       // tokens per block = wgmma N: 64 or 128
          int STAGES,   // depth of the cp.async ring of activation tiles (BT x 64 fp16 each)
          int GCH>      // chunks per scale/zero reload = gcd(group_size / 32, 2): 1 or 2
__global__ void __launch_bounds__(QUICK_SM90_THREADS, 2)
quick_sm90(const half* __restrict__ A, const uint4* __restrict__ qweight,
           const unsigned short* __restrict__ qzeros, const uint2* __restrict__ scales,
           const half* __restrict__ bias, half* __restrict__ C, float* __restrict__ partial,
           int M, int N, int K, int group_size, int chunks_per_split) {
  constexpr int SLOT = BT * SM90_BK * 2;         // bytes of one activation tile
  constexpr int CP_PASSES = BT * 8 / QUICK_SM90_THREADS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const u32 ring = (smem_addr(smem_raw) + 1023) & ~1023u;   // swizzled tiles start on 1024 bytes

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int m0 = blockIdx.x * BT;
  const int col0 = blockIdx.y * QUICK_SM90_THREADS + 32 * warp;   // 32 features per warp
  const bool warp_active = col0 < N;             // inactive warps still join the wgmmas (zeros)
  const int chunks = K / 32, groups = K / group_size;
  const int kc0 = blockIdx.z * chunks_per_split;
  const int kc1 = min(chunks, kc0 + chunks_per_split);
  const int iters = (kc1 - kc0 + SM90_U - 1) / SM90_U;

  const uint4* wq = qweight + (size_t)(col0 / 32) * chunks * 32 + lane;
  const uint2* sq = scales + (size_t)(col0 / 32) * groups * 8 + g;
  const unsigned short* zq = qzeros + (size_t)(col0 / 32) * groups * 8 + g;

  auto load_x = [&](int it) {  // rows m0.., K step `it` -> ring slot, 16-byte chunks swizzled
    const u32 slot = ring + (it % STAGES) * SLOT;
    const int kbase = (kc0 + it * SM90_U) * 32;
#pragma unroll
    for (int i = 0; i < CP_PASSES; ++i) {
      const int idx = i * QUICK_SM90_THREADS + tid, r = idx / 8, c = idx % 8;
      const bool ok = (m0 + r < M) && (kbase + 8 * c < kc1 * 32);
      const half* src = ok ? A + (size_t)(m0 + r) * K + kbase + 8 * c : A;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                   :: "r"(slot + sw128_offset(r, c)), "l"(src), "r"(ok ? 16 : 0));
    }
  };
  auto load_w = [&](int it, Sm90Weights& regs) {
#pragma unroll
    for (int c = 0; c < SM90_U; ++c) {
      const int kc = kc0 + it * SM90_U + c;
      const bool ok = warp_active && kc < kc1;
      regs.w[c] = ok ? __ldg(wq + (size_t)kc * 32) : make_uint4(0, 0, 0, 0);
      if (c % GCH == 0) {
        const int grp = kc * 32 / group_size;
        regs.s[c] = ok ? __ldg(sq + (size_t)grp * 8) : make_uint2(0, 0);
        regs.z[c] = ok ? __ldg(zq + (size_t)grp * 8) : 0u;
      }
    }
  };
  // A fragments of one K step: a[b][s] = wgmma row block b, k16 step s (chunk s / 2).
  auto dequant = [&](const Sm90Weights& regs, u32 (&a)[2][2 * SM90_U][4]) {
#pragma unroll
    for (int c = 0; c < SM90_U; ++c) {
      const int cs = c - c % GCH;                // chunk whose scales/zeros apply
      half2 z[4];
      int4x8_to_half2x4(regs.z[cs], z);          // half2 j = (zero of sub-tile j, 0)
      const half2 s01 = as_half2(regs.s[cs].x), s23 = as_half2(regs.s[cs].y);
      const half2 sc[4] = {__low2half2(s01), __high2half2(s01), __low2half2(s23), __high2half2(s23)};
      const u32 words[4] = {regs.w[c].x, regs.w[c].y, regs.w[c].z, regs.w[c].w};
      u32 h[4][4];                               // h[j][2 s + r]: sub-tile j, k16 step s, register r
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const Zero2 zj = make_zero2(__low2half2(z[j]));
        const Zero2 zz[4] = {zj, zj, zj, zj};
        const half2 ss[4] = {sc[j], sc[j], sc[j], sc[j]};
        dequant_int4x8(words[j], zz, ss, h[j]);
      }
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          u32 (&f)[4] = a[b][2 * c + s];         // mma A: (row g, k lo), (g + 8, lo), (g, hi), (g + 8, hi)
          f[0] = h[2 * b][2 * s];
          f[1] = h[2 * b + 1][2 * s];
          f[2] = h[2 * b][2 * s + 1];
          f[3] = h[2 * b + 1][2 * s + 1];
        }
    }
  };

  float acc[2][BT / 2];
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int i = 0; i < BT / 2; ++i) acc[b][i] = 0.f;

  auto mma_step = [&](int it, const u32 (&a)[2][2 * SM90_U][4]) {
    const u32 slot = ring + (it % STAGES) * SLOT;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 2 * SM90_U; ++s)
#pragma unroll
      for (int b = 0; b < 2; ++b) wgmma_rs<BT>(acc[b], a[b][s], wgmma_desc_sw128(slot + 32 * s));
    wgmma_commit();
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < iters) load_x(s);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  Sm90Weights wr[2];
  load_w(0, wr[0]);
  if (1 < iters) load_w(1, wr[1]);

  // Step `it`: dequantize its weights and load those of it + 2; wait for its activations; past the
  // barrier every warp has waited for the wgmmas of step it - 1, so that step's slot is refilled
  // with step it + STAGES - 1; issue 8 wgmmas and wait for them.
  auto step = [&](int it, Sm90Weights& w) {
    u32 af[2][2 * SM90_U][4];
    dequant(w, af);
    if (it + 2 < iters) load_w(it + 2, w);
    asm volatile("cp.async.wait_group %0;\n" :: "n"(STAGES - 2));
    fence_proxy_async_shared();
    __syncthreads();
    if (it + STAGES - 1 < iters) load_x(it + STAGES - 1);
    asm volatile("cp.async.commit_group;\n" ::);
    mma_step(it, af);
    wgmma_wait<0>();
  };
  for (int it = 0; it < iters; it += 2) {
    step(it, wr[0]);
    if (it + 1 < iters) step(it + 1, wr[1]);
  }

  // Epilogue: lane holds D rows (features) 32 warp + 16 b + g (+ 8), columns (tokens) 8 i + 2 t (+ 1).
  if (!warp_active) return;
  const bool split = gridDim.z > 1;
  float* part = partial + (size_t)blockIdx.z * M * N;
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = col0 + 16 * b + 8 * h + g;
      const float bv = (!split && bias != nullptr) ? __half2float(bias[col]) : 0.f;
#pragma unroll
      for (int i = 0; i < BT / 8; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row = m0 + 8 * i + 2 * t + e;
          if (row >= M) continue;
          const float v = acc[b][4 * i + 2 * h + e];
          if (split) part[(size_t)row * N + col] = v;
          else C[(size_t)row * N + col] = __float2half_rn(v + bv);
        }
    }
}

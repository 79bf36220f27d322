// QUICK for Hopper: the same interleaved weights (pack_quick) as quick_gemm.cu, but multiplied with
// wgmma. The product is computed transposed, C^T (N x M) = W (N x K) . x^T (K x M), so the 4-bit
// weights are the wgmma A operand, which may live in registers: each lane dequantizes the 16 packed
// bytes QUICK put together for it (one 32-deep chunk of its tile) into exactly the A fragments
// wgmma reads. No dequantized weight is ever written to shared memory: shared memory holds the
// activations (the B operand, N = tokens) in the 128-byte swizzle the wgmma descriptor reads
// without bank conflicts, and the weights still packed, as they arrive (Marlin's way of streaming).
//
// Block: QUICK_SM90_THREADS = 2 warpgroups; tile 256 output features x BT tokens, K in steps of 64.
// Wide feature tiles and 4-bit weights keep the L2 -> SM traffic low: per step a block reads
// BT x 128 bytes of activations and 256 x 32 bytes of weights (at 128 x 256 the other way round the
// activation copies alone hit the L2 bandwidth, measured). Warpgroup wg owns features
// [128 wg, +128); its warp w owns the QUICK tile column of 32 features at 32 w, and the 4 words of
// a lane's 16 bytes per chunk are the A fragments of two wgmma row blocks: words (0, 1) -> rows
// 16 w .. +15 of block 0 (features 32 w + 0..15), words (2, 3) -> the same rows of block 1
// (features 32 w + 16..31); half2 2s + r of a word is register r of k16 step s
// (quickcupy/layouts.py draws it). Per 64-deep step a warpgroup issues 2 blocks x 4 k16 steps =
// 8 wgmma.m64nBTk16.
//
// Pipeline: one STAGES-deep ring of K steps, each slot holding the step's activation tile (one TMA
// box, swizzled by the copy engine), packed weights, scales and zeros (cp.async, every warp its
// own), handed over with mbarriers ("full" when a slot's bytes landed, "empty" when both warpgroups
// are done with it), so the two groups run out of step. Within a group, the dequantization of step it + 1 (into a second set of
// A registers) runs while the wgmmas of step it are in flight; exactly one wgmma group is ever in
// flight, which keeps ptxas from serializing them (warning C7513).
#include "wgmma.cuh"

using namespace qc;

constexpr int SM90_WG = 128;                     // threads per warpgroup
constexpr int SM90_BK = 64;                      // K per main-loop step: one 128-byte swizzle row
constexpr int SM90_U = SM90_BK / 32;             // 32-deep QUICK chunks per step
constexpr int SM90_WARPS = QUICK_SM90_THREADS / 32;
// Per warp and chunk of a slot: the lanes' packed weights (32 x 16 bytes), then per group used by
// the step: the scales of the warp's tile (8 g x 4 sub-tiles, fp16) and its zeros (8 halfwords).
constexpr int SM90_W_BYTES = SM90_WARPS * SM90_U * 512;
constexpr int SM90_SZ_BYTES = 80;                // 64 bytes of scales + 16 of zeros
constexpr int SM90_SZ_REGION = 2048;             // SM90_U x SM90_WARPS x 80, rounded to 1 KB

template <int BT,       // tokens per block = wgmma N: 64 or 128
          int STAGES,   // slots of the ring (each: BT x 64 fp16 activations + the step's weights)
          int GCH,      // chunks per scale/zero reload = gcd(group_size / 32, 2): 1 or 2
          typename T>   // activations, bias and C: half or __nv_bfloat16 (Dt<T>); scales are fp16
__global__ void __launch_bounds__(QUICK_SM90_THREADS, 1)
quick_sm90(const __grid_constant__ TensorMap x_map,   // x as (M, K) of T, box BT x 64, 128B swizzle
           const T* __restrict__ A, const uint4* __restrict__ qweight,
           const unsigned short* __restrict__ qzeros, const uint2* __restrict__ scales,
           const T* __restrict__ bias, T* __restrict__ C, float* __restrict__ partial,
           int M, int N, int K, int group_size, int chunks_per_split) {
  using D = Dt<T>;
  constexpr int X_BYTES = BT * SM90_BK * 2;      // activation tile of a slot (first: 1 KB aligned)
  constexpr int SLOT = X_BYTES + SM90_W_BYTES + SM90_SZ_REGION;
  constexpr int BN = 2 * SM90_WG;                // output features per block (2 groups x 128)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const u32 base = smem_addr(smem_raw);
  const u32 ring = (base + 16 * STAGES + 1023) & ~1023u;   // swizzled tiles start on 1024 bytes
  const unsigned char* ring_ptr = smem_raw + (ring - base);
  const u32 full = base, empty = base + 8 * STAGES;        // STAGES mbarriers each

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  // Raster: consecutive blocks take consecutive feature tiles of one token tile, so a wave shares
  // its activations and the whole weight stays in L2 across waves.
  const int tiles_n = (N + BN - 1) / BN, tile = blockIdx.x + gridDim.x * blockIdx.y;
  const int m0 = (tile / tiles_n) * BT;
  const int col0 = (tile % tiles_n) * BN + 32 * warp;   // the warp's QUICK tile column
  const bool warp_active = col0 < N;             // inactive warps still join their group's wgmmas
  const int chunks = K / 32, groups = K / group_size, chunks_per_group = group_size / 32;
  const int kc0 = blockIdx.z * chunks_per_split;
  const int kc1 = min(chunks, kc0 + chunks_per_split);
  const int iters = (kc1 - kc0 + SM90_U - 1) / SM90_U;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, QUICK_SM90_THREADS + 1);   // thread 0's expect_tx + every thread's copies
      mbar_init(empty + 8 * s, QUICK_SM90_THREADS);      // one arrival per thread once it is done with it
    }
  }
  __syncthreads();

  // This warp's streams: tile column col0 / 32 of each packed tensor.
  const uint4* wq = qweight + (size_t)(col0 / 32) * chunks * 32 + lane;
  const uint4* szq = lane < 4 ? reinterpret_cast<const uint4*>(scales + (size_t)(col0 / 32) * groups * 8) + lane
                              : reinterpret_cast<const uint4*>(qzeros + (size_t)(col0 / 32) * groups * 8);
  const int sz_stride = lane < 4 ? 4 : 1;        // 16-byte units per group: 64 bytes of scales, 16 of zeros

  // K step `it` -> its slot: thread 0 brings the activation box through TMA (rows past M and
  // columns past K arrive as zeros; one large copy, off the LSU), every warp its own tile's packed
  // weights (one 16-byte cp.async per lane and chunk) and per reloaded chunk its scales and zeros
  // (lanes 0..4). The full barrier waits for thread 0's bytes and every thread's copies.
  auto load_step = [&](int it) {
    const u32 slot = ring + (it % STAGES) * SLOT, bar = full + 8 * (it % STAGES);
    const int kc = kc0 + it * SM90_U;
    if (tid == 0) {
      mbar_arrive_expect_tx(bar, X_BYTES);
      tma_load_2d(slot, &x_map, kc * 32, m0, bar);
    }
#pragma unroll
    for (int c = 0; c < SM90_U; ++c) {
      const bool ok = warp_active && kc + c < kc1;
      cp_async16(slot + X_BYTES + ((warp * SM90_U + c) * 32 + lane) * 16, ok ? wq + (size_t)(kc + c) * 32 : wq, ok);
      if (c % GCH == 0 && lane < 5) {
        const int grp = (kc + c) / chunks_per_group;
        cp_async16(slot + X_BYTES + SM90_W_BYTES + (c * SM90_WARPS + warp) * SM90_SZ_BYTES + 16 * lane,
             ok ? szq + (size_t)grp * sz_stride : szq, ok);
      }
    }
    cp_async_mbar_arrive(bar);
  };
  // A fragments of step `it` from its slot: a[b][s] = wgmma row block b, k16 step s (chunk s / 2).
  auto dequant = [&](int it, u32 (&a)[2][2 * SM90_U][4]) {
    const unsigned char* slot = ring_ptr + (it % STAGES) * SLOT;
#pragma unroll
    for (int c = 0; c < SM90_U; ++c) {
      const unsigned char* sz = slot + X_BYTES + SM90_W_BYTES + ((c - c % GCH) * SM90_WARPS + warp) * SM90_SZ_BYTES;
      const uint2 s4 = *reinterpret_cast<const uint2*>(sz + 8 * g);
      typename D::T2 z[4];
      D::codes8(*reinterpret_cast<const unsigned short*>(sz + 64 + 2 * g), z);   // pair j = (zero j, 0)
      const half2 s01 = as_half2(s4.x), s23 = as_half2(s4.y);
      const typename D::Scale sc[4] = {D::make_scale(__low2half2(s01)), D::make_scale(__high2half2(s01)),
                                       D::make_scale(__low2half2(s23)), D::make_scale(__high2half2(s23))};
      const uint4 wv = *reinterpret_cast<const uint4*>(slot + X_BYTES + ((warp * SM90_U + c) * 32 + lane) * 16);
      const u32 words[4] = {wv.x, wv.y, wv.z, wv.w};
      u32 h[4][4];                               // h[j][2 s + r]: sub-tile j, k16 step s, register r
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const typename D::Zero zj = D::make_zero(D::low2(z[j]));
        const typename D::Zero zz[4] = {zj, zj, zj, zj};
        const typename D::Scale sj[4] = {sc[j], sc[j], sc[j], sc[j]};
        D::dequant8(words[j], zz, sj, h[j]);
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
  auto wait_full = [&](int it) { mbar_wait(full + 8 * (it % STAGES), (it / STAGES) & 1); };

  float acc[2][BT / 2];
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int i = 0; i < BT / 2; ++i) acc[b][i] = 0.f;

  for (int s = 0; s < STAGES - 2 && s < iters; ++s) load_step(s);

  // Step `it` of one warpgroup (its A fragments `cur` are ready): issue 8 wgmmas; while they run,
  // dequantize step it + 1 into `next` and refill the slot of step it - 2 with step
  // it + STAGES - 2 once both groups are done with it (the other group may be two steps behind);
  // then wait for the wgmmas and mark step it's slot empty.
  auto step = [&](int it, const u32 (&cur)[2][2 * SM90_U][4], u32 (&next)[2][2 * SM90_U][4]) {
    const u32 x = ring + (it % STAGES) * SLOT;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 2 * SM90_U; ++s)
#pragma unroll
      for (int b = 0; b < 2; ++b) wgmma_rs<BT, T>(acc[b], cur[b][s], wgmma_desc_sw128(x + 32 * s));
    wgmma_commit();
    if (it + 1 < iters) {
      wait_full(it + 1);
      dequant(it + 1, next);
    }
    if (it + STAGES - 2 < iters) {
      if (it >= 2) mbar_wait(empty + 8 * ((it - 2) % STAGES), ((it - 2) / STAGES) & 1);
      load_step(it + STAGES - 2);                // steps STAGES - 2, STAGES - 1: fresh slots
    }
    wgmma_wait<0>();
    mbar_arrive(empty + 8 * (it % STAGES));
  };
  u32 a0[2][2 * SM90_U][4], a1[2][2 * SM90_U][4];
  if (iters > 0) {
    wait_full(0);
    dequant(0, a0);
  }
  for (int it = 0; it < iters; it += 2) {
    step(it, a0, a1);
    if (it + 1 < iters) step(it + 1, a1, a0);
  }

  // Epilogue: lane holds D rows (features) col0 + 16 b + g (+ 8), columns (tokens) 8 i + 2 t (+ 1).
  if (!warp_active) return;
  const bool split = gridDim.z > 1;
  float* part = partial + (size_t)blockIdx.z * M * N;
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = col0 + 16 * b + 8 * h + g;
      const float bv = (!split && bias != nullptr) ? D::to_float(bias[col]) : 0.f;
#pragma unroll
      for (int i = 0; i < BT / 8; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row = m0 + 8 * i + 2 * t + e;
          if (row >= M) continue;
          const float v = acc[b][4 * i + 2 * h + e];
          if (split) part[(size_t)row * N + col] = v;
          else C[(size_t)row * N + col] = D::from_float(v + bv);
        }
    }
}

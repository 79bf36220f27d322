// QUICK for Hopper: the same interleaved weights (pack_quick) as quick_gemm.cu, but multiplied with
// wgmma. The product is computed transposed, C^T (N x M) = W (N x K) . x^T (K x M), so the 4-bit
// weights are the wgmma A operand, which may live in registers: each lane dequantizes the 16 packed
// bytes QUICK put together for it (one 32-deep chunk of its tile) into exactly the A fragments
// wgmma reads. No dequantized weight is ever written to shared memory: shared memory holds the
// activations (the B operand, N = tokens) in the 128-byte swizzle the wgmma descriptor reads
// without bank conflicts, and the weights still packed, as they arrive (Marlin's way of streaming).
//
// Block: THREADS / 128 warpgroups of BN / (16 x warps) = RB wgmma row blocks (m64) each, BN output
// features x BT tokens, K in steps of 64. Two ways to give a warp its features:
//   RB = 2 (BN = 256, 2 warpgroups): warpgroup wg owns features [128 wg, +128); its warp w owns the
//     QUICK tile column of 32 features at 32 w, and the 4 words of a lane's 16 bytes per chunk are
//     the A fragments of two wgmma row blocks: words (0, 1) -> rows 16 w .. +15 of block 0
//     (features 32 w + 0..15), words (2, 3) -> the same rows of block 1 (features 32 w + 16..31);
//     per 64-deep step a warpgroup issues 2 blocks x 4 k16 steps = 8 wgmma.m64nBTk16.
//   RB = 1 (BN = 64 x warpgroups): one row block per warpgroup; warp w owns half w % 2 of tile
//     column w / 2, i.e. words (2 (w % 2), 2 (w % 2) + 1) of each lane's 16 bytes (features
//     32 (w / 2) + 16 (w % 2) + 0..15), an 8-byte read; per step 4 wgmma.m64nBTk16: half the A
//     fragments and half the dequantization per warp of RB = 2 (126 instead of 188 SASS instructions
//     per step for a warp that does not issue the copies at BT = 256 against 128).
// Wide feature tiles keep the activation traffic low: per step a block reads BT x 128 bytes of
// activations and BN x 32 bytes of weights (a cp.async 128 x 256 tile the other way round hit the L2
// bandwidth, measured). The plan's tiles (quickcupy/registry.py): 64 and 128 tokens x 256 features
// in 4 warpgroups, 256 tokens x 128 features in 2 (results/h100/sm90_rowblock.txt,
// results/h100/sm90_warpgroups_probe.txt).
// Half2 2s + r of a word is register r of k16 step s (quickcupy/layouts.py draws it).
//
// Pipeline: one STAGES-deep ring of K steps, each slot holding the step's activation tile, packed
// weights, scales and zeros, every one a single TMA box issued by one thread (the packed tensors as
// 2-D arrays of tile columns: one row per 32-feature QUICK tile column, so a block's tile columns
// of a K step are one box of BN / 32 rows; see quickcupy.kernels.gemm_tensor_maps), handed over with
// mbarriers ("full" when a slot's bytes landed, "empty" when every warpgroup is done with it), so
// the groups run out of step and no consumer thread spends instructions on copies. Within a
// group, the dequantization of step it + 1 (into a second set of A registers) runs while the wgmmas
// of step it are in flight; exactly one wgmma group is ever in flight, which keeps ptxas from
// serializing them (warning C7513).
#include "wgmma.cuh"

using namespace qc;

constexpr int SM90_WG = 128;                     // threads per warpgroup
constexpr int SM90_BK = 64;                      // K per main-loop step: one 128-byte swizzle row
constexpr int SM90_U = SM90_BK / 32;             // 32-deep QUICK chunks per step
// A slot after its activations: the block's packed weights, [tile column][chunk][lane][16 bytes];
// then per group the step uses (GPS = SM90_U / GCH of them) the scales of each tile column (8 g x 4
// sub-tiles, fp16), [tile column][group][64 bytes]; then its zeros (8 halfwords), [tile
// column][group][16 bytes]. Every region starts on 128 bytes, as TMA wants.
constexpr int SM90_SZ_REGION = 2048;             // scales and zeros of up to 2 groups, rounded to 1 KB

template <int BT,       // tokens per block = wgmma N: 64, 128 or 256
          int BN,       // output features per block: 256 or 128
          int THREADS,  // 256 or 512: 2 or 4 warpgroups (RB = BN / (16 x warps) row blocks each)
          int STAGES,   // slots of the ring (each: BT x 64 fp16 activations + the step's weights)
          int GCH,      // chunks per scale/zero reload = gcd(group_size / 32, 2): 1 or 2
          typename T>   // activations, bias and C: half or __nv_bfloat16 (Dt<T>); scales are fp16
__global__ void __launch_bounds__(THREADS, 1)
quick_sm90(const __grid_constant__ TensorMap x_map,   // x as (M, K) of T, box BT x 64, 128B swizzle
           const __grid_constant__ TensorMap w_map,   // qweight: a row of K / 32 x 512 bytes per tile column, box 8 x 1 KB
           const __grid_constant__ TensorMap s_map,   // scales: a row of groups x 64 bytes per tile column, box 8 x GPS 64
           const __grid_constant__ TensorMap z_map,   // qzeros: a row of groups x 16 bytes per tile column, box 8 x GPS 16
           const T* __restrict__ A, const uint4*, const unsigned short*, const uint2*,   // read through the maps
           const T* __restrict__ bias, T* __restrict__ C, float* __restrict__ partial,
           int M, int N, int K, int group_size, int chunks_per_split) {
  using D = Dt<T>;
  constexpr int WARPS = THREADS / 32;
  constexpr int RB = BN / (16 * WARPS);          // wgmma row blocks (m64) per warpgroup
  static_assert(RB == 1 || RB == 2, "a warp owns a whole or half a QUICK tile column");
  constexpr int TCOLS = BN / 32;                 // QUICK tile columns per block
  constexpr int X_BYTES = BT * SM90_BK * 2;      // activation tile of a slot (first: 1 KB aligned)
  constexpr int W_BYTES = TCOLS * SM90_U * 512;  // packed weights of a slot
  constexpr int GPS = SM90_U / GCH;               // groups a step reads scales and zeros of
  constexpr int S_BYTES = TCOLS * GPS * 64, Z_BYTES = TCOLS * GPS * 16;
  static_assert(S_BYTES + Z_BYTES <= SM90_SZ_REGION, "scales and zeros overflow their region");
  constexpr int SLOT = X_BYTES + W_BYTES + SM90_SZ_REGION;
  static_assert(SLOT % 1024 == 0, "swizzled activation tiles start on 1024 bytes");
  constexpr u32 SLOT_TX = X_BYTES + W_BYTES + S_BYTES + Z_BYTES;   // bytes the 4 boxes bring
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
  const int tcol0 = (tile % tiles_n) * TCOLS;           // the block's first QUICK tile column
  const int tcw = RB == 2 ? warp : warp / 2;            // the warp's tile column in the block
  const int hb = RB == 2 ? 0 : warp % 2;                // RB = 1: the warp's half of it (words 2 hb, +1)
  const int col0 = (tcol0 + tcw) * 32 + 16 * hb;        // the warp's first output feature
  const bool warp_active = col0 < N;             // inactive warps still join their group's wgmmas
  const int chunks = K / 32, chunks_per_group = group_size / 32;
  const int kc0 = blockIdx.z * chunks_per_split;
  const int kc1 = min(chunks, kc0 + chunks_per_split);
  const int iters = (kc1 - kc0 + SM90_U - 1) / SM90_U;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 1);                        // the issuing thread's expect_tx
      mbar_init(empty + 8 * s, THREADS);                 // one arrival per thread once it is done with it
    }
  }
  __syncthreads();

  // K step `it` -> its slot, issued by one thread: four TMA boxes, all completing on the slot's full
  // barrier: the activations (rows past M and columns past K arrive as zeros), the block's TCOLS
  // tile columns of packed weights for the step's chunks, and the scales and zeros of the step's groups
  // (tile columns past N and chunks past K arrive as zeros too).
  auto load_step = [&](int it) {
    const u32 slot = ring + (it % STAGES) * SLOT, bar = full + 8 * (it % STAGES);
    const int kc = kc0 + it * SM90_U, grp = kc / chunks_per_group;
    mbar_arrive_expect_tx(bar, SLOT_TX);
    tma_load_2d(slot, &x_map, kc * 32, m0, bar);
    tma_load_2d(slot + X_BYTES, &w_map, kc * 64, tcol0, bar);                     // 8-byte units
    tma_load_2d(slot + X_BYTES + W_BYTES, &s_map, grp * 8, tcol0, bar);
    tma_load_2d(slot + X_BYTES + W_BYTES + S_BYTES, &z_map, grp * 2, tcol0, bar);
  };
  // A fragments of step `it` from its slot: a[b][s] = wgmma row block b, k16 step s (chunk s / 2).
  auto dequant = [&](int it, u32 (&a)[RB][2 * SM90_U][4]) {
    const unsigned char* slot = ring_ptr + (it % STAGES) * SLOT;
    const int kc = kc0 + it * SM90_U;
#pragma unroll
    for (int c = 0; c < SM90_U; ++c) {
      // this warp's row of scales and zeros, at the chunk's group among the step's (one group when
      // GCH = 2; with GCH = 1 the two chunks share the first when group_size / 32 is odd and above 1)
      const int gi = tcw * GPS + (GCH == SM90_U ? 0 : (kc + c) / chunks_per_group - kc / chunks_per_group);
      const unsigned char* sg = slot + X_BYTES + W_BYTES + gi * 64 + 8 * g;   // sub-tiles 0..3's scales
      const unsigned char* wl = slot + X_BYTES + ((tcw * SM90_U + c) * 32 + lane) * 16;
      typename D::T2 z[4];                       // pair j = (zero 2 hb + j, 0)
      D::codes8(*reinterpret_cast<const unsigned short*>(slot + X_BYTES + W_BYTES + S_BYTES + gi * 16 + 2 * g) >> (8 * hb), z);
      u32 words[2 * RB];                         // the lane's words 2 hb .. 2 hb + 2 RB - 1
      half2 s2[RB];                              // their scales, two a half2
      if constexpr (RB == 2) {
        const uint4 wv = *reinterpret_cast<const uint4*>(wl);
        const uint2 s4 = *reinterpret_cast<const uint2*>(sg);
        words[0] = wv.x, words[1] = wv.y, words[2] = wv.z, words[3] = wv.w;
        s2[0] = as_half2(s4.x), s2[RB - 1] = as_half2(s4.y);
      } else {
        const uint2 wv = *reinterpret_cast<const uint2*>(wl + 8 * hb);
        words[0] = wv.x, words[1] = wv.y;
        s2[0] = as_half2(*reinterpret_cast<const u32*>(sg + 4 * hb));
      }
      u32 h[2 * RB][4];                          // h[j][2 s + r]: word j, k16 step s, register r
#pragma unroll
      for (int j = 0; j < 2 * RB; ++j) {
        const typename D::Zero zj = D::make_zero(D::low2(z[j]));
        const typename D::Zero zz[4] = {zj, zj, zj, zj};
        const typename D::Scale s = D::make_scale(j % 2 ? __high2half2(s2[j / 2]) : __low2half2(s2[j / 2]));
        const typename D::Scale sj[4] = {s, s, s, s};
        D::dequant8(words[j], zz, sj, h[j]);
      }
#pragma unroll
      for (int b = 0; b < RB; ++b)
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

  float acc[RB][BT / 2];
#pragma unroll
  for (int b = 0; b < RB; ++b)
#pragma unroll
    for (int i = 0; i < BT / 2; ++i) acc[b][i] = 0.f;

  if (tid == 0)
    for (int s = 0; s < STAGES - 2 && s < iters; ++s) load_step(s);

  // Step `it` of one warpgroup (its A fragments `cur` are ready): issue 4 RB wgmmas; while they run,
  // dequantize step it + 1 into `next` and refill the slot of step it - 2 with step
  // it + STAGES - 2 once every group is done with it (another group may be two steps behind; lane
  // 0 of warp it % WARPS issues it, so the waits and copies rotate over the warps); then wait for the
  // wgmmas and mark step it's slot empty.
  auto step = [&](int it, const u32 (&cur)[RB][2 * SM90_U][4], u32 (&next)[RB][2 * SM90_U][4]) {
    const u32 x = ring + (it % STAGES) * SLOT;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 2 * SM90_U; ++s)
#pragma unroll
      for (int b = 0; b < RB; ++b) wgmma_rs<BT, T>(acc[b], cur[b][s], wgmma_desc_sw128(x + 32 * s));
    wgmma_commit();
    if (it + 1 < iters) {
      wait_full(it + 1);
      dequant(it + 1, next);
    }
    if (it + STAGES - 2 < iters && tid == 32 * (it % WARPS)) {
      if (it >= 2) mbar_wait(empty + 8 * ((it - 2) % STAGES), ((it - 2) / STAGES) & 1);
      load_step(it + STAGES - 2);                // steps STAGES - 2, STAGES - 1: fresh slots
    }
    wgmma_wait<0>();
    mbar_arrive(empty + 8 * (it % STAGES));
  };
  u32 a0[RB][2 * SM90_U][4], a1[RB][2 * SM90_U][4];
  if (iters > 0) {
    wait_full(0);
    dequant(0, a0);
  }
  for (int it = 0; it < iters; it += 2) {
    step(it, a0, a1);
    if (it + 1 < iters) step(it + 1, a1, a0);
  }

  // Epilogue: lane holds D rows (features) col0 + 16 b + 8 h + g, columns (tokens) 8 i + 2 t (+ 1).
  if (!warp_active) return;
  const bool split = gridDim.z > 1;
  float* part = partial + (size_t)blockIdx.z * M * N;
#pragma unroll
  for (int b = 0; b < RB; ++b)
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

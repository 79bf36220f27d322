// QUICK for Hopper: the same interleaved weights (pack_quick) as quick_gemm.cu, but multiplied with
// wgmma. The product is computed transposed, C^T (N x M) = W (N x K) . x^T (K x M), so the 4-bit
// weights are the wgmma A operand, which may live in registers: each lane loads its packed weights
// from global memory with ONE 16-byte load per 32-deep chunk and dequantizes them in registers into
// exactly the A fragments wgmma reads. No dequantized weight is written to shared memory; shared
// memory holds only the activations (the B operand, N = tokens), in the 128-byte swizzle that the
// wgmma descriptor reads without bank conflicts.
//
// Block: QUICK_SM90_THREADS = 2 warpgroups; tile 128 output features x BT tokens, K in steps of 64.
// Warp w of warpgroup b owns features 32 w + 16 b + 0..15 of the block: the rows 16 w .. +15 of the
// group's wgmma A operand (64 features). They are half of the QUICK tile column at 32 w: words
// (2b, 2b + 1) of each lane's 16 bytes, one 8-byte load per 32-deep chunk (the other group loads
// the other half of the same sectors); half2 2s + r of a word is register r of k16 step s
// (quickcupy/layouts.py draws it). Per 64-deep step a warpgroup issues 4 wgmma.m64nBTk16 (one per
// k16 step), so the dequantization of 16 weights per lane feeds 64 x BT x 64 multiply-adds.
// Pipelines: activations through a STAGES-deep cp.async ring whose slots are handed over with
// mbarriers ("full" when the copies landed, "empty" when both groups' wgmmas are done), so the two
// warpgroups run out of step and one dequantizes while the other's wgmmas run; weights two K steps
// ahead in registers. A group waits for its own wgmmas before it dequantizes the next step (ptxas
// serializes every wgmma if registers they read are written while an earlier group is in flight:
// warning C7513).
#include "wgmma.cuh"

using namespace qc;

constexpr int SM90_WG = 128;                     // threads per warpgroup
constexpr int SM90_BK = 64;                      // K per main-loop step: one 128-byte swizzle row
constexpr int SM90_U = SM90_BK / 32;             // 32-deep QUICK chunks per step

struct Sm90Weights {
  uint2 w[SM90_U];           // packed codes of the lane's 2 sub-tiles, one 8-byte load per chunk
  u32 s[SM90_U];             // their scales (fp16 x 2), per chunk (reloaded every GCH chunks)
  u32 z[SM90_U];             // their zero points (nibbles 2b, 2b + 1 of the tile's halfword)
};

template <int BT,       // tokens per block = wgmma N: 64, 128 or 256
          int STAGES,   // depth of the cp.async ring of activation tiles (BT x 64 fp16 each)
          int GCH>      // chunks per scale/zero reload = gcd(group_size / 32, 2): 1 or 2
__global__ void __launch_bounds__(QUICK_SM90_THREADS, 1)
quick_sm90(const half* __restrict__ A, const uint4* __restrict__ qweight,
           const unsigned short* __restrict__ qzeros, const uint2* __restrict__ scales,
           const half* __restrict__ bias, half* __restrict__ C, float* __restrict__ partial,
           int M, int N, int K, int group_size, int chunks_per_split) {
  constexpr int SLOT = BT * SM90_BK * 2;         // bytes of one activation tile
  constexpr int CP_PASSES = BT * 8 / QUICK_SM90_THREADS;   // 16-byte copies per thread per step
  constexpr int ROWS_PER_PASS = QUICK_SM90_THREADS / 8;
  constexpr int BN = SM90_WG;                    // output features per block (2 groups x 64)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const u32 base = smem_addr(smem_raw);
  const u32 ring = (base + 16 * STAGES + 1023) & ~1023u;   // swizzled tiles start on 1024 bytes
  const u32 full = base, empty = base + 8 * STAGES;        // STAGES mbarriers each

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int wb = warp / 4, wi = warp % 4;        // warpgroup (= wgmma row block b), warp in it
  // Raster: consecutive blocks take consecutive feature tiles of one token tile, so a wave shares
  // its activations and the whole weight stays in L2 across waves.
  const int tiles_n = (N + BN - 1) / BN, tile = blockIdx.x + gridDim.x * blockIdx.y;
  const int m0 = (tile / tiles_n) * BT;
  const int col0 = (tile % tiles_n) * BN + 32 * wi;   // the warp's QUICK tile column
  const bool warp_active = col0 < N;             // inactive warps still join their group's wgmmas
  const int chunks = K / 32, groups = K / group_size;
  const int kc0 = blockIdx.z * chunks_per_split;
  const int kc1 = min(chunks, kc0 + chunks_per_split);
  const int iters = (kc1 - kc0 + SM90_U - 1) / SM90_U;

  // This warp's streams: half (words 2 wb, 2 wb + 1) of tile column col0 / 32 of each tensor.
  const uint2* wq = reinterpret_cast<const uint2*>(qweight + (size_t)(col0 / 32) * chunks * 32 + lane) + wb;
  const u32* sq = reinterpret_cast<const u32*>(scales + (size_t)(col0 / 32) * groups * 8 + g) + wb;
  const unsigned short* zq = qzeros + (size_t)(col0 / 32) * groups * 8 + g;

  // Activation copies: thread copies 16-byte chunk c of rows r0 + ROWS_PER_PASS i; its swizzled
  // offsets and row bounds are fixed, only the K step moves.
  const int r0 = tid / 8, c8 = tid % 8;
  const u32 dst0 = sw128_offset(r0, c8);        // + ROWS_PER_PASS * 128 i: the swizzle repeats every 8 rows
  const half* src0 = A + (size_t)(m0 + r0) * K + (size_t)kc0 * 32 + 8 * c8;
  u32 rows_ok = 0;
#pragma unroll
  for (int i = 0; i < CP_PASSES; ++i) rows_ok |= (m0 + r0 + ROWS_PER_PASS * i < M) << i;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, QUICK_SM90_THREADS);   // one cp.async arrival per thread per fill
      mbar_init(empty + 8 * s, QUICK_SM90_THREADS);  // one arrival per thread once its wgmmas are done
    }
  }
  __syncthreads();

  auto load_x = [&](int it) {  // K step `it` -> its ring slot
    const u32 slot = ring + (it % STAGES) * SLOT + dst0;
    const bool k_ok = (kc0 + it * SM90_U) * 32 + 8 * c8 < kc1 * 32;
#pragma unroll
    for (int i = 0; i < CP_PASSES; ++i) {
      const bool ok = k_ok && (rows_ok >> i & 1);
      const half* src = ok ? src0 + (size_t)ROWS_PER_PASS * i * K + it * SM90_BK : A;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                   :: "r"(slot + ROWS_PER_PASS * 128 * i), "l"(src), "r"(ok ? 16 : 0));
    }
    cp_async_mbar_arrive(full + 8 * (it % STAGES));
  };
  auto load_w = [&](int it, Sm90Weights& regs) {
#pragma unroll
    for (int c = 0; c < SM90_U; ++c) {
      const int kc = kc0 + it * SM90_U + c;
      const bool ok = warp_active && kc < kc1;
      regs.w[c] = ok ? __ldg(wq + (size_t)kc * 64) : make_uint2(0, 0);
      if (c % GCH == 0) {
        const int grp = kc * 32 / group_size;
        regs.s[c] = ok ? __ldg(sq + (size_t)grp * 16) : 0u;
        regs.z[c] = ok ? __ldg(zq + (size_t)grp * 8) : 0u;
      }
    }
  };
  // A fragments of one K step: a[s] = k16 step s (chunk s / 2).
  auto dequant = [&](const Sm90Weights& regs, u32 (&a)[2 * SM90_U][4]) {
#pragma unroll
    for (int c = 0; c < SM90_U; ++c) {
      const int cs = c - c % GCH;                // chunk whose scales/zeros apply
      half2 z[4];
      int4x8_to_half2x4(regs.z[cs] >> (8 * wb), z);   // half2 j = (zero of sub-tile 2 wb + j, 0)
      const half2 sc = as_half2(regs.s[cs]);
      const half2 ss[2] = {__low2half2(sc), __high2half2(sc)};
      const u32 words[2] = {regs.w[c].x, regs.w[c].y};
      u32 h[2][4];                               // h[j][2 s + r]: sub-tile 2 wb + j, k16 step s, register r
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const Zero2 zj = make_zero2(__low2half2(z[j]));
        const Zero2 zz[4] = {zj, zj, zj, zj};
        const half2 sj[4] = {ss[j], ss[j], ss[j], ss[j]};
        dequant_int4x8(words[j], zz, sj, h[j]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        u32 (&f)[4] = a[2 * c + s];              // mma A: (row g, k lo), (g + 8, lo), (g, hi), (g + 8, hi)
        f[0] = h[0][2 * s];
        f[1] = h[1][2 * s];
        f[2] = h[0][2 * s + 1];
        f[3] = h[1][2 * s + 1];
      }
    }
  };

  float acc[BT / 2];
#pragma unroll
  for (int i = 0; i < BT / 2; ++i) acc[i] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s)
    if (s < iters) load_x(s);
  Sm90Weights wr[2];
  load_w(0, wr[0]);
  if (1 < iters) load_w(1, wr[1]);

  // Step `it` of one warpgroup: dequantize its weights; wait until its activations landed; issue
  // 4 wgmmas; meanwhile load the weights of it + 2 and refill the slot of step it - 2 with step
  // it + STAGES - 2 once both groups are done with it (the other group may be up to two steps
  // behind); wait for the wgmmas and mark the slot empty. The loads go after the proxy fence, which
  // would otherwise wait for them.
  auto step = [&](int it, Sm90Weights& w) {
    u32 af[2 * SM90_U][4];
    dequant(w, af);
    mbar_wait(full + 8 * (it % STAGES), (it / STAGES) & 1);
    fence_proxy_async_shared();                  // the cp.async writes, before wgmma reads them
    const u32 slot = ring + (it % STAGES) * SLOT;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 2 * SM90_U; ++s) wgmma_rs<BT>(acc, af[s], wgmma_desc_sw128(slot + 32 * s));
    wgmma_commit();
    if (it + 2 < iters) load_w(it + 2, w);
    if (it + STAGES - 2 < iters) {
      if (it >= 2) mbar_wait(empty + 8 * ((it - 2) % STAGES), ((it - 2) / STAGES) & 1);
      load_x(it + STAGES - 2);                   // steps STAGES - 2, STAGES - 1: fresh slots
    }
    wgmma_wait<0>();
    mbar_arrive(empty + 8 * (it % STAGES));
  };
  for (int it = 0; it < iters; it += 2) {
    step(it, wr[0]);
    if (it + 1 < iters) step(it + 1, wr[1]);
  }

  // Epilogue: lane holds D rows (features) col0 + 16 wb + g (+ 8), columns (tokens) 8 i + 2 t (+ 1).
  if (!warp_active) return;
  const bool split = gridDim.z > 1;
  float* part = partial + (size_t)blockIdx.z * M * N;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int col = col0 + 16 * wb + 8 * h + g;
    const float bv = (!split && bias != nullptr) ? __half2float(bias[col]) : 0.f;
#pragma unroll
    for (int i = 0; i < BT / 8; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = m0 + 8 * i + 2 * t + e;
        if (row >= M) continue;
        const float v = acc[4 * i + 2 * h + e];
        if (split) part[(size_t)row * N + col] = v;
        else C[(size_t)row * N + col] = __float2half_rn(v + bv);
      }
  }
}

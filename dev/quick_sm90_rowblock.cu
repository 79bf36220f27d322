// An experiment beside cuda/quick_sm90.cu (dev/sm90_rowblock_probe.py compiles and times it; the
// package never loads it): docs/hopper.md's "one row block per warpgroup at wgmma N = 256".
//
// quick_sm90 gives each warpgroup 128 output features as two m64 row blocks x BT = 128 tokens, so a
// thread dequantizes all 4 words of its lane's 16-byte QUICK fragment per 32-deep chunk and keeps
// 2 x 4 A fragments per step (64 registers double-buffered). Here a block is 128 features x 256
// tokens and each warpgroup one m64 row block x 256 tokens: per 64-deep K step 4 wgmma.m64n256k16
// (the multiply-adds of today's 8 m64n128k16), the same 128 fp32 accumulators a thread, but half the
// A fragments (16 registers a step, 32 double-buffered) and half the dequantization per warp and
// step. Warp w (0..7) takes the block's QUICK tile column w / 2 and of each lane's 16 bytes the words
// 2 (w % 2) and 2 (w % 2) + 1 (an 8-byte read): rows g and g + 8 of its 16 are the tile column's
// features 16 (w % 2) + g and 16 (w % 2) + 8 + g; the scales and zeros are those of sub-tiles
// 2 (w % 2) and 2 (w % 2) + 1. The packed layout is quick_sm90's (and quick's, quick_decode's).
//
// Cost: per K step a block reads 32 KB of activations and 4 KB of packed weights for 2 M
// multiply-adds (today: 16 KB and 8 KB for 2 M). Ring slots are 37 KB: 5 fit.
// Pipeline, mbarriers, TMA boxes (4 tile-column rows instead of 8), split-K partials and the raster
// are quick_sm90's.
#include "wgmma.cuh"

using namespace qc;

namespace rb {
constexpr int THREADS = 256;               // 2 warpgroups
constexpr int WARPS = THREADS / 32;
constexpr int BT = 256;                    // tokens per block = wgmma N
constexpr int TC = 4;                      // QUICK tile columns per block: 128 features
constexpr int BK = 64;                     // K per step: one 128-byte swizzle row
constexpr int U = BK / 32;                 // 32-deep chunks per step
constexpr int X_BYTES = BT * BK * 2;       // activations of a slot: 32 KB, 1 KB aligned
constexpr int W_BYTES = TC * U * 512;      // packed weights of a slot: [tile column][chunk][lane][16 B]
constexpr int SZ_REGION = 1024;            // scales [tile column][group][64 B], then zeros [..][16 B]
constexpr int SLOT = X_BYTES + W_BYTES + SZ_REGION;
static_assert(SLOT % 1024 == 0, "swizzled activation tiles start on 1024 bytes");
}  // namespace rb

// D (64 x 256, fp32) += A (64 x 16, registers) * B (16 x 256, shared memory, K-major, desc_b), one
// warpgroup; the fragment layouts of wgmma_rs in wgmma.cuh (d[4 i + e]: n8 block i).
#define RB_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                 "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define RB_F64(i) RB_F8(i), RB_F8(i + 8), RB_F8(i + 16), RB_F8(i + 24), \
                  RB_F8(i + 32), RB_F8(i + 40), RB_F8(i + 48), RB_F8(i + 56)
#define RB_D128                                                                                \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, " \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, " \
  "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, " \
  "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, " \
  "%92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, " \
  "%108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, " \
  "%123, %124, %125, %126, %127"
#define RB_WGMMA(PTX)                                                                            \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                     \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX "." PTX " {" RB_D128 "}, "     \
               "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"                                \
               : RB_F64(0), RB_F64(64)                                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1))

template <typename T>
__device__ __forceinline__ void wgmma_rs256(float (&d)[128], const u32 (&a)[4], unsigned long long desc_b);
template <>
__device__ __forceinline__ void wgmma_rs256<half>(float (&d)[128], const u32 (&a)[4], unsigned long long desc_b) {
  RB_WGMMA("f16");
}
template <>
__device__ __forceinline__ void wgmma_rs256<__nv_bfloat16>(float (&d)[128], const u32 (&a)[4],
                                                          unsigned long long desc_b) {
  RB_WGMMA("bf16");
}

template <int STAGES,   // ring slots
          int GCH,      // chunks per scale/zero reload = gcd(group_size / 32, 2): 1 or 2
          typename T>   // activations, bias and C: half or __nv_bfloat16; scales fp16
__global__ void __launch_bounds__(rb::THREADS, 1)
quick_sm90_rowblock(const __grid_constant__ TensorMap x_map,   // x (M, K), box 256 x 64, 128B swizzle
                    const __grid_constant__ TensorMap w_map,   // qweight by tile column, box 4 x 1 KB
                    const __grid_constant__ TensorMap s_map,   // scales by tile column, box 4 x GPS 64 B
                    const __grid_constant__ TensorMap z_map,   // qzeros by tile column, box 4 x GPS 16 B
                    const T* __restrict__ bias, T* __restrict__ C, float* __restrict__ partial,
                    int M, int N, int K, int group_size, int chunks_per_split) {
  using namespace rb;
  using D = Dt<T>;
  constexpr int GPS = U / GCH;                     // groups a step reads scales and zeros of
  constexpr int S_BYTES = TC * GPS * 64, Z_BYTES = TC * GPS * 16;
  static_assert(S_BYTES + Z_BYTES <= SZ_REGION, "scales and zeros overflow their region");
  constexpr u32 SLOT_TX = X_BYTES + W_BYTES + S_BYTES + Z_BYTES;
  constexpr int BN = TC * 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const u32 base = smem_addr(smem_raw);
  const u32 ring = (base + 16 * STAGES + 1023) & ~1023u;
  const unsigned char* ring_ptr = smem_raw + (ring - base);
  const u32 full = base, empty = base + 8 * STAGES;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int tc = warp / 2, hb = warp % 2;          // the warp's tile column and half of it
  const int tiles_n = (N + BN - 1) / BN, tile = blockIdx.x + gridDim.x * blockIdx.y;
  const int m0 = (tile / tiles_n) * BT;
  const int tcol0 = (tile % tiles_n) * TC;
  const int col0 = (tcol0 + tc) * 32 + 16 * hb;    // the warp's first output feature
  const bool warp_active = col0 < N;
  const int chunks = K / 32, chunks_per_group = group_size / 32;
  const int kc0 = blockIdx.z * chunks_per_split;
  const int kc1 = min(chunks, kc0 + chunks_per_split);
  const int iters = (kc1 - kc0 + U - 1) / U;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, THREADS);
    }
  }
  __syncthreads();

  auto load_step = [&](int it) {
    const u32 slot = ring + (it % STAGES) * SLOT, bar = full + 8 * (it % STAGES);
    const int kc = kc0 + it * U, grp = kc / chunks_per_group;
    mbar_arrive_expect_tx(bar, SLOT_TX);
    tma_load_2d(slot, &x_map, kc * 32, m0, bar);
    tma_load_2d(slot + X_BYTES, &w_map, kc * 64, tcol0, bar);
    tma_load_2d(slot + X_BYTES + W_BYTES, &s_map, grp * 8, tcol0, bar);
    tma_load_2d(slot + X_BYTES + W_BYTES + S_BYTES, &z_map, grp * 2, tcol0, bar);
  };
  // A fragments of step `it`: a[s] = k16 step s (chunk s / 2) of the warp's 16 rows.
  auto dequant = [&](int it, u32 (&a)[2 * U][4]) {
    const unsigned char* slot = ring_ptr + (it % STAGES) * SLOT;
    const int kc = kc0 + it * U;
#pragma unroll
    for (int c = 0; c < U; ++c) {
      const int gi = tc * GPS + (GCH == U ? 0 : (kc + c) / chunks_per_group - kc / chunks_per_group);
      const half2 s2 = as_half2(*reinterpret_cast<const u32*>(slot + X_BYTES + W_BYTES + gi * 64 + 8 * g + 4 * hb));
      typename D::T2 z[4];                       // z[0], z[1]: sub-tiles 2 hb, 2 hb + 1
      D::codes8(*reinterpret_cast<const unsigned short*>(slot + X_BYTES + W_BYTES + S_BYTES + gi * 16 + 2 * g) >> (8 * hb), z);
      const uint2 wv = *reinterpret_cast<const uint2*>(slot + X_BYTES + ((tc * U + c) * 32 + lane) * 16 + 8 * hb);
      const u32 words[2] = {wv.x, wv.y};
      const typename D::Scale sc[2] = {D::make_scale(__low2half2(s2)), D::make_scale(__high2half2(s2))};
      u32 h[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const typename D::Zero zj = D::make_zero(D::low2(z[j]));
        const typename D::Zero zz[4] = {zj, zj, zj, zj};
        const typename D::Scale sj[4] = {sc[j], sc[j], sc[j], sc[j]};
        D::dequant8(words[j], zz, sj, h[j]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        u32 (&f)[4] = a[2 * c + s];
        f[0] = h[0][2 * s];
        f[1] = h[1][2 * s];
        f[2] = h[0][2 * s + 1];
        f[3] = h[1][2 * s + 1];
      }
    }
  };
  auto wait_full = [&](int it) { mbar_wait(full + 8 * (it % STAGES), (it / STAGES) & 1); };

  float acc[BT / 2];
#pragma unroll
  for (int i = 0; i < BT / 2; ++i) acc[i] = 0.f;

  if (tid == 0)
    for (int s = 0; s < STAGES - 2 && s < iters; ++s) load_step(s);

  auto step = [&](int it, const u32 (&cur)[2 * U][4], u32 (&next)[2 * U][4]) {
    const u32 x = ring + (it % STAGES) * SLOT;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 2 * U; ++s) wgmma_rs256<T>(acc, cur[s], wgmma_desc_sw128(x + 32 * s));
    wgmma_commit();
    if (it + 1 < iters) {
      wait_full(it + 1);
      dequant(it + 1, next);
    }
    if (it + STAGES - 2 < iters && tid == 32 * (it % WARPS)) {
      if (it >= 2) mbar_wait(empty + 8 * ((it - 2) % STAGES), ((it - 2) / STAGES) & 1);
      load_step(it + STAGES - 2);
    }
    wgmma_wait<0>();
    mbar_arrive(empty + 8 * (it % STAGES));
  };
  u32 a0[2 * U][4], a1[2 * U][4];
  if (iters > 0) {
    wait_full(0);
    dequant(0, a0);
  }
  for (int it = 0; it < iters; it += 2) {
    step(it, a0, a1);
    if (it + 1 < iters) step(it + 1, a1, a0);
  }

  // Epilogue: lane holds features col0 + 8 h + g, tokens m0 + 8 i + 2 t (+ 1), in acc[4 i + 2 h + e].
  if (!warp_active) return;
  const bool split = gridDim.z > 1;
  float* part = partial + (size_t)blockIdx.z * M * N;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int col = col0 + 8 * h + g;
    const float bv = (!split && bias != nullptr) ? D::to_float(bias[col]) : 0.f;
#pragma unroll
    for (int i = 0; i < BT / 8; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = m0 + 8 * i + 2 * t + e;
        if (row >= M) continue;
        const float v = acc[4 * i + 2 * h + e];
        if (split) part[(size_t)row * N + col] = v;
        else C[(size_t)row * N + col] = D::from_float(v + bv);
      }
  }
}

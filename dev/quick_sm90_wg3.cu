// An experiment beside cuda/quick_sm90.cu (dev/sm90_wg3_probe.py compiles and times it; the package
// never loads it): more warps per scheduler to hide the dequantization's latency.
//
// Nsight Compute on quick_sm90 version 8 (M = 4096, K = N = 8192, results/h100/ncu_sm90.txt): the
// tensor pipe is busy 77.9% of the time with 2 warpgroups a block and one block an SM, 2 warps per
// scheduler, 0.30 of them eligible, no eligible warp in 74% of the cycles: each warp waits on its
// own dequantization chain and wgmma group. Here a block has WGS warpgroups, each one m64 row block
// of 64 features x BT tokens (quick_sm90's 256-token layout: warp w takes half w % 2 of QUICK tile
// column w / 2, an 8-byte read of each lane's 16 bytes): WGS = 3 gives 3 warps per scheduler, a
// block of 192 features, and (to stay within 65536 / 384 = 170 registers a thread) BT = 192 or 128
// tokens, wgmma.m64n192k16 or m64n128k16. WGS = 2, BT = 256 is quick_sm90's own 256-token tile (the
// control). Per 64-deep K step a block reads BT x 128 bytes of activations and WGS x 2 KB of packed
// weights. Pipeline (one ring of TMA boxes, full/empty mbarriers, the copies issued by lane 0 of a
// rotating warp, step k + 1 dequantized while step k's wgmmas run), split-K partials and the raster
// are quick_sm90's; the packed layout is the same.
#include "wgmma.cuh"

using namespace qc;

namespace qc {
// D (64 x 192, fp32) += A (64 x 16, registers) * B (16 x 192, shared memory): wgmma.cuh has N = 64,
// 128 and 256 only.
#define WG3_F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                  "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG3_RS192(T, PTX)                                                                          \
  template <>                                                                                      \
  __device__ __forceinline__ void wgmma_rs<192, T>(float (&d)[96], const u32 (&a)[4],              \
                                                   unsigned long long desc_b) {                    \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %101, 0;\n"                                     \
                 "wgmma.mma_async.sync.aligned.m64n192k16.f32." PTX "." PTX " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "             \
                 "{%96, %97, %98, %99}, %100, p, 1, 1, 0;\n}\n"                                   \
                 : WG3_F8(0), WG3_F8(8), WG3_F8(16), WG3_F8(24), WG3_F8(32), WG3_F8(40),          \
                   WG3_F8(48), WG3_F8(56), WG3_F8(64), WG3_F8(72), WG3_F8(80), WG3_F8(88)         \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1));              \
  }
WG3_RS192(half, "f16")
WG3_RS192(__nv_bfloat16, "bf16")
#undef WG3_RS192
#undef WG3_F8
}  // namespace qc

constexpr int WG3_BK = 64;                       // K per step: one 128-byte swizzle row
constexpr int WG3_U = WG3_BK / 32;               // 32-deep chunks per step
constexpr int WG3_SZ_REGION = 2048;              // scales and zeros of up to 2 groups a step

template <int BT,       // tokens per block = wgmma N: 128, 192 or 256
          int WGS,      // warpgroups: 64 features each
          int STAGES,   // ring slots
          int GCH,      // chunks per scale/zero reload: gcd(group_size / 32, 2)
          typename T>   // half or __nv_bfloat16
__global__ void __launch_bounds__(128 * WGS, 1)
quick_sm90_wg(const __grid_constant__ TensorMap x_map, const __grid_constant__ TensorMap w_map,
              const __grid_constant__ TensorMap s_map, const __grid_constant__ TensorMap z_map,
              const T* __restrict__ bias, T* __restrict__ C, float* __restrict__ partial,
              int M, int N, int K, int group_size, int chunks_per_split) {
  using D = Dt<T>;
  constexpr int THREADS = 128 * WGS, WARPS = THREADS / 32;
  constexpr int TCOLS = WARPS / 2;               // QUICK tile columns per block (a warp: half of one)
  constexpr int BN = 32 * TCOLS;
  constexpr int X_BYTES = BT * WG3_BK * 2;
  constexpr int W_BYTES = TCOLS * WG3_U * 512;
  constexpr int GPS = WG3_U / GCH;
  constexpr int S_BYTES = TCOLS * GPS * 64, Z_BYTES = TCOLS * GPS * 16;
  static_assert(S_BYTES + Z_BYTES <= WG3_SZ_REGION, "scales and zeros overflow their region");
  constexpr int SLOT = X_BYTES + W_BYTES + WG3_SZ_REGION;
  static_assert(SLOT % 1024 == 0, "swizzled activation tiles start on 1024 bytes");
  constexpr u32 SLOT_TX = X_BYTES + W_BYTES + S_BYTES + Z_BYTES;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const u32 base = smem_addr(smem_raw);
  const u32 ring = (base + 16 * STAGES + 1023) & ~1023u;
  const unsigned char* ring_ptr = smem_raw + (ring - base);
  const u32 full = base, empty = base + 8 * STAGES;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;
  const int tiles_n = (N + BN - 1) / BN, tile = blockIdx.x + gridDim.x * blockIdx.y;
  const int m0 = (tile / tiles_n) * BT;
  const int tcol0 = (tile % tiles_n) * TCOLS;
  const int tcw = warp / 2, hb = warp % 2;        // the warp's tile column, its half of it
  const int col0 = (tcol0 + tcw) * 32 + 16 * hb;
  const bool warp_active = col0 < N;
  const int chunks = K / 32, chunks_per_group = group_size / 32;
  const int kc0 = blockIdx.z * chunks_per_split;
  const int kc1 = min(chunks, kc0 + chunks_per_split);
  const int iters = (kc1 - kc0 + WG3_U - 1) / WG3_U;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, THREADS);
    }
  }
  __syncthreads();

  auto load_step = [&](int it) {
    const u32 slot = ring + (it % STAGES) * SLOT, bar = full + 8 * (it % STAGES);
    const int kc = kc0 + it * WG3_U, grp = kc / chunks_per_group;
    mbar_arrive_expect_tx(bar, SLOT_TX);
    tma_load_2d(slot, &x_map, kc * 32, m0, bar);
    tma_load_2d(slot + X_BYTES, &w_map, kc * 64, tcol0, bar);
    tma_load_2d(slot + X_BYTES + W_BYTES, &s_map, grp * 8, tcol0, bar);
    tma_load_2d(slot + X_BYTES + W_BYTES + S_BYTES, &z_map, grp * 2, tcol0, bar);
  };
  auto dequant = [&](int it, u32 (&a)[2 * WG3_U][4]) {
    const unsigned char* slot = ring_ptr + (it % STAGES) * SLOT;
    const int kc = kc0 + it * WG3_U;
#pragma unroll
    for (int c = 0; c < WG3_U; ++c) {
      const int gi = tcw * GPS + (GCH == WG3_U ? 0 : (kc + c) / chunks_per_group - kc / chunks_per_group);
      const unsigned char* sg = slot + X_BYTES + W_BYTES + gi * 64 + 8 * g;
      const unsigned char* wl = slot + X_BYTES + ((tcw * WG3_U + c) * 32 + lane) * 16;
      typename D::T2 z[4];
      D::codes8(*reinterpret_cast<const unsigned short*>(slot + X_BYTES + W_BYTES + S_BYTES + gi * 16 + 2 * g) >> (8 * hb), z);
      const uint2 wv = *reinterpret_cast<const uint2*>(wl + 8 * hb);
      const u32 words[2] = {wv.x, wv.y};
      const half2 s2 = as_half2(*reinterpret_cast<const u32*>(sg + 4 * hb));
      u32 h[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const typename D::Zero zj = D::make_zero(D::low2(z[j]));
        const typename D::Zero zz[4] = {zj, zj, zj, zj};
        const typename D::Scale s = D::make_scale(j ? __high2half2(s2) : __low2half2(s2));
        const typename D::Scale sj[4] = {s, s, s, s};
        D::dequant8(words[j], zz, sj, h[j]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        u32 (&f)[4] = a[2 * c + s];
        f[0] = h[0][2 * s], f[1] = h[1][2 * s], f[2] = h[0][2 * s + 1], f[3] = h[1][2 * s + 1];
      }
    }
  };
  auto wait_full = [&](int it) { mbar_wait(full + 8 * (it % STAGES), (it / STAGES) & 1); };

  float acc[BT / 2];
#pragma unroll
  for (int i = 0; i < BT / 2; ++i) acc[i] = 0.f;

  if (tid == 0)
    for (int s = 0; s < STAGES - 2 && s < iters; ++s) load_step(s);

  auto step = [&](int it, const u32 (&cur)[2 * WG3_U][4], u32 (&next)[2 * WG3_U][4]) {
    const u32 x = ring + (it % STAGES) * SLOT;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 2 * WG3_U; ++s) wgmma_rs<BT, T>(acc, cur[s], wgmma_desc_sw128(x + 32 * s));
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
  u32 a0[2 * WG3_U][4], a1[2 * WG3_U][4];
  if (iters > 0) {
    wait_full(0);
    dequant(0, a0);
  }
  for (int it = 0; it < iters; it += 2) {
    step(it, a0, a1);
    if (it + 1 < iters) step(it + 1, a1, a0);
  }

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

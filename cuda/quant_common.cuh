// Device helpers shared by both GEMM designs: int4 -> fp16 dequantization, the mma / ldmatrix /
// cp.async wrappers, and the epilogue. Every piece of inline PTX of the project lives here.
//
// Index maps of shared memory (which lane touches which row/column) and the thread counts are NOT
// written here: they live in smem_maps.cuh, generated from quickcupy/smem_maps.py and
// quickcupy/registry.py, so the bank-conflict model and the launcher read the very same values.
#pragma once
#include <cuda_fp16.h>

#include "smem_maps.cuh"

namespace qc {

typedef unsigned int u32;

// ------------------------------------------------------------------------------ dequantization
// The lop3 / magic-number conversion (FasterTransformer, "Who says elephants can't run"): OR-ing a
// nibble into the mantissa of fp16 1024.0 (0x6400) gives 1024 + nibble exactly, with no int->float
// instruction. A 32-bit word of 8 nibbles becomes 4 half2: half2 i = (nibble i, nibble i + 4).
// Nibbles 1, 3 (and 5, 7) land 4 bits higher, as 1024 + 16 * nibble, and are scaled by 1/16.
template <int LUT>
__device__ __forceinline__ u32 lop3(u32 a, u32 b, u32 c) {
  u32 d;
  asm volatile("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
}

__device__ __forceinline__ void int4x8_biased(u32 w, u32 (&h)[4]) {
  constexpr u32 LO = 0x000f000f, HI = 0x00f000f0, MAGIC = 0x64006400;
  constexpr int AND_OR = (0xf0 & 0xcc) | 0xaa;  // (a & b) | c
  const u32 top = w >> 8;
  h[0] = lop3<AND_OR>(w, LO, MAGIC);    // (1024 + n0,      1024 + n4)
  h[1] = lop3<AND_OR>(w, HI, MAGIC);    // (1024 + 16 n1,   1024 + 16 n5)
  h[2] = lop3<AND_OR>(top, LO, MAGIC);  // (1024 + n2,      1024 + n6)
  h[3] = lop3<AND_OR>(top, HI, MAGIC);  // (1024 + 16 n3,   1024 + 16 n7)
}

__device__ __forceinline__ half2 as_half2(u32 x) { return *reinterpret_cast<half2*>(&x); }
__device__ __forceinline__ u32 as_u32(half2 x) { return *reinterpret_cast<u32*>(&x); }

// Zero point of a pair of columns, pre-biased for int4x8_biased: subtracting `lo` from a low-nibble
// half2 and FMA-ing `neg_hi` into a high-nibble one leaves (code - zero) exactly.
struct Zero2 {
  half2 lo;      // 1024 + z
  half2 neg_hi;  // -(64 + z)
};

__device__ __forceinline__ Zero2 make_zero2(half2 z) {
  Zero2 r;
  r.lo = __hadd2(z, __float2half2_rn(1024.f));
  r.neg_hi = __hneg2(__hadd2(z, __float2half2_rn(64.f)));
  return r;
}

// 8 nibbles -> 4 half2 of plain codes (0..15): used for packed zero points.
__device__ __forceinline__ void int4x8_to_half2x4(u32 w, half2 (&out)[4]) {
  u32 h[4];
  int4x8_biased(w, h);
  const half2 k1024 = __float2half2_rn(1024.f), k1_16 = __float2half2_rn(1.f / 16.f),
              km64 = __float2half2_rn(-64.f);
  out[0] = __hsub2(as_half2(h[0]), k1024);
  out[1] = __hfma2(as_half2(h[1]), k1_16, km64);
  out[2] = __hsub2(as_half2(h[2]), k1024);
  out[3] = __hfma2(as_half2(h[3]), k1_16, km64);
}

// 8 nibbles -> 4 half2 of dequantized weights (code - zero) * scale; pair i uses zero[i], scale[i].
// (code - zero) is exact in fp16, so the only rounding is the final multiply.
__device__ __forceinline__ void dequant_int4x8(u32 w, const Zero2 (&zero)[4], const half2 (&scale)[4],
                                               u32 (&out)[4]) {
  u32 h[4];
  int4x8_biased(w, h);
  const half2 k1_16 = __float2half2_rn(1.f / 16.f);
  out[0] = as_u32(__hmul2(__hsub2(as_half2(h[0]), zero[0].lo), scale[0]));
  out[1] = as_u32(__hmul2(__hfma2(as_half2(h[1]), k1_16, zero[1].neg_hi), scale[1]));
  out[2] = as_u32(__hmul2(__hsub2(as_half2(h[2]), zero[2].lo), scale[2]));
  out[3] = as_u32(__hmul2(__hfma2(as_half2(h[3]), k1_16, zero[3].neg_hi), scale[3]));
}

// --------------------------------------------------------------------------- tensor-core wrappers
__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

// Four 8x8 fp16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// D = A * B + D for one m16n8k16 tile: A row-major fp16 (4 regs), B column-major fp16 (2 regs),
// fp32 accumulators. Lane (g = lane / 4, t = lane % 4) holds d[0..1] at row g, columns 2t, 2t+1
// and d[2..3] at row g + 8.
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy that bypasses registers; zero-fills when !pred.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const int bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(smem)), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// --------------------------------------------------------------------------------- epilogue
// Writes MT x NT accumulator tiles of one warp: tile (mt, j) covers rows row0 + 16 mt .. +15 and
// columns col0 + 8 j .. +7. With one K split the result (+ bias) goes to C as fp16; with several,
// each split writes fp32 partials to partial[split] and splitk_reduce sums them.
template <int MT, int NT>
__device__ __forceinline__ void store_tiles(const float (&acc)[MT][NT][4], int row0, int col0, int M, int N,
                                            const half* __restrict__ bias, half* __restrict__ C,
                                            float* __restrict__ partial) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const bool split = gridDim.z > 1;
  float* part = partial + (size_t)blockIdx.z * M * N;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int col = col0 + 8 * j + 2 * t;
      float2 b = make_float2(0.f, 0.f);
      if (!split && bias != nullptr) b = __half22float2(*reinterpret_cast<const half2*>(bias + col));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + 16 * mt + g + 8 * h;
        if (row >= M) continue;
        const float x = acc[mt][j][2 * h], y = acc[mt][j][2 * h + 1];
        if (split) {
          *reinterpret_cast<float2*>(part + (size_t)row * N + col) = make_float2(x, y);
        } else {
          *reinterpret_cast<half2*>(C + (size_t)row * N + col) = __floats2half2_rn(x + b.x, y + b.y);
        }
      }
    }
  }
}

}  // namespace qc

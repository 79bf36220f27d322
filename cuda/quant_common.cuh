// Device helpers shared by the GEMM designs: int4 -> fp16/bf16 dequantization, the mma / ldmatrix /
// cp.async wrappers, and the epilogue. Every piece of inline PTX of the project lives here.
//
// Activation dtypes: the kernels are templates on T, the type of activations, bias and output:
// half (fp16) or __nv_bfloat16 (bf16). Dt<T> (below) holds all that differs between the two; the
// weights' scales are always fp16 (QuantLinear keeps them so) and zero points are nibbles.
//
// Index maps of shared memory (which lane touches which row/column) and the thread counts are NOT
// written here: they live in smem_maps.cuh, generated from quickcupy/smem_maps.py and
// quickcupy/registry.py, so the bank-conflict model and the launcher read the very same values.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "smem_maps.cuh"

namespace qc {

typedef unsigned int u32;

// ------------------------------------------------------------------- programmatic dependent launch
// A kernel launched with the programmatic-stream-serialization attribute (quickcupy.kernels.launch_kernel,
// sm_90+) may start while the previous kernel of its stream still runs. pdl_trigger: this block lets
// the next such kernel launch (its blocks then take the SMs this kernel's blocks leave). pdl_wait:
// returns once the previous kernel has completed and its writes are visible. A kernel reads nothing
// the previous one may write, and writes nothing, before pdl_wait. Both are no-ops below sm_90 and
// in a kernel launched without the attribute.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Brings the 128-byte line holding p into L2 (no registers held, nothing waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

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

// 8 nibbles -> 4 half2 of (code - zero), exact small integers, no scale: for kernels that scale the
// fp32 sums of a group instead (pair i uses zero[i]; same nibble order as dequant_int4x8).
__device__ __forceinline__ void dequant_int4x8_unscaled(u32 w, const Zero2 (&zero)[4], u32 (&out)[4]) {
  u32 h[4];
  int4x8_biased(w, h);
  const half2 k1_16 = __float2half2_rn(1.f / 16.f);
  out[0] = as_u32(__hsub2(as_half2(h[0]), zero[0].lo));
  out[1] = as_u32(__hfma2(as_half2(h[1]), k1_16, zero[1].neg_hi));
  out[2] = as_u32(__hsub2(as_half2(h[2]), zero[2].lo));
  out[3] = as_u32(__hfma2(as_half2(h[3]), k1_16, zero[3].neg_hi));
}

// ------------------------------------------------------------------------ bf16 dequantization
// bf16 has 7 mantissa bits, so fp16's 1024 + 16 n for the odd nibbles does not fit: every pair comes
// from a shifted word instead. OR-ing a nibble into the mantissa of bf16 128.0 (0x4300) gives
// 128 + n exactly (spacing 1 in [128, 256)). bf162 i = (nibble i, nibble i + 4): the pair
// order of int4x8_biased.
__device__ __forceinline__ void int4x8_biased_bf16(u32 w, u32 (&h)[4]) {
  constexpr u32 LO = 0x000f000f, MAGIC = 0x43004300;
  constexpr int AND_OR = (0xf0 & 0xcc) | 0xaa;  // (a & b) | c
  h[0] = lop3<AND_OR>(w, LO, MAGIC);        // (128 + n0, 128 + n4)
  h[1] = lop3<AND_OR>(w >> 4, LO, MAGIC);   // (128 + n1, 128 + n5)
  h[2] = lop3<AND_OR>(w >> 8, LO, MAGIC);   // (128 + n2, 128 + n6)
  h[3] = lop3<AND_OR>(w >> 12, LO, MAGIC);  // (128 + n3, 128 + n7)
}

__device__ __forceinline__ __nv_bfloat162 as_bf162(u32 x) { return *reinterpret_cast<__nv_bfloat162*>(&x); }
__device__ __forceinline__ u32 as_u32(__nv_bfloat162 x) { return *reinterpret_cast<u32*>(&x); }

// Zero point of a pair of columns for int4x8_biased_bf16: (128 + n) - (128 + z) = n - z exactly.
struct ZeroBf2 {
  __nv_bfloat162 biased;  // 128 + z (exact: z <= 15)
};

// An fp16 scale s as hi + lo, both bf16, exactly: hi = s rounded to 8 significant bits, lo = s - hi
// has at most 3 (s has 11), so lo is exact too. With d = code - zero (|d| <= 15, 4 bits),
// d * lo has <= 7 significant bits and is exact in bf16, and fma(d, hi, d * lo) rounds d * s ONCE:
// every dequantized weight is the correctly rounded bf16 of the exact (code - zero) * fp16 scale.
// Rounding the scale to bf16 first (the naive path) would add a second error, shared by all weights
// of a group, on top of it. The weights' error is then bf16's unit roundoff (2^-9) where fp16's
// path has 2^-12: the same 8x as between the two output roundings that no kernel avoids.
struct ScaleBf2 {
  __nv_bfloat162 hi, lo;
};

__device__ __forceinline__ ScaleBf2 make_scale_bf16(half2 s) {
  const float2 f = __half22float2(s);
  ScaleBf2 r;
  r.hi = __float22bfloat162_rn(f);
  const float2 h = __bfloat1622float2(r.hi);
  r.lo = __floats2bfloat162_rn(f.x - h.x, f.y - h.y);  // exact differences (see above)
  return r;
}

// 8 nibbles -> 4 bf162 of (code - zero) * scale (pair i uses zero[i], scale[i]); no scale with
// SCALED = false (exact small integers, for kernels that scale fp32 sums per group).
template <bool SCALED>
__device__ __forceinline__ void dequant_int4x8_bf16(u32 w, const ZeroBf2 (&zero)[4], const ScaleBf2 (&scale)[4],
                                                    u32 (&out)[4]) {
  u32 h[4];
  int4x8_biased_bf16(w, h);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 d = __hsub2(as_bf162(h[i]), zero[i].biased);  // exact
    out[i] = as_u32(SCALED ? __hfma2(d, scale[i].hi, __hmul2(d, scale[i].lo)) : d);
  }
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

// The same tile with bf16 A and B (sm_80+), fp32 accumulators; identical fragment layout.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------ activation dtypes
// Dt<T>: what a kernel templated on the activation type T needs, for T = half or __nv_bfloat16.
// T2 is the pair type one 32-bit register of an mma fragment holds; Zero/Scale are what a column's
// zero point and fp16 scale become once per group (make_zero / make_scale), consumed by dequant8.
template <typename T>
struct Dt;

template <>
struct Dt<half> {
  using T2 = half2;
  using Zero = Zero2;
  using Scale = half2;
  static __device__ __forceinline__ T2 low2(T2 x) { return __low2half2(x); }
  static __device__ __forceinline__ void codes8(u32 w, T2 (&out)[4]) { int4x8_to_half2x4(w, out); }
  static __device__ __forceinline__ Zero make_zero(T2 z) { return make_zero2(z); }
  static __device__ __forceinline__ Scale make_scale(half2 s) { return s; }
  static __device__ __forceinline__ void dequant8(u32 w, const Zero (&z)[4], const Scale (&s)[4], u32 (&out)[4]) {
    dequant_int4x8(w, z, s, out);
  }
  static __device__ __forceinline__ void dequant8_unscaled(u32 w, const Zero (&z)[4], u32 (&out)[4]) {
    dequant_int4x8_unscaled(w, z, out);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    mma_m16n8k16(d, a, b0, b1);
  }
  static __device__ __forceinline__ float2 to_float2(u32 x) { return __half22float2(as_half2(x)); }
  static __device__ __forceinline__ u32 from_float2(float x, float y) { return as_u32(__floats2half2_rn(x, y)); }
  static __device__ __forceinline__ float to_float(half x) { return __half2float(x); }
  static __device__ __forceinline__ half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Dt<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  using Zero = ZeroBf2;
  using Scale = ScaleBf2;
  static __device__ __forceinline__ T2 low2(T2 x) { return __low2bfloat162(x); }
  static __device__ __forceinline__ void codes8(u32 w, T2 (&out)[4]) {
    u32 h[4];
    int4x8_biased_bf16(w, h);
    const T2 k128 = __float2bfloat162_rn(128.f);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __hsub2(as_bf162(h[i]), k128);
  }
  static __device__ __forceinline__ Zero make_zero(T2 z) { return {__hadd2(z, __float2bfloat162_rn(128.f))}; }
  static __device__ __forceinline__ Scale make_scale(half2 s) { return make_scale_bf16(s); }
  static __device__ __forceinline__ void dequant8(u32 w, const Zero (&z)[4], const Scale (&s)[4], u32 (&out)[4]) {
    dequant_int4x8_bf16<true>(w, z, s, out);
  }
  static __device__ __forceinline__ void dequant8_unscaled(u32 w, const Zero (&z)[4], u32 (&out)[4]) {
    const ScaleBf2 unused[4] = {};
    dequant_int4x8_bf16<false>(w, z, unused, out);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    mma_m16n8k16_bf16(d, a, b0, b1);
  }
  static __device__ __forceinline__ float2 to_float2(u32 x) { return __bfloat1622float2(as_bf162(x)); }
  static __device__ __forceinline__ u32 from_float2(float x, float y) { return as_u32(__floats2bfloat162_rn(x, y)); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// ----------------------------------------------------------------------------------- RMSNorm math
// The arithmetic of RMSNorm, in one place for llama_ops.cu's add_rms_norm and quick_decode's norm
// prologue: the sum of squares of a row in fp32 (fmaf, element by element), inv_rms =
// rsqrtf(sum / H + eps), and each element T(T(x * inv_rms) * w), rounded where Hugging Face's
// LlamaRMSNorm rounds. 16-byte vectors hold 8 elements of T.

// 8 elements of T in each of two 16-byte vectors, pair by pair: word k of the result is
// f(pair k of a, pair k of b), the pairs widened to fp32 and f returning a pair of T.
template <typename T, typename F>
__device__ __forceinline__ uint4 map8(uint4 a, uint4 b, F f) {
  const u32* x = &a.x;
  const u32* y = &b.x;
  uint4 r;
  u32* z = &r.x;
#pragma unroll
  for (int k = 0; k < 4; ++k) z[k] = f(Dt<T>::to_float2(x[k]), Dt<T>::to_float2(y[k]));
  return r;
}

// s + the squares of 8 elements of T, added one by one (fp32).
template <typename T>
__device__ __forceinline__ float sum_sq8(uint4 a, float s = 0.f) {
  const u32* x = &a.x;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 u = Dt<T>::to_float2(x[k]);
    s = fmaf(u.x, u.x, s);
    s = fmaf(u.y, u.y, s);
  }
  return s;
}

// 1 / rms of a row of H elements whose squares sum to ss.
__device__ __forceinline__ float rms_inv(float ss, int H, float eps) { return rsqrtf(ss / H + eps); }

// T(T(x * inv_rms) * w) for 8 elements.
template <typename T>
__device__ __forceinline__ uint4 norm8(uint4 a, uint4 w, float inv_rms) {
  return map8<T>(a, w, [inv_rms](float2 u, float2 v) {
    const float2 n = Dt<T>::to_float2(Dt<T>::from_float2(u.x * inv_rms, u.y * inv_rms));
    return Dt<T>::from_float2(n.x * v.x, n.y * v.y);
  });
}

// ------------------------------------------------------------------------------------ SiLU * up
// T(silu(g) * u) = T(g / (1 + exp(-g)) * u) in fp32, the gate of a Llama MLP, in one place for
// llama_ops.cu's silu_mul and quick_decode's SiLU prologue (the same bits either way).
__device__ __forceinline__ float silu_mul_f(float g, float u) { return g / (1.f + expf(-g)) * u; }

// 8 elements of gate and of up -> 8 of T(silu(gate) * up).
template <typename T>
__device__ __forceinline__ uint4 silu_mul8(uint4 gate, uint4 up) {
  return map8<T>(gate, up, [](float2 g, float2 u) { return Dt<T>::from_float2(silu_mul_f(g.x, u.x), silu_mul_f(g.y, u.y)); });
}

// T(float(r) + float(y)) of two pairs of T: the residual add (one rounding of the exact sum).
template <typename T>
__device__ __forceinline__ u32 add2(u32 r, u32 y) {
  const float2 a = Dt<T>::to_float2(r), b = Dt<T>::to_float2(y);
  return Dt<T>::from_float2(a.x + b.x, a.y + b.y);
}

// 16-byte global -> shared copy that bypasses registers; zero-fills when !pred. `smem`: a
// shared-window address (smem_addr), or a pointer into shared memory.
__device__ __forceinline__ void cp_async16(u32 smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(smem), "l"(gmem), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  cp_async16(smem_addr(smem), gmem, pred);
}
// An L2 cache policy that evicts first what it tags (createpolicy, fraction 1.0): for data read
// exactly once, a weight stream, so that it does not push activations, scales and split-K partials
// out of L2. Measured on the H100 (quick_decode's ring, 2026-11-25, results/h100/decode_probe_evict.txt):
// 0-6% faster (28672x8192 at M = 4 and 16: 48.5 -> 45.6 and 54.3 -> 51.6 us), never slower; on the
// register pipeline's loads (ld_stream16 with a policy, below) it changed nothing at M = 1, so that
// path keeps ld_stream16<1>.
__device__ __forceinline__ unsigned long long l2_evict_first_policy() {
  unsigned long long policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// cp_async16 with an L2 cache policy (l2_evict_first_policy) for the global read.
__device__ __forceinline__ void cp_async16(u32 smem, const void* gmem, bool pred, unsigned long long policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n"
               :: "r"(smem), "l"(gmem), "r"(pred ? 16 : 0), "l"(policy));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// --------------------------------------------------------------------------------- epilogue
// Writes MT x NT accumulator tiles of one warp: tile (mt, j) covers rows row0 + 16 mt .. +15 and
// columns col0 + 8 j .. +7. With one K split the result (+ bias) goes to C as T; with several,
// each split writes fp32 partials to partial[split] and splitk_reduce sums them.
template <int MT, int NT, typename T>
__device__ __forceinline__ void store_tiles(const float (&acc)[MT][NT][4], int row0, int col0, int M, int N,
                                            const T* __restrict__ bias, T* __restrict__ C,
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
      if (!split && bias != nullptr) b = Dt<T>::to_float2(*reinterpret_cast<const u32*>(bias + col));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + 16 * mt + g + 8 * h;
        if (row >= M) continue;
        const float x = acc[mt][j][2 * h], y = acc[mt][j][2 * h + 1];
        if (split) {
          *reinterpret_cast<float2*>(part + (size_t)row * N + col) = make_float2(x, y);
        } else {
          *reinterpret_cast<u32*>(C + (size_t)row * N + col) = Dt<T>::from_float2(x + b.x, y + b.y);
        }
      }
    }
  }
}

}  // namespace qc

// ===================================================================== streaming and split-K helpers
// (for cuda/quick_decode.cu)
namespace qc {

// 16-byte global load of data read exactly once (a weight stream), zero when !pred, with no branch.
// HINT: 0 = ld.global.nc (L1 allocating, like __ldg); 1 = .L1::no_allocate; 2 = .L1::no_allocate
// plus .L2::256B (the L2 fetches a whole 256-byte sector group). Measured on the H100 (quick_decode):
// 1 and 2 equal, 0 about 1 us slower at K = N = 8192. No L2 eviction hint: ptxas 13 takes
// .L2::evict_first only on 32-byte loads, and the createpolicy route (.L2::cache_hint with
// l2_evict_first_policy, which runs fine here, unlike Marlin's) measured no faster on this path.
template <int HINT>
__device__ __forceinline__ uint4 ld_stream16(const void* p, bool pred) {
  uint4 r;
  const int ok = pred;
  if constexpr (HINT == 0) {
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n"
                 " mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
                 " @p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "r"(ok));
  } else if constexpr (HINT == 1) {
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n"
                 " mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
                 " @p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "r"(ok));
  } else {
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n"
                 " mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
                 " @p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "r"(ok));
  }
  return r;
}

// ld_stream16<1> with an L2 cache policy (l2_evict_first_policy) for the global read. Not used by
// the kernels (measured no faster, above); dev/decode_probe.py's "evict" variant calls it.
__device__ __forceinline__ uint4 ld_stream16(const void* p, bool pred, unsigned long long policy) {
  uint4 r;
  const int ok = pred;
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n"
               " mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
               " @p ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %6;\n}\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p), "r"(ok), "l"(policy));
  return r;
}

// ldmatrix_x4 from a shared-state-space address (smem_addr of the row): keeps 32-bit addresses in
// registers instead of 64-bit generic pointers.
__device__ __forceinline__ void ldmatrix_x4_addr(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// Split-K arrival of one warp, "last one reduces": call it with the whole warp after the warp's
// fp32 partials are stored. Returns true (to every lane) in the warp that arrives last among the
// `splits` warps sharing `counter`; that warp may then read every split's partials (with __ldcg:
// they are in L2, not in this SM's L1) and must write the result. The last warp resets the counter
// to 0, so a counters buffer zeroed once by the host serves every later launch (CUDA-graph safe).
// Fences are fence.acq_rel.gpu (MEMBAR.ALL.GPU), lighter than __threadfence's fence.sc.gpu.
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }

__device__ __forceinline__ bool splitk_warp_arrive(unsigned int* counter, unsigned int splits) {
  fence_acq_rel_gpu();  // release: this lane's partial stores are visible GPU-wide before the count
  __syncwarp();
  unsigned int prev = 0;
  if ((threadIdx.x & 31) == 0) prev = atomicAdd(counter, 1u);
  prev = __shfl_sync(0xffffffffu, prev, 0);
  const bool last = prev == splits - 1;
  if (last) {
    fence_acq_rel_gpu();  // acquire: the partial reads below come after the observed count
    if ((threadIdx.x & 31) == 0) atomicExch(counter, 0u);  // every split has arrived: reset
  }
  return last;
}

// The deterministic split-K sum of a 32-column strip, by one warp: for rows 0..M-1 and columns
// col0..col0+31, C = sum over s = 0..splits-1 IN THAT ORDER of partial[s][row][col] (+ bias[col]),
// as T. partial is [splits][M][N] fp32; N % 4 == 0, col0 % 4 == 0. Lane = (row % 4, 4 columns):
// 4 rows per pass, BATCH splits of 2 passes loaded before any is added (their latencies overlap).
// RES: C = T(residual + T(sum + bias)) (add2), residual [M][N] of T, which may be C itself (each
// element is read once, by the lane that then writes it).
template <int BATCH, bool RES = false, typename T>
__device__ __forceinline__ void splitk_reduce_strip32(const float* __restrict__ partial, int splits,
                                                      int M, int N, int col0,
                                                      const T* __restrict__ bias, const T* residual,
                                                      T* __restrict__ C) {
  const int lane = threadIdx.x & 31, rsub = lane / 8, col = col0 + (lane % 8) * 4;
  const size_t MN = (size_t)M * N;
  float4 b = make_float4(0.f, 0.f, 0.f, 0.f);
  if (bias != nullptr) {
    const uint2 bb = *reinterpret_cast<const uint2*>(bias + col);
    const float2 b01 = Dt<T>::to_float2(bb.x), b23 = Dt<T>::to_float2(bb.y);
    b = make_float4(b01.x, b01.y, b23.x, b23.y);
  }
  for (int m0 = 0; m0 < M; m0 += 8) {
    float4 acc[2] = {make_float4(0.f, 0.f, 0.f, 0.f), make_float4(0.f, 0.f, 0.f, 0.f)};
    uint2 r[2];    // RES: the residual of the two rows, loaded with the first partials
    if constexpr (RES) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + 4 * h + rsub;
        r[h] = row < M ? __ldcg(reinterpret_cast<const uint2*>(residual + (size_t)row * N + col)) : make_uint2(0, 0);
      }
    }
    for (int s0 = 0; s0 < splits; s0 += BATCH) {
      float4 p[2][BATCH];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + 4 * h + rsub;
#pragma unroll
        for (int s = 0; s < BATCH; ++s) {
          p[h][s] = (row < M && s0 + s < splits)
                        ? __ldcg(reinterpret_cast<const float4*>(partial + (s0 + s) * MN + (size_t)row * N + col))
                        : make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int s = 0; s < BATCH; ++s) {
          acc[h].x += p[h][s].x; acc[h].y += p[h][s].y; acc[h].z += p[h][s].z; acc[h].w += p[h][s].w;
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + 4 * h + rsub;
      if (row < M) {
        uint2 o;
        o.x = Dt<T>::from_float2(acc[h].x + b.x, acc[h].y + b.y);
        o.y = Dt<T>::from_float2(acc[h].z + b.z, acc[h].w + b.w);
        if constexpr (RES) o = make_uint2(add2<T>(r[h].x, o.x), add2<T>(r[h].y, o.y));
        *reinterpret_cast<uint2*>(C + (size_t)row * N + col) = o;
      }
    }
  }
}

}  // namespace qc

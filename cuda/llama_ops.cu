// The small ops of a Llama decoder layer (quickcupy/llama/model.py), each one kernel so that a decode
// step is a short, capturable sequence of launches: RMSNorm with the residual add fused in front,
// rotary embedding of q and k fused with the KV-cache write, SiLU(gate) * up, and a row argmax (greedy
// sampling). T is the activation type (half; bf16 instances can be added by name, the math is fp32).
// Every position-dependent kernel reads the first position from device memory (`start`), so one CUDA
// graph serves every decode step. LLAMA_OPS_THREADS comes from the generated header.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "smem_maps.cuh"  // LLAMA_OPS_THREADS, generated from quickcupy/registry.py

namespace llama_ops {

constexpr int THREADS = LLAMA_OPS_THREADS;  // every kernel here is launched with this many threads
constexpr int WARPS = THREADS / 32;

__device__ __forceinline__ float to_f(half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ half from_f<half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum over the block; every thread gets the result. red: WARPS floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) s += red[w];
  return s;
}

}  // namespace llama_ops

// One block per row of H elements. If delta is given, x += delta first (rounded to T, written back:
// the residual stream). out = T(T(x * rsqrt(mean(x^2) + eps)) * weight): the statistic in fp32, the
// two roundings where Hugging Face's LlamaRMSNorm (and the NumPy reference) round.
template <typename T>
__global__ void __launch_bounds__(llama_ops::THREADS)
add_rms_norm(T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ weight, T* __restrict__ out,
             int H, float eps) {
  using namespace llama_ops;
  __shared__ float red[WARPS];
  T* xr = x + (size_t)blockIdx.x * H;
  const T* dr = delta ? delta + (size_t)blockIdx.x * H : nullptr;
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += THREADS) {
    float v = to_f(xr[i]);
    if (dr) {
      v = to_f(from_f<T>(v + to_f(dr[i])));   // the sum as T adds it: one rounding of the exact sum
      xr[i] = from_f<T>(v);
    }
    ss = fmaf(v, v, ss);
  }
  const float inv_rms = rsqrtf(block_sum(ss, red) / H + eps);
  T* o = out + (size_t)blockIdx.x * H;
  for (int i = threadIdx.x; i < H; i += THREADS)   // each thread rereads only what it wrote
    o[i] = from_f<T>(to_f(from_f<T>(to_f(xr[i]) * inv_rms)) * to_f(weight[i]));
}

// One block per token (b, s) of qkv (B, S, n_heads + 2 n_kv, D), at position p = *start + s.
// q and k heads are rotated ("rotate_half" pairs i, i + D/2; cos/sin tables (positions, D/2) fp32)
// into qk_out (B, S, n_heads + n_kv, D); when the caches are given, the rotated k is written to
// cache_k[b, kv, :, p] (B, n_kv, D, max_len) and v to cache_v[b, kv, p, :] (B, n_kv, max_len, D).
template <typename T>
__global__ void __launch_bounds__(llama_ops::THREADS)
rope_cache(const T* __restrict__ qkv, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
           const int* __restrict__ start, T* __restrict__ qk_out, T* __restrict__ cache_k,
           T* __restrict__ cache_v, int S, int n_heads, int n_kv, int D, int max_len) {
  using namespace llama_ops;
  const int token = blockIdx.x, b = token / S, p = *start + token % S, half_d = D / 2;
  const T* in = qkv + (size_t)token * (n_heads + 2 * n_kv) * D;
  T* qk = qk_out + (size_t)token * (n_heads + n_kv) * D;
  const float* c = cos_t + (size_t)p * half_d;
  const float* s = sin_t + (size_t)p * half_d;
  for (int j = threadIdx.x; j < (n_heads + n_kv) * half_d; j += THREADS) {   // rotated pairs
    const int h = j / half_d, i = j % half_d;
    const float x1 = to_f(in[h * D + i]), x2 = to_f(in[h * D + i + half_d]);
    // __fmul_rn: no fused multiply-add, so the rounding is the reference's x1 * c - x2 * s
    const T y1 = from_f<T>(__fmul_rn(x1, c[i]) - __fmul_rn(x2, s[i]));
    const T y2 = from_f<T>(__fmul_rn(x2, c[i]) + __fmul_rn(x1, s[i]));
    qk[h * D + i] = y1;
    qk[h * D + i + half_d] = y2;
    if (cache_k && h >= n_heads) {
      T* ck = cache_k + ((size_t)b * n_kv + (h - n_heads)) * D * max_len + p;
      ck[(size_t)i * max_len] = y1;
      ck[(size_t)(i + half_d) * max_len] = y2;
    }
  }
  if (cache_v) {
    for (int j = threadIdx.x; j < n_kv * D; j += THREADS) {
      const int kv = j / D, i = j % D;
      cache_v[(((size_t)b * n_kv + kv) * max_len + p) * D + i] = in[(n_heads + n_kv) * D + j];
    }
  }
}

// gate_up (rows, 2I) = [gate | up] per row -> out (rows, I) = T(silu(gate) * up), fp32 math.
template <typename T>
__global__ void __launch_bounds__(llama_ops::THREADS)
silu_mul(const T* __restrict__ gate_up, T* __restrict__ out, int I, long long n) {
  using namespace llama_ops;
  for (long long j = blockIdx.x * (long long)THREADS + threadIdx.x; j < n; j += (long long)gridDim.x * THREADS) {
    const long long r = j / I, i = j % I;
    const float g = to_f(gate_up[r * 2 * I + i]);
    out[j] = from_f<T>(g / (1.f + expf(-g)) * to_f(gate_up[r * 2 * I + I + i]));
  }
}

// One block per row of logits (rows, V): out[row] = the first index of the row's maximum (NaN never wins).
template <typename T>
__global__ void __launch_bounds__(llama_ops::THREADS)
argmax_rows(const T* __restrict__ logits, long long* __restrict__ out, int V) {
  using namespace llama_ops;
  __shared__ float best_v[WARPS];
  __shared__ int best_i[WARPS];
  const T* row = logits + (size_t)blockIdx.x * V;
  float bv = __int_as_float(0xff800000);  // -inf
  int bi = V;   // no valid entry yet; a row of NaN/-inf still returns an index below
  for (int i = threadIdx.x; i < V; i += THREADS) {
    const float v = to_f(row[i]);
    if (v > bv || (bi == V && v == bv)) { bv = v; bi = i; }   // strided: the first index of each value wins
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
  }
  if (threadIdx.x % 32 == 0) { best_v[threadIdx.x / 32] = bv; best_i[threadIdx.x / 32] = bi; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < WARPS; ++w)
      if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) { bv = best_v[w]; bi = best_i[w]; }
    out[blockIdx.x] = bi < V ? bi : 0;
  }
}

// The decode position moves on inside the graph: *start += step (one thread).
extern "C" __global__ void advance_position(int* start, int step) { *start += step; }

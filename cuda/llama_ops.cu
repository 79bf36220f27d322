// The small ops of a Llama decoder layer (quickcupy/llama/model.py), each one kernel so that a decode
// step is a short, capturable sequence of launches: RMSNorm with the residual add fused in front,
// rotary embedding of q and k fused with the KV-cache write (for prefill; a decode step does it inside
// decode_attention.cu), SiLU(gate) * up, and a row argmax (greedy sampling). Templates on the
// activation type T (half or __nv_bfloat16, through Dt<T>; registry.LLAMA_OPS instantiates both), the
// math in fp32. Every position-dependent kernel reads the first position from device memory
// (`start`), so one CUDA graph serves every decode step. LLAMA_OPS_THREADS comes from the generated header.
#include "quant_common.cuh"   // Dt<T>; smem_maps.cuh: LLAMA_OPS_THREADS, generated from quickcupy/registry.py

namespace llama_ops {

constexpr int THREADS = LLAMA_OPS_THREADS;  // every kernel here is launched with this many threads
constexpr int WARPS = THREADS / 32;
using qc::u32;

// T(a + b) per element (one rounding of the exact sum). map8, sum_sq8, rms_inv and norm8 (RMSNorm's
// arithmetic, shared with quick_decode's norm prologue) are in quant_common.cuh.
template <typename T>
__device__ __forceinline__ uint4 add8(uint4 a, uint4 b) {
  return qc::map8<T>(a, b, [](float2 u, float2 v) { return qc::Dt<T>::from_float2(u.x + v.x, u.y + v.y); });
}

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
// With H % 8 == 0 and 16-byte aligned rows, a thread moves 8 elements per load and keeps up to
// CACHED of its chunks of x and weight in registers between the two passes (H <= 8192 at 256 threads:
// one memory latency per row, not one per element); else element by element.
template <typename T>
__global__ void __launch_bounds__(llama_ops::THREADS)
add_rms_norm(T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ weight, T* __restrict__ out,
             int H, float eps) {
  qc::pdl_trigger();
  qc::pdl_wait();  // reads what the previous kernel wrote
  using namespace llama_ops;
  using Dt = qc::Dt<T>;
  constexpr int CACHED = 4;
  __shared__ float red[WARPS];
  T* xr = x + (size_t)blockIdx.x * H;
  const T* dr = delta ? delta + (size_t)blockIdx.x * H : nullptr;
  T* o = out + (size_t)blockIdx.x * H;
  const bool vec = H % 8 == 0 && (reinterpret_cast<size_t>(x) | reinterpret_cast<size_t>(delta) |
                                  reinterpret_cast<size_t>(weight) | reinterpret_cast<size_t>(out)) % 16 == 0;
  float ss = 0.f;
  if (vec) {
    const int chunks = H / 8;
    uint4 xc[CACHED], wc[CACHED];
#pragma unroll
    for (int r = 0; r < CACHED; ++r) {
      const int c = threadIdx.x + r * THREADS;
      if (c < chunks) {
        xc[r] = reinterpret_cast<const uint4*>(xr)[c];
        wc[r] = reinterpret_cast<const uint4*>(weight)[c];
        if (dr) {
          xc[r] = add8<T>(xc[r], reinterpret_cast<const uint4*>(dr)[c]);
          reinterpret_cast<uint4*>(xr)[c] = xc[r];
        }
        ss += qc::sum_sq8<T>(xc[r]);
      }
    }
    for (int c = threadIdx.x + CACHED * THREADS; c < chunks; c += THREADS) {
      uint4 v = reinterpret_cast<const uint4*>(xr)[c];
      if (dr) {
        v = add8<T>(v, reinterpret_cast<const uint4*>(dr)[c]);
        reinterpret_cast<uint4*>(xr)[c] = v;
      }
      ss += qc::sum_sq8<T>(v);
    }
    const float inv_rms = qc::rms_inv(block_sum(ss, red), H, eps);
#pragma unroll
    for (int r = 0; r < CACHED; ++r) {
      const int c = threadIdx.x + r * THREADS;
      if (c < chunks) reinterpret_cast<uint4*>(o)[c] = qc::norm8<T>(xc[r], wc[r], inv_rms);
    }
    for (int c = threadIdx.x + CACHED * THREADS; c < chunks; c += THREADS)   // rereads only what it wrote
      reinterpret_cast<uint4*>(o)[c] = qc::norm8<T>(reinterpret_cast<const uint4*>(xr)[c],
                                                reinterpret_cast<const uint4*>(weight)[c], inv_rms);
    return;
  }
  for (int i = threadIdx.x; i < H; i += THREADS) {
    float v = Dt::to_float(xr[i]);
    if (dr) {
      v = Dt::to_float(Dt::from_float(v + Dt::to_float(dr[i])));   // the sum as T adds it: one rounding of the exact sum
      xr[i] = Dt::from_float(v);
    }
    ss = fmaf(v, v, ss);
  }
  const float inv_rms = qc::rms_inv(block_sum(ss, red), H, eps);
  for (int i = threadIdx.x; i < H; i += THREADS)   // each thread rereads only what it wrote
    o[i] = Dt::from_float(Dt::to_float(Dt::from_float(Dt::to_float(xr[i]) * inv_rms)) * Dt::to_float(weight[i]));
}

// Grid (tokens B*S, column blocks): thread j of a token handles pair slot j of its
// (n_heads + 2 n_kv) * D/2, at position p = *start + s. q and k heads are rotated ("rotate_half"
// pairs i, i + D/2; cos/sin tables (positions, D/2) fp32) into qk_out (B, S, n_heads + n_kv, D);
// when the caches are given, the rotated k is written to cache_k[b, kv, :, p] (B, n_kv, D, max_len)
// and v (elements i and i + D/2 of a v head) to cache_v[b, kv, p, :] (B, n_kv, max_len, D).
// (A decode step does all this inside decode_attention.cu instead.)
template <typename T>
__global__ void __launch_bounds__(llama_ops::THREADS)
rope_cache(const T* __restrict__ qkv, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
           const int* __restrict__ start, T* __restrict__ qk_out, T* __restrict__ cache_k,
           T* __restrict__ cache_v, int S, int n_heads, int n_kv, int D, int max_len) {
  qc::pdl_trigger();
  qc::pdl_wait();  // reads what the previous kernel wrote
  using namespace llama_ops;
  using Dt = qc::Dt<T>;
  const int half_d = D / 2, j = blockIdx.y * THREADS + threadIdx.x;
  if (j >= (n_heads + 2 * n_kv) * half_d) return;
  const int token = blockIdx.x, b = token / S, p = *start + token % S;
  const int h = j / half_d, i = j % half_d;
  const T* in = qkv + ((size_t)token * (n_heads + 2 * n_kv) + h) * D;
  if (h >= n_heads + n_kv) {   // a v head: into the cache as it is
    if (cache_v) {
      T* cv = cache_v + (((size_t)b * n_kv + (h - n_heads - n_kv)) * max_len + p) * D;
      cv[i] = in[i];
      cv[i + half_d] = in[i + half_d];
    }
    return;
  }
  const float c = cos_t[(size_t)p * half_d + i], s = sin_t[(size_t)p * half_d + i];
  const float x1 = Dt::to_float(in[i]), x2 = Dt::to_float(in[i + half_d]);
  // __fmul_rn: no fused multiply-add, so the rounding is the reference's x1 * c - x2 * s
  const T y1 = Dt::from_float(__fmul_rn(x1, c) - __fmul_rn(x2, s));
  const T y2 = Dt::from_float(__fmul_rn(x2, c) + __fmul_rn(x1, s));
  T* qk = qk_out + ((size_t)token * (n_heads + n_kv) + h) * D;
  qk[i] = y1;
  qk[i + half_d] = y2;
  if (cache_k && h >= n_heads) {
    T* ck = cache_k + ((size_t)b * n_kv + (h - n_heads)) * D * max_len + p;
    ck[(size_t)i * max_len] = y1;
    ck[(size_t)(i + half_d) * max_len] = y2;
  }
}

// Grid (rows, column blocks): gate_up (rows, 2I) = [gate | up] per row -> out (rows, I) =
// T(silu(gate) * up), fp32 math; one element per thread.
template <typename T>
__global__ void __launch_bounds__(llama_ops::THREADS)
silu_mul(const T* __restrict__ gate_up, T* __restrict__ out, int I) {
  qc::pdl_trigger();
  qc::pdl_wait();  // reads what the previous kernel wrote
  using namespace llama_ops;
  using Dt = qc::Dt<T>;
  const int i = blockIdx.y * THREADS + threadIdx.x;
  if (i >= I) return;
  const T* row = gate_up + (size_t)blockIdx.x * 2 * I;
  out[(size_t)blockIdx.x * I + i] = Dt::from_float(qc::silu_mul_f(Dt::to_float(row[i]), Dt::to_float(row[I + i])));
}

// One block per row of logits (rows, V): out[row] = the first index of the row's maximum (NaN never wins).
template <typename T>
__global__ void __launch_bounds__(llama_ops::THREADS)
argmax_rows(const T* __restrict__ logits, long long* __restrict__ out, int V) {
  qc::pdl_trigger();
  qc::pdl_wait();  // reads what the previous kernel wrote
  using namespace llama_ops;
  __shared__ float best_v[WARPS];
  __shared__ int best_i[WARPS];
  const T* row = logits + (size_t)blockIdx.x * V;
  float bv = __int_as_float(0xff800000);  // -inf
  int bi = V;   // no valid entry yet; a row of NaN/-inf still returns an index below
  for (int i = threadIdx.x; i < V; i += THREADS) {
    const float v = qc::Dt<T>::to_float(row[i]);
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
extern "C" __global__ void advance_position(int* start, int step) {
  qc::pdl_wait();
  *start += step;
}

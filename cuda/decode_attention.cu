// Fused attention of one decode step (one new token per sequence): for sequence b and query head h,
// out = softmax(q . K[:, :length] / sqrt(D)) @ V[:length], fp32 math, fp16 in and out. Positions
// >= length are never read. Caches as quickcupy/llama/model.py's KVCache: keys (B, n_kv, D, max_len)
// (K^T: position is the contiguous axis), values (B, n_kv, max_len, D); q (B, n_heads, D);
// out (B, n_heads * D); length: positions to attend, plus *start when start is not null (the
// position of the new token in device memory: one captured graph serves every step).
// Query head h reads KV head h / (n_heads / n_kv) (Hugging Face repeat_kv).
//
// Block: HEADS query heads of one sequence sharing one KV head (HEADS divides the group), so K and V
// are read once per block. It walks the positions in tiles of THREADS with an online softmax (running
// max and sum, rescaled per tile), so any length runs in fixed shared memory.
//   scores:       thread i owns position tile + i (a warp reads 32 consecutive halfs of each row of K^T);
//   weighted sum: warp w owns positions tile + w, w + WARPS, ...; lane l owns d elements
//                 [l * D/32, (l + 1) * D/32) (a warp reads one whole row of V); warps add up at the end.
#include <cuda_fp16.h>

#include "smem_maps.cuh"

namespace decode {

constexpr int THREADS = DECODE_ATTENTION_THREADS;  // from quickcupy/registry.py, which launches this many
constexpr int WARPS = THREADS / 32;
constexpr float LOG2E = 1.4426950408889634f;  // scores are kept in log2 units: exp2f instead of expf

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

template <bool MAX>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const float x = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, x) : v + x;
  }
  return v;
}

// E consecutive halfs at p as floats, in loads of C = 4, 2 or 1 halfs (the largest dividing E: rows of
// V start at multiples of D = 32 E halfs and lane l at l * E, so p is 2C-byte aligned).
template <int E>
__device__ __forceinline__ void load_halfs(const half* __restrict__ p, float (&v)[E]) {
  constexpr int C = E % 4 == 0 ? 4 : E % 2 == 0 ? 2 : 1;
  struct alignas(2 * C) Chunk { half h[C]; };
#pragma unroll
  for (int c = 0; c < E / C; ++c) {
    const Chunk x = reinterpret_cast<const Chunk*>(p)[c];
#pragma unroll
    for (int k = 0; k < C; ++k) v[c * C + k] = __half2float(x.h[k]);
  }
}

}  // namespace decode

template <int D, int HEADS>
__global__ void __launch_bounds__(decode::THREADS)
decode_attention(const half* __restrict__ q, const half* __restrict__ keys, const half* __restrict__ values,
                 half* __restrict__ out, int n_heads, int n_kv, int max_len, int length,
                 const int* __restrict__ start) {
  using namespace decode;
  if (start) length += *start;   // a CUDA graph reads the cache length from device memory
  static_assert(D % 32 == 0, "a warp spans head_dim in the weighted sum: D must be a multiple of 32");
  constexpr int E = D / 32;                        // d elements per lane in the weighted sum
  __shared__ __align__(16) float q_s[D][HEADS];    // q * log2(e) / sqrt(D)
  __shared__ float p_s[HEADS][THREADS];            // probabilities of the current tile
  __shared__ float red_s[WARPS][HEADS];            // per-warp maxima, then per-warp sums
  __shared__ float sum_s[WARPS][HEADS][D];         // per-warp weighted sums

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int blocks_per_seq = n_heads / HEADS;
  const int b = blockIdx.x / blocks_per_seq, h0 = (blockIdx.x % blocks_per_seq) * HEADS;
  const int kv = h0 / (n_heads / n_kv);
  const half* K = keys + (size_t)(b * n_kv + kv) * D * max_len;     // D x max_len
  const half* V = values + (size_t)(b * n_kv + kv) * max_len * D;   // max_len x D
  const size_t q0 = ((size_t)b * n_heads + h0) * D;                 // q and out of heads h0 ..: HEADS x D

  const float scale = LOG2E / sqrtf((float)D);
  for (int i = tid; i < HEADS * D; i += THREADS) q_s[i % D][i / D] = __half2float(q[q0 + i]) * scale;
  __syncthreads();

  // Per query head: the running max (the same in every thread), this thread's share of the sum of
  // exponentials, and this lane's weighted sums of V; all relative to the running max.
  float m[HEADS], l[HEADS], acc[HEADS][E];
#pragma unroll
  for (int g = 0; g < HEADS; ++g) {
    m[g] = neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.f;
  }

  for (int t0 = 0; t0 < length; t0 += THREADS) {
    // Scores of position t0 + tid (-inf past length).
    const int t = t0 + tid;
    float s[HEADS];
#pragma unroll
    for (int g = 0; g < HEADS; ++g) s[g] = t < length ? 0.f : neg_inf();
    if (t < length) {
#pragma unroll 16
      for (int i = 0; i < D; ++i) {
        const float k = __half2float(K[i * max_len + t]);
#pragma unroll
        for (int g = 0; g < HEADS; ++g) s[g] = fmaf(q_s[i][g], k, s[g]);
      }
    }
    // Tile maximum over the block; lane 0 of each warp posts its warp's.
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
      const float w = warp_reduce<true>(s[g]);
      if (lane == 0) red_s[warp][g] = w;
    }
    __syncthreads();
    float alpha[HEADS];   // rescales what earlier tiles accumulated to the new maximum
#pragma unroll
    for (int g = 0; g < HEADS; ++g) {
      float tile_max = red_s[0][g];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) tile_max = fmaxf(tile_max, red_s[w][g]);
      const float m_new = fmaxf(m[g], tile_max);   // finite: the tile holds position t0 < length
      alpha[g] = exp2f(m[g] - m_new);              // 0 on the first tile (m = -inf)
      m[g] = m_new;
      const float p = exp2f(s[g] - m_new);         // 0 past length
      l[g] = fmaf(l[g], alpha[g], p);
      p_s[g][tid] = p;
    }
    __syncthreads();
    // Weighted sum of the tile's rows of V.
    const int n = min(THREADS, length - t0);
#pragma unroll
    for (int g = 0; g < HEADS; ++g)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] *= alpha[g];
#pragma unroll 4
    for (int j = warp; j < n; j += WARPS) {
      float v[E];
      load_halfs<E>(V + (size_t)(t0 + j) * D + lane * E, v);
#pragma unroll
      for (int g = 0; g < HEADS; ++g) {
        const float p = p_s[g][j];
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] = fmaf(p, v[e], acc[g][e]);
      }
    }
    __syncthreads();   // the next tile rewrites red_s and p_s
  }

  // Sum the warps' weighted sums and the threads' shares of the denominator.
#pragma unroll
  for (int g = 0; g < HEADS; ++g) {
    const float w = warp_reduce<false>(l[g]);
    if (lane == 0) red_s[warp][g] = w;
#pragma unroll
    for (int e = 0; e < E; ++e) sum_s[warp][g][lane * E + e] = acc[g][e];
  }
  __syncthreads();
  for (int i = tid; i < HEADS * D; i += THREADS) {
    const int g = i / D, c = i % D;
    float o = 0.f, denom = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      o += sum_s[w][g][c];
      denom += red_s[w][g];
    }
    out[q0 + i] = __float2half_rn(o / denom);
  }
}
